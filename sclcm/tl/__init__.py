"""Tools: what users run on an AnnData; results land in ``obsm`` / ``varm`` / ``uns``.

Tools load torch only when called, so ``import sclcm`` stays light.
"""

from ._annotate import annotate
from ._embed import embed
from ._model_ref import DEFAULT_MODEL, get_model, shipped_models
from ._perturb import perturb

__all__ = ["DEFAULT_MODEL", "annotate", "embed", "get_model", "perturb", "shipped_models"]
