"""Cell streams for pretraining: AnnData / .h5ad files, tokenized corpora and the Census.

Every stream is a torch ``IterableDataset`` of blocks of cells: :class:`CellBlock` s (CSR
counts, obs, their :class:`GeneSpace` and cell ids) or, for a tokenized corpus,
:class:`~sclcm.tokenizers.TokenBatch` es. They share one shuffling and sharding plan
(:mod:`sclcm.data._plan`): chunks of consecutive cells are permuted with
``(seed, epoch)``, the sequence is cut into one equal share per rank, then whole blocks per
DataLoader worker, and cells are shuffled within a read buffer. :meth:`~CellStream.set_epoch`
changes the order; :meth:`~CellStream.set_shard` says which rank reads.

- :class:`AnnDataStream`: in-memory AnnData or .h5ad files read ``backed="r"``.
- :class:`CorpusStream`: a corpus written by ``sclcm.pp.tokenize(..., out=)``.
- :class:`CensusStream`: the CELLxGENE Census or a local Census, through tiledbsoma-ml.
- :func:`write_local_census`: AnnData -> a Census-shaped SOMA store
  (also ``python -m sclcm.data.census``).
- :class:`CellDataModule`: the streams in a Lightning ``Trainer`` (DDP included).
"""

from ._anndata import AnnDataStream
from ._block import CellBlock, GeneSpace
from ._census_stream import CensusStream
from ._corpus import CorpusStream
from ._local_census import write_local_census
from ._plan import epoch_seed
from ._stream import CellStream, ChunkedStream, TokenizedStream
from .collate import MaskingCollator

__all__ = [
    "AnnDataStream",
    "CellBlock",
    "CellDataModule",
    "CellStream",
    "CensusStream",
    "ChunkedStream",
    "CorpusStream",
    "GeneSpace",
    "MaskingCollator",
    "TokenizedStream",
    "epoch_seed",
    "write_local_census",
]


def __getattr__(name: str):
    if name == "CellDataModule":  # imports lightning: only when asked for
        from ._module import CellDataModule

        return CellDataModule
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
