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

from ._base import Tokenizer

if TYPE_CHECKING:
    from ..genes import GeneVocab
    from ._base import Block
    from ._batch import TokenBatch

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

    def _encode(self, block: Block, *, start: int, keep_empty: bool) -> TokenBatch:
        from ._compiled import bin_block

        token_ids = block.cmap.token_ids
        # room for <cls> and each cell's genes: its stored ones, or every slot (at most
        # max_len - 1) with zeros
        room = (block.n_cells * (1 + min(len(token_ids), self.max_len - 1))
                if self.include_zero_genes else block.n_cells + block.n_stored)
        out = block.outputs(room)
        n_tokens, n_cells, flags = bin_block(
            *block.kernel_args(), token_ids, block.cmap.slot_bits, self.n_bins, self.binned,
            self.include_zero_genes, self.max_len - 1, self.vocab.cls_id, float(self.cls_value),
            self.seed * 2 + _TIES, self.seed * 2 + _SUBSAMPLE, keep_empty, start,
            block.fatal(require_integers=self.requires_counts), *out)
        block.check(flags, require_integers=self.requires_counts)
        batch = block.batch(out, n_tokens, n_cells)
        if not self.binned:  # the kernel gave normalized counts; NumPy's log1p as scGPT's
            first = batch.offsets[:-1]
            batch.values[first] = 0.0  # cls_value may lie below -1 (scGPT feeds -2)
            np.log1p(batch.values, out=batch.values)
            batch.values[first] = self.cls_value
        return batch
