"""scGPT's per-cell value binning (Cui et al., Nature Methods 2024).

Each cell's non-zero values are binned by the quantiles of that cell's own non-zero
values: edges ``np.quantile(nonzero, np.linspace(0, 1, n_bins - 1))``; a value gets
``np.digitize`` of it, with ties on an edge broken at random between the two bins it
touches (scGPT's ``_digitize``): digits 1..n_bins-1, 0 reserved for zero. The sequence is
``<cls>`` (value ``cls_value``) followed by the genes in vocabulary order; a cell longer
than ``max_len`` keeps a random subset of ``max_len - 1`` genes.

Binning follows scGPT's preprocessing of log1p-normalized data, but runs on the counts:
per-cell quantile bins are the same under any strictly increasing per-cell transform
(an interpolated edge lies strictly between two distinct values, or equals a value, in
either scale), and counts are exact integers. The random draws come from a hash of
``(seed, cell, gene)``, so results do not depend on how cells are split into blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._base import Tokenizer, normalized
from ._batch import TokenBatch
from ._kernels import (
    SLOT_BITS,
    add_special_tokens,
    keep_first,
    positions_in_row,
    row_ids,
    sort_within_rows,
    uniform,
)

if TYPE_CHECKING:
    from scipy import sparse

    from ..genes import GeneVocab

# Stream ids for the hash, so tie-breaking and subsampling draw independent numbers.
_TIES, _SUBSAMPLE = 0, 1


class ScGPTTokenizer(Tokenizer):
    """Per-cell quantile binning of scGPT.

    Parameters
    ----------
    vocab
        The gene vocabulary.
    max_len
        Tokens per cell including ``<cls>`` (scGPT pretrained with 1,200).
    n_bins
        Number of value bins including bin 0 for zero (51 in scGPT).
    binned
        ``False`` gives scGPT's continuous values, log1p(counts / total * 10,000),
        instead of bins.
    include_zero_genes
        Also emit the vocabulary genes of the data that are zero in a cell (value 0).
    cls_value
        Value of the ``<cls>`` token.
    seed
        Seeds tie-breaking and subsampling.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> from sclcm.genes import GeneVocab
    >>> from sclcm.tokenizers import ScGPTTokenizer
    >>> from sclcm.tokenizers._base import ColumnMap
    >>> tok = ScGPTTokenizer(GeneVocab(["a", "b", "c", "d", "e"]), n_bins=5)
    >>> X = sparse.csr_matrix(np.array([[0, 1, 2, 3, 4]]))   # edges 1, 2, 3, 4
    >>> batch = tok.encode(X, ColumnMap.from_token_ids(np.arange(4, 9)))
    >>> batch.gene_ids.tolist(), batch.values.tolist()
    ([2, 5, 6, 7, 8], [0.0, 1.0, 2.0, 3.0, 4.0])
    """

    name = "scgpt"
    _options = ("n_bins", "binned", "include_zero_genes", "cls_value", "seed")

    def __init__(self, vocab: GeneVocab, *, max_len: int = 1200, n_bins: int = 51,
                 binned: bool = True, include_zero_genes: bool = False,
                 cls_value: float = 0.0, seed: int = 0) -> None:
        super().__init__(vocab, max_len=max_len)
        if n_bins < 3:
            msg = "n_bins must be at least 3 (bin 0 for zero and two edges)."
            raise ValueError(msg)
        if max_len < 2:
            msg = "max_len must leave room for <cls> and a gene."
            raise ValueError(msg)
        vocab.cls_id  # noqa: B018 (fail early without <cls>)
        self.n_bins, self.binned = n_bins, binned
        self.include_zero_genes, self.cls_value, self.seed = include_zero_genes, cls_value, seed

    @property
    def requires_counts(self) -> bool:  # type: ignore[override]
        # bins are invariant to per-cell normalization; continuous values are not
        return not self.binned

    def bin_values(self, Y: sparse.csr_matrix, cells: np.ndarray,
                   token_ids: np.ndarray) -> np.ndarray:
        """Bin of each stored value of ``Y`` (1..n_bins-1), per cell's quantile edges.

        Edges are the linear-interpolation quantiles at ``k / (n_bins - 2)``, computed
        exactly: with ``D = n_bins - 2`` and a cell's sorted values ``s``, edge ``k`` times
        ``D`` is the integer ``s[lo] * D + (s[lo+1] - s[lo]) * rem`` where ``lo, rem =
        divmod(k * (n - 1), D)``, and integer values are compared with it exactly.
        (``np.quantile`` computes the same edges in floating point, and can put an edge a
        rounding error off a value.) ``cells`` and ``token_ids`` pick the tie draws.
        """
        values = Y.data
        if not np.array_equal(values, np.round(values)) or values.max(initial=0) >= 2**24:
            # non-integer (or beyond float32's integers): the dense rank of each value in
            # the block orders and ties exactly like the values, and quantile bins only
            # depend on the order
            values = np.unique(values, return_inverse=True)[1]
        values = values.astype(np.int64)
        indptr = Y.indptr.astype(np.int64)
        n_rows, n_edges, D = Y.shape[0], self.n_bins - 1, self.n_bins - 2
        n = np.diff(indptr)
        # one sort of (row, value, entry) keys: each row's values ascending, and where
        # each came from
        local = positions_in_row(indptr)
        ordered_vals, ordered_local = sort_within_rows(indptr, values.astype(np.float32),
                                                       local, descending=False)
        ordered = ordered_vals.astype(np.int64)
        # edge k of a row, times D: s[lo] * D + (s[lo+1] - s[lo]) * rem (exact integers)
        lo, rem = np.divmod(np.arange(n_edges)[None, :] * np.maximum(n - 1, 0)[:, None], D)
        hi = np.minimum(lo + 1, np.maximum(n - 1, 0)[:, None])
        base = indptr[:-1, None]
        last = max(len(ordered) - 1, 0)
        a = ordered[np.minimum(base + lo, last)] if len(ordered) else np.zeros_like(lo)
        b = ordered[np.minimum(base + hi, last)] if len(ordered) else np.zeros_like(lo)
        scaled_edges = a * D + (b - a) * rem
        # where each edge falls among the row's sorted values (few queries: 50 a row)
        span = (int(values.max(initial=0)) + 1) * D
        row_off = np.arange(n_rows, dtype=np.int64) * span
        sorted_keys = ordered * D + np.repeat(row_off, n)
        edge_keys = (scaled_edges + row_off[:, None]).ravel()
        below = np.searchsorted(sorted_keys, edge_keys, side="left")   # values <  edge
        upto = np.searchsorted(sorted_keys, edge_keys, side="right")   # values <= edge
        has_values = np.repeat(n > 0, n_edges)
        # value at sorted position j: edges <= v  <=>  (values < edge) <= j, and
        # edges < v  <=>  (values <= edge) <= j; count with a histogram and a cumsum
        left = _count_upto(below[has_values], len(ordered))
        right = _count_upto(upto[has_values], len(ordered))
        edges_before = np.cumsum(np.r_[0, np.where(n > 0, n_edges, 0)])[:-1]
        row_base = np.repeat(edges_before, n)
        left -= row_base
        right -= row_base
        # back from sorted order to the entries' own order
        source = np.repeat(indptr[:-1], n) + ordered_local
        digits = np.empty(len(left), dtype=np.float32)
        digits[source] = left
        # a value on an edge is drawn at random between the bins it touches: scGPT's
        # ceil(u * (right - left) + left) = left - floor(u * (left - right))
        tie = np.flatnonzero(left != right)
        if len(tie):
            src = source[tie]
            u = uniform(self.seed * 2 + _TIES, cells[row_ids(indptr)[src]],
                        token_ids[Y.indices[src]])
            digits[src] = left[tie] - np.floor(u * (left[tie] - right[tie]))
        return digits

    def _encode(self, Y: sparse.csr_matrix, totals: np.ndarray, token_ids: np.ndarray, *,
                start: int) -> TokenBatch:
        cells = np.arange(start, start + Y.shape[0], dtype=np.int64)
        if self.binned:
            values = self.bin_values(Y, cells, token_ids)
        else:
            values = np.log1p(normalized(Y, totals))
        indptr, slots = Y.indptr.astype(np.int64), Y.indices.astype(np.int64)
        if self.include_zero_genes:
            n_slots = len(token_ids)
            full = np.zeros((Y.shape[0], n_slots), dtype=np.float32)
            full[row_ids(indptr), slots] = values
            values = full.ravel()
            slots = np.tile(np.arange(n_slots, dtype=np.int64), Y.shape[0])
            indptr = np.arange(Y.shape[0] + 1, dtype=np.int64) * n_slots
        values, slots, indptr = self._subsample(indptr, values, slots, cells, token_ids)
        ids, values, offsets = add_special_tokens(indptr, token_ids[slots], values,
                                                  first=self.vocab.cls_id, last=None,
                                                  first_value=self.cls_value)
        return TokenBatch(ids, values, offsets, cells)

    def _subsample(self, indptr, values, slots, cells, token_ids):
        """Keep ``max_len - 1`` random genes of longer cells, in vocabulary order.

        Slots must ascend within each row; only the rows that are too long are sorted.
        """
        n_keep = self.max_len - 1
        lengths = np.diff(indptr)
        long = lengths > n_keep
        if not long.any():
            return values, slots, indptr
        rows = row_ids(indptr)
        in_long = long[rows]
        sub_indptr = np.zeros(long.sum() + 1, dtype=np.int64)
        np.cumsum(lengths[long], out=sub_indptr[1:])
        sub_slots = slots[in_long]
        u = uniform(self.seed * 2 + _SUBSAMPLE, cells[rows[in_long]], token_ids[sub_slots])
        _, shuffled = sort_within_rows(sub_indptr, u.astype(np.float32), sub_slots,
                                       descending=False)
        first, chosen_indptr = keep_first(sub_indptr, n_keep)
        chosen_rows = np.flatnonzero(long)[row_ids(chosen_indptr)]
        # (row, slot) keys ascend over all entries, so the chosen ones are found by search
        full_key = (rows << SLOT_BITS) | slots
        keep = ~in_long
        keep[np.searchsorted(full_key, (chosen_rows << SLOT_BITS) | shuffled[first])] = True
        new_indptr = np.zeros_like(indptr)
        np.cumsum(np.minimum(lengths, n_keep), out=new_indptr[1:])
        return values[keep], slots[keep], new_indptr


def _count_upto(positions: np.ndarray, n: int) -> np.ndarray:
    """For each index ``j < n``: how many ``positions`` are ``<= j`` (a cumulative histogram).

    Positions are global indices into the sorted values; every edge of a row counts for
    the whole array from its position on, so callers subtract the edges of earlier rows.
    """
    hist = np.bincount(positions, minlength=n + 1)[:n]
    return np.cumsum(hist)
