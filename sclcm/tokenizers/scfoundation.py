"""scFoundation's continuous values with read-depth tokens (Hao et al., Nature Methods 2024).

Non-zero genes with value log1p(counts / total * 10,000), in vocabulary order, and two
per-cell read-depth tokens: ``S = log10(total counts of the input cell)`` and
``T = log10(target total counts)``. In pretraining the input is a down-sampled copy of a
cell (:func:`downsample_counts`) and the target its full-depth profile, so the model
learns to predict expression at depth T from a cell seen at depth S. At inference T = S
(``depth_fold=1``), or a higher T asks for the cell at a deeper read depth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from ._base import Tokenizer, normalized
from ._batch import TokenBatch
from ._kernels import row_ids

if TYPE_CHECKING:
    from ..genes import GeneVocab
    from ._base import Block


class ScFoundationTokenizer(Tokenizer):
    """Continuous log-normalized values plus the read-depth tokens T and S.

    Parameters
    ----------
    vocab
        The gene vocabulary (scFoundation's panel is 19,264 genes).
    max_len
        Most non-zero genes per cell (the highest-valued are kept); ``None`` keeps all.
    depth_fold
        ``T = S + log10(depth_fold)``.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> from sclcm.genes import GeneVocab
    >>> from sclcm.tokenizers import ScFoundationTokenizer
    >>> from sclcm.tokenizers._base import ColumnMap
    >>> tok = ScFoundationTokenizer(GeneVocab(["a", "b", "c"]))
    >>> X = sparse.csr_matrix(np.array([[0, 10, 90]]))
    >>> b = tok.encode(X, ColumnMap.from_token_ids(np.array([4, 5, 6])))
    >>> b.gene_ids.tolist(), [round(float(v), 3) for v in b.values], b.extras["depth_S"].tolist()
    ([5, 6], [6.909, 9.105], [2.0])
    """

    name = "scfoundation"
    _options = ("depth_fold",)

    def __init__(self, vocab: GeneVocab, *, max_len: int | None = None,
                 depth_fold: float = 1.0) -> None:
        super().__init__(vocab, max_len=max_len)
        if depth_fold <= 0:
            msg = "depth_fold must be positive."
            raise ValueError(msg)
        self.depth_fold = depth_fold

    def encode(self, X, cmap, *, start: int = 0, keep_empty: bool = False,
               target_totals: np.ndarray | None = None) -> TokenBatch:
        """As :meth:`Tokenizer.encode`; ``target_totals`` sets T per cell (pretraining).

        In pretraining pass the down-sampled counts as ``X`` and the original cells'
        total counts as ``target_totals``.
        """
        return super().encode(X, cmap, start=start, keep_empty=keep_empty,
                              target_totals=target_totals)

    def _encode(self, block: Block, *, start: int, keep_empty: bool,
                target_totals: np.ndarray | None = None) -> TokenBatch:
        Y, totals = block.counts(require_integers=True)
        with np.errstate(divide="ignore"):  # an empty cell has depth -inf (and is dropped)
            depth_s = np.log10(totals)
        values = np.log1p(normalized(Y, totals))
        offsets, ids = Y.indptr.astype(np.int64), block.cmap.token_ids[Y.indices]
        if self.max_len is not None and np.diff(offsets).max(initial=0) > self.max_len:
            from ._compiled import keep_top

            # the highest values, ranked after log1p as the model sees them
            offsets, ids, values = keep_top(offsets, ids, values, self.max_len)
        if target_totals is None:
            depth_t = depth_s + np.log10(self.depth_fold)
        else:
            with np.errstate(divide="ignore"):
                depth_t = np.log10(np.asarray(target_totals, dtype=np.float64))
        cells = np.arange(start, start + Y.shape[0], dtype=np.int64)
        batch = TokenBatch(ids, values, offsets, cells,
                           {"depth_T": depth_t.astype(np.float32),
                            "depth_S": depth_s.astype(np.float32)})
        return block.drop_empty(batch, Y.indptr, keep_empty=keep_empty)


def downsample_counts(X, fraction: float | np.ndarray, *, seed: int = 0) -> sparse.csr_matrix:
    """Binomial thinning: keep each count with probability ``fraction`` (per cell or global).

    The read-depth augmentation of scFoundation's pretraining: a cell sequenced less
    deeply, with the same expression profile in expectation.

    >>> X = sparse.csr_matrix(np.array([[100, 0, 50]]))
    >>> Y = downsample_counts(X, 0.5, seed=1)
    >>> Y.shape, bool(50 < Y.sum() < 100)
    ((1, 3), True)
    """
    X = sparse.csr_matrix(X, dtype=np.float32, copy=True)
    p = np.asarray(fraction, dtype=np.float64)
    if np.any((p < 0) | (p > 1)):
        msg = "fraction must be within [0, 1]."
        raise ValueError(msg)
    if p.ndim == 1:
        p = p[row_ids(X.indptr)]
    rng = np.random.default_rng(seed)
    X.data = rng.binomial(X.data.astype(np.int64), p).astype(np.float32)
    X.eliminate_zeros()
    return X
