"""A stream of :class:`~sclcm.tokenizers.TokenBatch` es over a tokenized corpus on disk."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..tokenizers import TokenBatch, TokenizedCorpus
from ._stream import ChunkedStream

if TYPE_CHECKING:
    from ._plan import Ranges


class CorpusStream(ChunkedStream):
    """Shuffled, sharded batches of a corpus written by ``sclcm.pp.tokenize(..., out=)``.

    The same plan as :class:`AnnDataStream`: chunks of consecutive cells are read from
    the memory-mapped arrays in file order, then shuffled within a buffer. Each process
    maps the corpus itself (nothing large is pickled to DataLoader workers).
    ``cell_index`` of the batches is the corpus's (the cells' rows in their source).

    Parameters
    ----------
    corpus
        A :class:`~sclcm.tokenizers.TokenizedCorpus` or its folder.
    block_size, chunk_size, buffer_size, shuffle, seed, even_shards, rank, world_size
        See :class:`~sclcm.data.ChunkedStream` and :mod:`sclcm.data`.
    """

    def __init__(self, corpus: TokenizedCorpus | str | Path, *, block_size: int = 1024,
                 chunk_size: int = 64, buffer_size: int | None = 16_384, shuffle: bool = True,
                 seed: int = 0, even_shards: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(block_size=block_size, chunk_size=chunk_size, buffer_size=buffer_size,
                         shuffle=shuffle, seed=seed, even_shards=even_shards, rank=rank,
                         world_size=world_size)
        self._corpus = corpus if isinstance(corpus, TokenizedCorpus) else TokenizedCorpus(corpus)
        self.path = self._corpus.path
        self._n_cells = self._corpus.n_cells

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_corpus"] = None  # memory maps would be pickled as copies: reopen instead
        return state

    @property
    def corpus(self) -> TokenizedCorpus:
        if self._corpus is None:
            self._corpus = TokenizedCorpus(self.path)
        return self._corpus

    def _sizes(self) -> list[int]:
        return [self._n_cells]

    def _read(self, ranges: Ranges) -> TokenBatch:
        parts = [self.corpus[start:stop] for _, start, stop in ranges]
        if not parts:
            return self.corpus[0:0]
        return parts[0] if len(parts) == 1 else TokenBatch.concat(parts)

    def __repr__(self) -> str:
        return (f"CorpusStream({self._n_cells} cells, {self.path}, block_size="
                f"{self.block_size}, shuffle={self.shuffle}, rank {self.rank} of "
                f"{self.world_size})")
