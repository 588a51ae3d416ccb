"""Plots of what sclcm computed, in the style of scanpy's ``pl``."""

from ._annotate import annotation
from ._gene_network import attention, gene_network
from ._genes import gene_coverage
from ._map_species import map_species
from ._perturb import perturbation
from ._train import pretraining

__all__ = ["annotation", "attention", "gene_coverage", "gene_network", "map_species",
           "perturbation", "pretraining"]
