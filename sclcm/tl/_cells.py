"""The cells of an AnnData as the model's tokens, block by block (shared by the tools)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .._checks import InputError
from .._matrix import iter_row_blocks
from .._progress import progress

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anndata import AnnData

    from ..genes import GeneReport
    from ..tokenizers import ColumnMap, TokenBatch, Tokenizer


@dataclass
class CellTokens:
    """How an AnnData's columns feed a tokenizer, and its cells block by block.

    Attributes
    ----------
    tokenizer
        The model's tokenizer.
    report
        Gene resolution of the AnnData.
    column_map
        Column -> token slot (genes outside the vocabulary dropped).
    gene_coverage
        Share of the AnnData's genes that reach a token.
    """

    adata: AnnData
    tokenizer: Tokenizer
    report: GeneReport
    column_map: ColumnMap
    layer: str | None = None

    @classmethod
    def prepare(cls, adata: AnnData, tokenizer: Tokenizer, *, layer: str | None = None,
                report: GeneReport | None = None) -> CellTokens:
        """Resolve genes once and map the columns to ``tokenizer``'s tokens.

        Raises :class:`~sclcm.InputError` for an empty AnnData, a missing layer or no gene
        of the vocabulary.
        """
        from ..genes import resolve

        if adata.n_obs == 0 or adata.n_vars == 0:
            msg = f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes)."
            raise InputError(msg)
        if layer is not None and layer not in adata.layers:
            msg = f"layer {layer!r} is not in adata.layers ({list(adata.layers)})."
            raise InputError(msg)
        if report is None:
            report = resolve(adata, count_coverage=False)
        cmap = tokenizer.column_map(adata, report=report)  # raises on no overlap
        return cls(adata, tokenizer, report, cmap, layer)

    @property
    def gene_coverage(self) -> float:
        return float((self.column_map.slot >= 0).mean())

    def batches(self, *, block_size: int = 2048, desc: str | None = None
                ) -> Iterator[tuple[int, TokenBatch, np.ndarray]]:
        """Yield ``(first_row, batch, empty)`` per block of rows, with a progress bar.

        Every cell of the block is in ``batch`` (cells without a vocabulary gene keep
        only their special tokens; ``empty`` marks them), so row ``i`` of the block is
        cell ``i`` of the batch. Memory is one block, whatever the number of cells.
        """
        n_blocks = -(-self.adata.n_obs // block_size)
        blocks = iter_row_blocks(self.adata, self.layer, block_size=block_size)
        for first, _, block in progress(blocks, total=n_blocks, desc=desc, unit="block"):
            batch = self.tokenizer.encode(block, self.column_map, start=first, keep_empty=True)
            yield first, batch, _empty_cells(batch, self.tokenizer)


def _empty_cells(batch: TokenBatch, tokenizer: Tokenizer) -> np.ndarray:
    """Cells of ``batch`` with no gene token (only special tokens)."""
    is_gene = batch.gene_ids >= len(tokenizer.vocab.special_tokens)
    genes = np.add.reduceat(is_gene, batch.offsets[:-1]) if len(is_gene) else \
        np.zeros(batch.n_cells, np.int64)
    genes[np.diff(batch.offsets) == 0] = 0  # reduceat repeats the next value on empty rows
    return genes == 0
