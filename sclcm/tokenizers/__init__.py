"""Tokenizers: the four families of cell encodings, packed into :class:`TokenBatch` es.

Each tokenizer turns a block of cells (CSR or dense rows of counts) and the block's
column -> token map into a packed :class:`TokenBatch`; :func:`sclcm.pp.tokenize` runs one
over a whole AnnData. State saves to JSON and ``.npy`` (:meth:`Tokenizer.save`,
:func:`load_tokenizer`), never pickle.
"""

from ._base import ColumnMap, Tokenizer, load_tokenizer
from ._batch import TokenBatch
from ._corpus import TokenizedCorpus
from .geneformer import GeneformerTokenizer
from .scbert import ScBERTTokenizer
from .scfoundation import ScFoundationTokenizer, downsample_counts
from .scgpt import ScGPTTokenizer

__all__ = [
    "ColumnMap",
    "GeneformerTokenizer",
    "ScBERTTokenizer",
    "ScFoundationTokenizer",
    "ScGPTTokenizer",
    "TokenBatch",
    "TokenizedCorpus",
    "Tokenizer",
    "downsample_counts",
    "load_tokenizer",
]
