"""Tools: what users run on an AnnData; results land in ``obsm`` / ``varm`` / ``uns``.

Tools load torch only when called, so ``import sclcm`` stays light.
"""

from ._annotate import annotate
from ._attention import attention
from ._embed import embed
from ._gene_network import gene_network
from ._map_species import map_species
from ._model_ref import DEFAULT_MODEL, get_model, shipped_models
from ._perturb import perturb

__all__ = ["DEFAULT_MODEL", "annotate", "attention", "embed", "gene_network", "get_model",
           "map_species", "perturb", "shipped_models"]
