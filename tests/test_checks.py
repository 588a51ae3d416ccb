"""sclcm.pp.check_counts: every bad input gets an error that says what to do."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from conftest import PAPALEXI, PBMC3K, assert_unchanged, data_path, snapshot
from scipy import sparse

import sclcm
from sclcm import InputError
from sclcm.pp import check_counts

COUNTS = np.array([[0, 3, 1], [2, 0, 0], [5, 1, 7]])


@pytest.fixture(params=["dense", "csr", "csc"])
def to_matrix(request):
    return {"dense": np.asarray, "csr": sparse.csr_matrix, "csc": sparse.csc_matrix}[request.param]


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32, np.float64, np.uint16])
def test_counts_pass(to_matrix, dtype):
    check_counts(ad.AnnData(to_matrix(COUNTS.astype(dtype))))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.nan, r"NaN or infinite values \(first at cell '1', gene '0'\)"),
        (np.inf, "NaN or infinite"),
        (-1.0, "negative values .* looks scaled"),
        (0.5, "non-integer values .* log-transformed.*layer="),
        (1234.5, "non-integer values .* normalized"),
    ],
)
def test_bad_values(to_matrix, value, match):
    X = COUNTS.astype(np.float32)
    X[1, 0] = value
    adata = ad.AnnData(to_matrix(X))
    before = snapshot(adata)
    with pytest.raises(InputError, match=match):
        check_counts(adata)
    assert_unchanged(adata, before)


def test_negative_integers(to_matrix):
    X = COUNTS.copy()
    X[0, 0] = -2
    with pytest.raises(InputError, match="negative"):
        check_counts(ad.AnnData(to_matrix(X)))


def test_empty_cells(to_matrix):
    X = COUNTS.copy()
    X[1] = 0
    adata = ad.AnnData(to_matrix(X))
    with pytest.raises(InputError, match=r"1 cells have no counts .*filter_cells"):
        check_counts(adata)
    check_counts(adata, allow_empty_cells=True)


def test_duplicated_cell_names():
    with pytest.warns(UserWarning, match="not unique"):
        adata = ad.AnnData(COUNTS.astype(np.float32), obs=pd.DataFrame(index=["a", "b", "a"]))
    with pytest.raises(InputError, match="obs_names_make_unique"):
        check_counts(adata)


def test_empty_anndata():
    with pytest.raises(InputError, match="empty"):
        check_counts(ad.AnnData(np.zeros((0, 3), dtype=np.float32)))


def test_all_zero():
    with pytest.raises(InputError, match="no counts"):
        check_counts(ad.AnnData(np.zeros((2, 3), dtype=np.float32)))


def test_non_numeric():
    adata = ad.AnnData(np.array([[True, False]]))
    with pytest.raises(InputError, match="dtype bool"):
        check_counts(adata)


def test_layer():
    adata = ad.AnnData(np.log1p(COUNTS.astype(np.float32)))
    adata.layers["counts"] = COUNTS.astype(np.float32)
    with pytest.raises(InputError):
        check_counts(adata)
    check_counts(adata, layer="counts")
    with pytest.raises(KeyError, match="layer 'raw' not found"):
        check_counts(adata, layer="raw")


def test_real_counts_pass_and_normalized_real_data_fails(load):
    adata = load(PBMC3K)[:500]
    adata = adata[:, adata.X.sum(axis=0).A1 > 0].copy()
    check_counts(adata)
    sc.pp.normalize_total(adata, target_sum=1e4)
    with pytest.raises(InputError, match="normalized"):
        check_counts(adata)
    sc.pp.log1p(adata)
    with pytest.raises(InputError, match="log-transformed"):
        check_counts(adata)
    adata.X = adata.X.toarray()
    sc.pp.scale(adata, max_value=10)
    with pytest.raises(InputError, match="negative values"):
        check_counts(adata)


def test_backed_file_checked_in_blocks(monkeypatch):
    import sclcm._matrix as m

    monkeypatch.setattr(m, "BLOCK_SIZE", 1000)  # 21 blocks over the 20,729 cells
    backed = ad.read_h5ad(data_path(PAPALEXI), backed="r")
    try:
        check_counts(backed, allow_empty_cells=True)
        check_counts(backed, max_cells=500, allow_empty_cells=True)
    finally:
        backed.file.close()


def test_input_error_is_a_value_error():
    assert issubclass(sclcm.InputError, ValueError)
