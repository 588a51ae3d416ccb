"""Geneformer's rank-value encoding (Theodoris et al., Nature 2023; Chen et al. 2024 for V2).

A cell becomes its expressed genes ranked by normalized expression: counts / the cell's
total counts * 10,000 / the gene's non-zero median over the pretraining corpus, highest
first. The corpus median puts housekeeping genes, high everywhere, below genes that are
high here but not usually, which is what distinguishes a cell state.

V2 (default): ``<cls>`` genes ... ``<eos>``, truncated to ``max_len`` (4,096) tokens.
V1: 2,048 tokens, no special tokens (``special_tokens=False``).
Ties in normalized value are broken by token id, ascending (deterministic; Geneformer's
own argsort leaves them to the sort algorithm).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import logging as logg
from .._matrix import iter_row_blocks
from ._base import ColumnMap, Tokenizer, normalized, prepare_block
from ._medians import ExactMedians, HistogramMedians

if TYPE_CHECKING:
    from collections.abc import Iterable

    from anndata import AnnData

    from ..genes import GeneReport, GeneVocab
    from ._base import Block
    from ._batch import TokenBatch



class GeneformerTokenizer(Tokenizer):
    """Rank-value encoding of Geneformer.

    Parameters
    ----------
    vocab
        The gene vocabulary (Ensembl IDs).
    medians
        Non-zero median of normalized expression per gene of ``vocab.genes`` (NaN where
        unknown); genes without a median are not tokenized. Fit with :meth:`fit`.
    max_len
        Tokens per cell, special tokens included.
    special_tokens
        ``<cls>`` first and ``<eos>`` last (V2); ``False`` for V1.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> from sclcm.genes import GeneVocab
    >>> from sclcm.tokenizers import GeneformerTokenizer
    >>> from sclcm.tokenizers._base import ColumnMap
    >>> vocab = GeneVocab(["g1", "g2", "g3"])             # token ids 4, 5, 6
    >>> tok = GeneformerTokenizer(vocab, medians=np.array([1.0, 2.0, 4.0]))
    >>> X = sparse.csr_matrix(np.array([[10, 10, 80]]))   # totals 100 -> x100 to 10,000
    >>> batch = tok.encode(X, ColumnMap.from_token_ids(np.array([4, 5, 6])))
    >>> batch.gene_ids.tolist()   # g3: 8000/4, g1: 1000/1, g2: 1000/2
    [2, 6, 4, 5, 3]
    >>> batch.values.tolist()
    [0.0, 2000.0, 1000.0, 500.0, 0.0]
    """

    name = "geneformer"
    _options = ("special_tokens",)
    _arrays = ("medians",)

    def __init__(self, vocab: GeneVocab, medians: np.ndarray | None = None, *,
                 max_len: int = 4096, special_tokens: bool = True) -> None:
        super().__init__(vocab, max_len=max_len)
        self.special_tokens = special_tokens
        n_special = 2 if special_tokens else 0
        if max_len <= n_special:
            msg = f"max_len must exceed the {n_special} special tokens."
            raise ValueError(msg)
        if special_tokens:
            vocab.cls_id, vocab.eos_id  # noqa: B018 (fail early if the vocab lacks them)
        if medians is not None:
            medians = np.asarray(medians, dtype=np.float64)
            if medians.shape != (vocab.n_genes,):
                msg = (f"medians must have one value per vocabulary gene ({vocab.n_genes}), "
                       f"not shape {medians.shape}.")
                raise ValueError(msg)
        self.medians = medians

    @classmethod
    def v1(cls, vocab: GeneVocab, medians: np.ndarray | None = None) -> GeneformerTokenizer:
        """Geneformer V1: 2,048 tokens, no special tokens."""
        return cls(vocab, medians, max_len=2048, special_tokens=False)

    # --- medians ---------------------------------------------------------------
    def _inverse_medians(self) -> np.ndarray:
        """1 / median per token id (0 for special tokens and genes without a median)."""
        if self.medians is None:
            msg = "This tokenizer has no gene medians: call .fit(adata) or pass medians=."
            raise ValueError(msg)
        inv = np.zeros(len(self.vocab), dtype=np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            m = 1.0 / self.medians
        m[~np.isfinite(m) | (m <= 0)] = 0
        inv[len(self.vocab.special_tokens):] = m
        return inv

    def token_ids_of_genes(self, ids: np.ndarray) -> np.ndarray:
        ids = ids.copy()
        if self.medians is not None:
            inv = self._inverse_medians()
            ids[(ids >= 0) & (inv[np.maximum(ids, 0)] == 0)] = -1
        return ids

    def fit(self, adata: AnnData, *, layer: str | None = None, report: GeneReport | None = None,
            method: str = "auto", max_exact_nnz: int = 200_000_000) -> GeneformerTokenizer:
        """Set ``medians`` from the non-zero normalized expression in ``adata``.

        Parameters
        ----------
        adata
            The corpus (in memory or ``backed="r"``), read in row blocks.
        method
            ``"exact"``, ``"histogram"`` (streaming, constant memory, within 0.9% of the
            exact median; see ``sclcm.tokenizers._medians``) or ``"auto"``: exact up to
            ``max_exact_nnz`` stored values.
        """
        saved, self.medians = self.medians, None
        try:
            cmap = self.column_map(adata, report=report)
        finally:
            self.medians = saved
        if method == "auto":
            method = "exact" if _stored_values(adata, layer) <= max_exact_nnz else "histogram"
        start = logg.info(f"fitting Geneformer gene medians ({method}) over {adata.n_obs} cells")
        blocks = ((block, cmap) for _, _, block in iter_row_blocks(adata, layer,
                                                                   desc="gene medians"))
        self.fit_blocks(blocks, method=method)
        logg.info(f"    medians for {int(np.isfinite(self.medians).sum())} genes", time=start)
        return self

    def fit_blocks(self, blocks: Iterable[tuple[object, ColumnMap]], *,
                   method: str = "histogram") -> GeneformerTokenizer:
        """Set ``medians`` from a stream of ``(counts block, ColumnMap)`` pairs.

        For corpora that do not fit one AnnData (e.g. cells streamed from the Census):
        blocks may come from different sources, each with its own column map onto this
        vocabulary. ``method="histogram"`` keeps memory constant (see :meth:`fit`).
        """
        n_special = len(self.vocab.special_tokens)
        acc = {"exact": ExactMedians, "histogram": HistogramMedians}[method](self.vocab.n_genes)
        for block, cmap in blocks:
            Y, totals = prepare_block(block, cmap, require_integers=True, sort=False)
            # accumulate by vocabulary gene, so blocks with different columns add up
            acc.update(cmap.token_ids[Y.indices] - n_special, normalized(Y, totals))
        self.medians = acc.result()
        return self

    # --- encoding --------------------------------------------------------------
    def _encode(self, block: Block, *, start: int, keep_empty: bool) -> TokenBatch:
        from ._compiled import rank_block

        token_ids = block.cmap.token_ids
        specials = (self.vocab.cls_id, self.vocab.eos_id) if self.special_tokens else (-1, -1)
        n_keep = self.max_len - (2 if self.special_tokens else 0)
        out = block.outputs(block.n_stored + 2 * block.n_cells)
        n_tokens, n_cells, flags = rank_block(
            *block.kernel_args(), len(token_ids), self._inverse_medians()[token_ids],
            token_ids, n_keep, *specials, keep_empty, start,
            block.fatal(require_integers=True), *out)
        block.check(flags, require_integers=True)
        return block.batch(out, n_tokens, n_cells)


def _stored_values(adata: AnnData, layer: str | None) -> int:
    from .._matrix import get_matrix

    X = get_matrix(adata, layer)
    nnz = getattr(X, "nnz", None)
    return int(nnz) if nnz is not None else adata.n_obs * adata.n_vars
