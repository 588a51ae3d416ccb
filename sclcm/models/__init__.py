"""Models: one transformer backbone on packed cells, four presets, safe checkpoints.

- :class:`ModelConfig` and its presets (``geneformer``, ``scgpt``, ``scbert``,
  ``scfoundation`` at sizes ``tiny``, ``small``, ``base``),
- :class:`CellModel` (``forward`` on packed tokens, ``embed``, ``save_pretrained``,
  ``from_pretrained``),
- attention backends (``flash``, ``sdpa``, ``math``) behind :func:`attention`,
- :func:`import_geneformer`, :func:`import_scgpt` and :func:`import_scfoundation` (its
  encoder) for published checkpoints,
- :func:`published` (the registry) and :func:`load` (by name, through the Hugging Face cache).
"""

from ._attention import ATTENTION_BACKENDS, Packing, attention, register_attention
from ._config import ModelConfig
from ._geneformer import import_geneformer, load_plain_dict
from ._hub import load
from ._model import CellModel
from ._published import (
    PublishedModel,
    published,
    published_model,
    register_published,
    unregister_published,
)
from ._scfoundation import import_scfoundation, scfoundation_cell_embedding
from ._scgpt import import_scgpt, read_state_dict, write_scgpt_checkpoint

__all__ = [
    "ATTENTION_BACKENDS",
    "CellModel",
    "ModelConfig",
    "Packing",
    "PublishedModel",
    "attention",
    "import_geneformer",
    "import_scfoundation",
    "import_scgpt",
    "load",
    "load_plain_dict",
    "published",
    "published_model",
    "read_state_dict",
    "register_attention",
    "register_published",
    "scfoundation_cell_embedding",
    "unregister_published",
    "write_scgpt_checkpoint",
]
