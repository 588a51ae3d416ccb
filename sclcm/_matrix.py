"""Access to an AnnData's count matrix in row blocks, in memory or ``backed="r"``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anndata import AnnData

BLOCK_SIZE = 10_000


def get_matrix(adata: AnnData, layer: str | None = None):
    """``adata.X`` or ``adata.layers[layer]``, with a clear error where it is missing."""
    if layer is None:
        if adata.X is None:
            msg = "adata.X is empty; pass layer= the name of the layer that holds counts."
            raise ValueError(msg)
        return adata.X
    if layer not in adata.layers:
        msg = f"layer {layer!r} not found; adata.layers has {list(adata.layers)}."
        raise KeyError(msg)
    return adata.layers[layer]


def iter_row_blocks(adata: AnnData, layer: str | None = None, *, block_size: int = BLOCK_SIZE,
                    max_rows: int | None = None) -> Iterator[tuple[int, int, object]]:
    """Yield ``(start, stop, block)`` over rows; ``block`` is CSR or a dense ndarray.

    Only one block is in memory at a time, so this reads a ``backed="r"`` file in
    constant memory.
    """
    X = get_matrix(adata, layer)
    n = adata.n_obs if max_rows is None else min(adata.n_obs, max_rows)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        block = X[start:stop]
        yield start, stop, sparse.csr_matrix(block) if sparse.issparse(block) else np.asarray(
            block)


def stored_values(block) -> np.ndarray:
    """The explicitly stored values of a block (``data`` of a sparse block)."""
    return block.data if sparse.issparse(block) else np.asarray(block).ravel()


def column_sums(adata: AnnData, layer: str | None = None) -> np.ndarray:
    """Total of each column as float64, streaming over row blocks."""
    total = np.zeros(adata.n_vars, dtype=np.float64)
    for _, _, block in iter_row_blocks(adata, layer):
        total += np.asarray(block.sum(axis=0, dtype=np.float64)).ravel()
    return total
