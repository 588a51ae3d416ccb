"""Access to an AnnData's count matrix in row blocks, in memory or ``backed="r"``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from ._errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anndata import AnnData

BLOCK_SIZE = 10_000


def get_matrix(adata: AnnData, layer: str | None = None):
    """``adata.X`` or ``adata.layers[layer]``, with a clear error where it is missing."""
    if layer is None:
        if adata.X is None:
            msg = (f"adata.X is empty; pass layer= the name of the layer that holds counts "
                   f"(adata.layers has {list(adata.layers)}).")
            raise InputError(msg)
        return adata.X
    if layer not in adata.layers:
        msg = f"layer {layer!r} not found; adata.layers has {list(adata.layers)}."
        raise KeyError(msg)
    return adata.layers[layer]


def check_dtype(X, where: str = "adata.X") -> None:
    """Refuse a matrix whose values cannot be counts (bool, complex, object, strings)."""
    dtype = X.dtype
    if np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating):
        return
    hint = (" A boolean matrix is binarized, not counts: if its ones are counts, pass "
            "X.astype(np.float32)." if dtype == np.bool_ else "")
    msg = f"{where} has dtype {dtype}; counts must be integers or floats.{hint}"
    raise InputError(msg)


def canonical_csr(X) -> sparse.csr_matrix:
    """``X`` (a block of rows: any scipy sparse format, or dense) as a canonical CSR matrix.

    Canonical: sorted column indices, no duplicate entries (scipy allows them and sums
    them in arithmetic, ``write_h5ad`` keeps them; a tokenizer reading the stored entries
    would make one token per copy), signed indices (tiledbsoma-ml returns unsigned ones),
    and float16 raised to float32 (scipy's sparse formats have no float16). ``X`` is never
    modified: anything that must change is done on a copy.
    """
    if sparse.issparse(X):
        Y = X if isinstance(X, sparse.csr_matrix) else sparse.csr_matrix(X)
    else:
        arr = np.asarray(X)
        Y = sparse.csr_matrix(arr.astype(np.float32) if arr.dtype == np.float16 else arr)
    if Y.indices.dtype.kind == "u" or Y.indptr.dtype.kind == "u":
        Y = sparse.csr_matrix((Y.data, Y.indices.astype(np.int64), Y.indptr.astype(np.int64)),
                              shape=Y.shape)
    if not Y.has_canonical_format:
        Y = Y.copy()  # sum_duplicates works in place; the arrays may be the caller's
        Y.sum_duplicates()
    return Y


def iter_row_blocks(adata: AnnData, layer: str | None = None, *, block_size: int = BLOCK_SIZE,
                    max_rows: int | None = None, desc: str | None = None
                    ) -> Iterator[tuple[int, int, object]]:
    """Yield ``(start, stop, block)`` over rows; ``block`` is canonical CSR (see
    :func:`canonical_csr`) for sparse input, else a dense ndarray (float16 as float32).

    Only one block is in memory at a time, so this reads a ``backed="r"`` file in
    constant memory. ``desc`` shows a progress bar of cells with that label.
    """
    if desc is not None:
        from ._progress import progress

        n = adata.n_obs if max_rows is None else min(adata.n_obs, max_rows)
        yield from progress(iter_row_blocks(adata, layer, block_size=block_size,
                                            max_rows=max_rows),
                            total=n, desc=desc, unit="cells", size=lambda b: b[1] - b[0])
        return
    X = get_matrix(adata, layer)
    n = adata.n_obs if max_rows is None else min(adata.n_obs, max_rows)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        block = X[start:stop]
        if sparse.issparse(block):
            yield start, stop, canonical_csr(block)
        else:
            block = np.asarray(block)
            yield start, stop, block.astype(np.float32) if block.dtype == np.float16 else block


def stored_values(block) -> np.ndarray:
    """The explicitly stored values of a block (``data`` of a sparse block)."""
    return block.data if sparse.issparse(block) else np.asarray(block).ravel()


def column_sums(adata: AnnData, layer: str | None = None) -> np.ndarray:
    """Total of each column as float64, streaming over row blocks."""
    total = np.zeros(adata.n_vars, dtype=np.float64)
    for _, _, block in iter_row_blocks(adata, layer):
        total += np.asarray(block.sum(axis=0, dtype=np.float64)).ravel()
    return total
