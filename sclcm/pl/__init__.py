"""Plots of what sclcm computed, in the style of scanpy's ``pl``."""

from ._genes import gene_coverage
from ._perturb import perturbation

__all__ = ["gene_coverage", "perturbation"]
