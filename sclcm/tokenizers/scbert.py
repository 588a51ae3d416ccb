"""scBERT's fixed panel with log2 expression levels (Yang et al., Nature Machine Intelligence 2022).

Counts are normalized to 10,000 per cell, transformed with log2(1 + x), truncated to an
integer and clipped at 5: levels 0..5. Every gene of the panel is a position in every
cell, zeros included, in vocabulary order (scBERT's gene2vec panel is 16,906 genes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._checks import InputError
from ._base import ColumnMap, Tokenizer, normalized
from ._batch import TokenBatch
from ._kernels import row_ids

if TYPE_CHECKING:
    from ..genes import GeneVocab
    from ._base import Block


class ScBERTTokenizer(Tokenizer):
    """Fixed-panel log2 levels of scBERT.

    Parameters
    ----------
    vocab
        The gene vocabulary; every gene of it is a position (the panel).
    max_level
        Levels are clipped to ``0..max_level`` (5 in scBERT).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> from sclcm.genes import GeneVocab
    >>> from sclcm.tokenizers import ScBERTTokenizer
    >>> from sclcm.tokenizers._base import ColumnMap
    >>> tok = ScBERTTokenizer(GeneVocab(["a", "b", "c", "d"]))
    >>> X = sparse.csr_matrix(np.array([[9990, 7, 3]]))   # columns a, b, c; d absent
    >>> batch = tok.encode(X, ColumnMap.from_token_ids(np.array([4, 5, 6])))
    >>> batch.gene_ids.tolist(), batch.values.tolist()   # log2(1+9990)=13.3 -> 5; 7 -> 3
    ([4, 5, 6, 7], [5.0, 3.0, 2.0, 0.0])
    """

    name = "scbert"
    _options = ("max_level",)

    def __init__(self, vocab: GeneVocab, *, max_len: int | None = None,
                 max_level: int = 5) -> None:
        super().__init__(vocab, max_len=vocab.n_genes if max_len is None else max_len)
        if self.max_len != vocab.n_genes:
            msg = (f"scBERT puts every panel gene in every cell: max_len must be the panel "
                   f"size ({vocab.n_genes}), not {self.max_len}.")
            raise ValueError(msg)
        self.max_level = max_level
        self._panel = np.arange(len(vocab.special_tokens), len(vocab), dtype=np.int32)

    def encode(self, X, cmap: ColumnMap, *, start: int = 0, keep_empty: bool = True,
               **kwargs) -> TokenBatch:
        # every cell has the whole panel, so no cell is ever empty of positions
        return super().encode(X, cmap, start=start, keep_empty=keep_empty, **kwargs)

    def _encode(self, block: Block, *, start: int, keep_empty: bool) -> TokenBatch:
        Y, totals = block.counts(require_integers=True, sort=False)
        n, panel = block.n_cells, len(self._panel)
        if n * panel >= 2**31:
            msg = f"A block of {n} cells x {panel} panel genes is too large; use smaller blocks."
            raise InputError(msg)
        token_ids = block.cmap.token_ids
        level = np.log2(1 + normalized(Y, totals))
        level = np.minimum(np.floor(level), self.max_level).astype(np.float32)
        values = np.zeros((n, panel), dtype=np.float32)
        # panel position of each slot: token id minus the special tokens before genes
        values[row_ids(Y.indptr), token_ids[Y.indices] - self._panel[0]] = level
        offsets = np.arange(n + 1, dtype=np.int64) * panel
        cells = np.arange(start, start + n, dtype=np.int64)
        batch = TokenBatch(np.tile(self._panel, n), values.ravel(), offsets, cells)
        return block.drop_empty(batch, Y.indptr, keep_empty=keep_empty)
