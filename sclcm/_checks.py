"""Input checks shared by every tool: each error says what is wrong and what to do."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from ._errors import InputError
from ._matrix import check_dtype, get_matrix, iter_row_blocks, stored_values

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["InputError", "check_counts", "check_obs_names"]


def _where(adata: AnnData, block, start: int, mask_fn) -> str:
    """Name the first cell and gene where ``mask_fn`` holds, for the error message."""
    if sparse.issparse(block):
        coo = block.tocoo()
        hit = np.flatnonzero(mask_fn(coo.data))[0]
        row, col = coo.row[hit], coo.col[hit]
    else:
        row, col = np.argwhere(mask_fn(block))[0]
    return f"cell {adata.obs_names[start + row]!r}, gene {adata.var_names[col]!r}"


def check_obs_names(adata: AnnData) -> None:
    """Refuse duplicated cell names: results are matched to cells by name downstream
    (``obs`` joins, ``sc.concat``), and error messages name cells."""
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()]
        msg = (f"{len(dup)} cell names are duplicated (e.g. {dup[0]!r}); call "
               "adata.obs_names_make_unique() first.")
        raise InputError(msg)


def check_counts(adata: AnnData, *, layer: str | None = None, max_cells: int | None = None,
                 allow_empty_cells: bool = False) -> None:
    """Check that a matrix holds raw counts that a count-based tool can use.

    Raises :class:`InputError` on: an empty AnnData, duplicated cell names, a
    non-numeric matrix, NaN or infinite values, negative values, non-integer values
    (normalized or log-transformed data), and cells with no counts. Reads the matrix
    in row blocks, so a ``backed="r"`` AnnData is checked in constant memory. Never
    modifies ``adata``.

    Parameters
    ----------
    adata
        The AnnData to check.
    layer
        Check ``adata.layers[layer]`` instead of ``adata.X``.
    max_cells
        Check only the first ``max_cells`` cells (a quick check of a large file).
    allow_empty_cells
        Accept cells whose counts are all zero.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> import sclcm
    >>> adata = ad.AnnData(np.array([[0, 3], [1, 0]], dtype=np.float32))
    >>> sclcm.pp.check_counts(adata)
    >>> adata.X = np.log1p(adata.X)
    >>> sclcm.pp.check_counts(adata)
    Traceback (most recent call last):
    ...
    sclcm.InputError: ...
    """
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if adata.n_obs == 0 or adata.n_vars == 0:
        msg = f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes)."
        raise InputError(msg)
    check_obs_names(adata)
    check_dtype(get_matrix(adata, layer), where)

    n_empty, first_empty, max_value = 0, None, 0.0
    for start, _, block in iter_row_blocks(adata, layer, max_rows=max_cells):
        values = stored_values(block)
        if values.size == 0:
            continue
        if np.issubdtype(values.dtype, np.floating):
            if not np.isfinite(values).all():
                loc = _where(adata, block, start, lambda v: ~np.isfinite(v))
                msg = (f"{where} contains NaN or infinite values (first at {loc}). Counts "
                       "must be finite: fix or drop those cells before calling sclcm.")
                raise InputError(msg)
            if (values < 0).any():
                loc = _where(adata, block, start, lambda v: v < 0)
                msg = (f"{where} contains negative values (first at {loc}): it looks scaled "
                       "or batch-corrected. sclcm needs raw counts: pass layer= the layer "
                       "that holds them, or use adata.raw.to_adata() if X was scaled.")
                raise InputError(msg)
            if (values != np.round(values)).any():
                loc = _where(adata, block, start, lambda v: v != np.round(v))
                kind = ("log-transformed" if values.max() < 30 else "normalized")
                msg = (f"{where} contains non-integer values (first at {loc}): it looks "
                       f"{kind}. sclcm needs raw counts: pass layer= the layer that holds "
                       "them (e.g. layer='counts'), or use adata.raw.to_adata() if it "
                       "holds counts.")
                raise InputError(msg)
        elif (values < 0).any():
            loc = _where(adata, block, start, lambda v: v < 0)
            msg = f"{where} contains negative values (first at {loc}); counts must be >= 0."
            raise InputError(msg)
        max_value = max(max_value, float(values.max()))
        totals = np.asarray(block.sum(axis=1)).ravel()
        empty = np.flatnonzero(totals == 0)
        if empty.size and first_empty is None:
            first_empty = adata.obs_names[start + empty[0]]
        n_empty += empty.size
    if n_empty and not allow_empty_cells:
        msg = (f"{n_empty} cells have no counts (e.g. {first_empty!r}); remove them with "
               "sc.pp.filter_cells(adata, min_counts=1).")
        raise InputError(msg)
    if max_value == 0:
        msg = f"{where} holds only zeros."
        raise InputError(msg)
