"""Shared fixtures: the real datasets (through SCLCM_DATA), settings reset, GPU skipping."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pytest
from scipy import sparse

import sclcm

matplotlib.use("Agg")  # tests draw figures without a screen

DATA = Path(os.environ.get("SCLCM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

PBMC3K = "sctypegsea_10x_pbmc3k_raw_2700"
KANG_CTRL = "muscat2019_kang2018_ctrl_pbmc_8684"
KANG_IFNB = "muscat_kang2018_ifnb_pbmc_1556"
HARMONY = "harmony_kang2018_ifnb_pbmc_2000"
PAPALEXI = "sceptredata_papalexi2021_eccite_lowmoi_20729"
CIDER = "cider_baron2016_pancreas_human_mouse_328"
CHAI_MOUSE = "chai_baron_mouse1_822"
SUPERCELL_MOUSE = "supercell_bastidasponce2019_mouse_pancreas_e15_3696"
ALL_DATASETS = (PBMC3K, KANG_CTRL, KANG_IFNB, HARMONY, PAPALEXI, CIDER, CHAI_MOUSE,
                SUPERCELL_MOUSE)


#: How far one cell's float32 embedding may move with the cells that share its forward pass,
#: the pass's shape, block size, order or thread count (documented in ``tl.embed``): each
#: matrix product may sum in another order (~1e-7 relative per sum, grown by the layer
#: norms of a few layers); 2.4e-5 was seen on a loaded machine, so 1e-4 with margin.
EMBED_TOL = {"rtol": 1e-4, "atol": 1e-4}


def data_path(name: str) -> Path:
    path = DATA / f"{name}.h5ad"
    if not path.exists():
        pytest.skip(f"real dataset {path} not found: set SCLCM_DATA to the shared data folder")
    return path


@cache
def _load(name: str) -> ad.AnnData:
    return ad.read_h5ad(data_path(name))


@pytest.fixture
def load():
    """``load(name)``: a fresh copy of a real dataset (read once per session)."""
    return lambda name: _load(name).copy()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models: they gain nothing from a second, and
    on a busy machine OpenMP's spinning threads made two threads ~10x slower (measured).
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _quiet_settings():
    old = (sclcm.settings.verbosity, sclcm.settings.progress, sclcm.settings.device)
    sclcm.settings.verbosity, sclcm.settings.progress = "warning", False
    yield
    sclcm.settings.verbosity, sclcm.settings.progress, sclcm.settings.device = old


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def snapshot(adata: ad.AnnData) -> dict:
    """What a tool must not change: X, layers, obs, var, obsm, uns keys."""
    return {"X": None if adata.X is None else adata.X.copy(), "obs": adata.obs.copy(),
            "var": adata.var.copy(),
            "layers": {k: v.copy() for k, v in adata.layers.items()},
            "obsm": set(adata.obsm), "varm": set(adata.varm), "uns": set(adata.uns)}


def assert_unchanged(adata: ad.AnnData, before: dict) -> None:
    def same(a, b):
        if a is None or b is None:
            return a is b
        if sparse.issparse(a):
            return (sparse.issparse(b) and a.format == b.format and a.shape == b.shape
                    and np.array_equal(a.indptr, b.indptr)
                    and np.array_equal(a.indices, b.indices)
                    and np.array_equal(a.data, b.data, equal_nan=True))
        return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)

    assert same(adata.X, before["X"])
    assert adata.obs.equals(before["obs"])
    assert adata.var.equals(before["var"])
    assert set(adata.layers) == set(before["layers"])
    assert all(same(adata.layers[k], v) for k, v in before["layers"].items())
    assert set(adata.obsm) == before["obsm"]
    assert set(adata.varm) == before["varm"]
    assert set(adata.uns) == before["uns"]
