"""What the tools tell users about inputs that work but need care, and what they guarantee:
NaN rows with the way to drop them, low count coverage, slow bf16, shipped names, and a
cell's embedding independent of the cells around it."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from conftest import EMBED_TOL, KANG_IFNB, data_path

import sclcm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    full = ad.read_h5ad(data_path(KANG_IFNB))
    return full[np.random.default_rng(0).choice(full.n_obs, 60, replace=False)].copy()


@pytest.fixture(scope="module")
def model():
    return sclcm.tl.get_model(device="cpu")


def _warnings(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_nan_rows_warn_with_a_fix_that_lets_neighbors_run(cells, model, caplog):
    adata = cells.copy()
    X = adata.X.tolil()
    X[[3, 7], :] = 0
    adata.X = X.tocsr()
    with caplog.at_level(logging.WARNING, logger="sclcm"):
        sclcm.tl.embed(adata, model)
    text = _warnings(caplog)
    assert "2 of 60 cells have no count" in text
    assert "sc.pp.neighbors" in text
    with pytest.raises(ValueError, match="NaN"):
        sc.pp.neighbors(adata, use_rep="X_sclcm")  # what users hit before
    # the warning's own fix, as written
    fix = text.split("Drop them before neighbors: ", 1)[1].split(" (or", 1)[0]
    scope = {"adata": adata, "np": np}
    exec(fix, scope)
    adata = scope["adata"]
    assert adata.n_obs == 58
    sc.pp.neighbors(adata, use_rep="X_sclcm")
    assert adata.obsp["connectivities"].shape == (58, 58)


def _hide_top_genes(cells: ad.AnnData, share_hidden: float) -> ad.AnnData:
    """A copy whose genes carrying ``share_hidden`` of the counts have names no table knows."""
    adata = cells.copy()
    share = np.asarray(adata.X.sum(0)).ravel() / adata.X.sum()
    order = np.argsort(-share)
    hidden = order[: np.searchsorted(np.cumsum(share[order]), share_hidden) + 1]
    names = adata.var_names.to_numpy().copy()
    names[hidden] = [f"NOT_A_GENE_{i}" for i in range(len(hidden))]
    adata.var_names = names
    adata.var = adata.var.iloc[:, :0]  # no ID or symbol column to resolve them by
    return adata


def test_low_count_coverage_warns_with_the_share(cells, model, caplog):
    with caplog.at_level(logging.WARNING, logger="sclcm"):
        sclcm.tl.embed(cells.copy(), model)
    assert "reach the model's vocabulary" not in _warnings(caplog)
    adata = _hide_top_genes(cells, 0.3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sclcm"):
        sclcm.tl.embed(adata, model)
    coverage = adata.uns["sclcm"]["count_coverage"]
    assert coverage < 0.72
    assert f"only {coverage:.0%} of the counts" in _warnings(caplog)


def test_perturb_warns_on_low_count_coverage_too(cells, model, caplog):
    adata = _hide_top_genes(cells[:8], 0.3)
    gene = "CD74"  # expressed in these cells, and not among the hidden genes
    assert gene in adata.var_names
    with caplog.at_level(logging.WARNING, logger="sclcm"):
        sclcm.tl.perturb(cells[:8].copy(), [gene], model=model, n_null=2)
    assert "reach the model's vocabulary" not in _warnings(caplog)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sclcm"):
        sclcm.tl.perturb(adata, [gene], model=model, n_null=2)
    assert "of the counts (and" in _warnings(caplog)


def test_bf16_on_a_cpu_without_native_bf16_warns(cells, model, caplog, monkeypatch):
    from sclcm.tl import _forward

    monkeypatch.setattr(_forward, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="sclcm"):
        sclcm.tl.embed(cells[:4].copy(), model, precision="bfloat16")
    assert "without native bf16" in _warnings(caplog)
    caplog.clear()
    monkeypatch.setattr(_forward, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="sclcm"):
        sclcm.tl.embed(cells[:4].copy(), model, precision="bfloat16")
    assert "without native bf16" not in _warnings(caplog)


def test_shipped_names_load_as_the_tools_load_them():
    model = sclcm.models.CellModel.from_pretrained(sclcm.tl.DEFAULT_MODEL)
    assert model.tokenizer is not None
    with pytest.raises(ValueError, match=f"replaced by '{sclcm.tl.DEFAULT_MODEL}'"):
        sclcm.models.CellModel.from_pretrained("sclcm-pbmc-small")
    with pytest.raises(ValueError, match=r"neither a model directory.*a shipped model"):
        sclcm.models.CellModel.from_pretrained("sclcm-smal")


def test_a_cells_embedding_does_not_depend_on_the_cells_around_it(cells, model):
    """Order, forward-pass size and which other cells are embedded change nothing beyond
    the documented float32 tolerance (scGPT's users report otherwise, scGPT#281)."""
    want = sclcm.tl.embed(cells, model, copy=True).obsm["X_sclcm"]
    order = np.random.default_rng(1).permutation(cells.n_obs)
    shuffled = sclcm.tl.embed(cells[order].copy(), model, copy=True).obsm["X_sclcm"]
    np.testing.assert_allclose(shuffled, want[order], **EMBED_TOL)
    one_by_one = sclcm.tl.embed(cells, model, batch_size=1, copy=True).obsm["X_sclcm"]
    np.testing.assert_allclose(one_by_one, want, **EMBED_TOL)
    alone = sclcm.tl.embed(cells[[5]].copy(), model, copy=True).obsm["X_sclcm"]
    np.testing.assert_allclose(alone[0], want[5], **EMBED_TOL)
    with_others = ad.concat([cells, ad.read_h5ad(data_path(KANG_IFNB))[:200]],
                            index_unique="-", merge="same")  # keeps var's gene IDs
    mixed = sclcm.tl.embed(with_others, model, copy=True).obsm["X_sclcm"]
    np.testing.assert_allclose(mixed[: cells.n_obs], want, **EMBED_TOL)
