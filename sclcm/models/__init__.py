"""Models: one transformer backbone on packed cells, four presets, safe checkpoints.

- :class:`ModelConfig` and its presets (``geneformer``, ``scgpt``, ``scbert``,
  ``scfoundation`` at sizes ``tiny``, ``small``, ``base``),
- :class:`CellModel` (``forward`` on packed tokens, ``embed``, ``save_pretrained``,
  ``from_pretrained``),
- attention backends (``flash``, ``sdpa``, ``math``) behind :func:`attention`,
- :func:`import_geneformer` and :func:`import_scgpt` for published checkpoints.
"""

from ._attention import ATTENTION_BACKENDS, Packing, attention, register_attention
from ._config import ModelConfig
from ._geneformer import import_geneformer, load_plain_dict
from ._model import CellModel
from ._scgpt import import_scgpt, read_state_dict

__all__ = [
    "ATTENTION_BACKENDS",
    "CellModel",
    "ModelConfig",
    "Packing",
    "attention",
    "import_geneformer",
    "import_scgpt",
    "load_plain_dict",
    "read_state_dict",
    "register_attention",
]
