"""Plots of what sclcm computed, in the style of scanpy's ``pl``."""

from ._genes import gene_coverage
from ._perturb import perturbation
from ._train import pretraining

__all__ = ["gene_coverage", "perturbation", "pretraining"]
