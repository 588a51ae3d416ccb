"""CellTokens: the tools read each cell once, and bad values are named wherever they are."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pytest
from conftest import PBMC3K, _load, assert_unchanged, snapshot
from test_tl_embed import FAMILIES, subsample, tiny_model
from test_tl_perturb import _gene_names, family, pbmc

import sclcm
from sclcm.tl import _cells

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_embed_reads_a_backed_file_once(tmp_path, monkeypatch):
    """The values were checked in a pass of their own over the first cells, then read
    again to be tokenized: now they are checked as they are tokenized."""
    subsample(PBMC3K).write_h5ad(tmp_path / "cells.h5ad")
    adata = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    rows_read = []
    read = _cells.iter_row_blocks

    def counting(*args, **kwargs):
        for first, last, block in read(*args, **kwargs):
            rows_read.append(block.shape[0])
            yield first, last, block

    monkeypatch.setattr(_cells, "iter_row_blocks", counting)
    sclcm.tl.embed(adata, tiny_model("geneformer"))
    assert sum(rows_read) == adata.n_obs
    assert np.isfinite(adata.obsm["X_sclcm"]).all()


PROBLEMS = {"nan": (np.nan, "NaN or infinite values"),
            "negative": (-1.0, "negative values: it looks scaled"),
            "non-integer": (0.5, "non-integer values: it looks normalized")}


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("name", FAMILIES)
def test_bad_values_after_the_first_cells_are_named(name, problem):
    """Only the first 1,000 cells were checked with a message naming the cell and gene;
    later ones got the tokenizer's generic one."""
    model = tiny_model(name)
    adata = _load(PBMC3K)[:1100].copy()
    row = 1050
    value, what = PROBLEMS[problem]
    adata.X.data[adata.X.indptr[row]] = value
    gene = adata.var_names[adata.X.indices[adata.X.indptr[row]]]
    before = snapshot(adata)
    if problem == "non-integer" and not model.tokenizer.requires_counts:  # binned scGPT
        sclcm.tl.embed(adata, model)
        return
    with pytest.raises(sclcm.InputError, match=rf"adata.X contains {what}.* \(first at cell "
                                               rf"'{re.escape(adata.obs_names[row])}', gene "
                                               rf"'{re.escape(gene)}'\)"):
        sclcm.tl.embed(adata, model)
    assert_unchanged(adata, before)


def test_perturb_names_bad_values_of_start_and_goal_cells():
    _, model = family("geneformer")
    (a, _), _ = _gene_names("geneformer")
    for row in (20, 5):  # a perturbed cell; a goal cell, read only for the goal's mean
        adata = pbmc()[0].copy()
        adata.obs["state"] = np.where(np.arange(adata.n_obs) < 10, "goal", "start")
        adata.X.data[adata.X.indptr[row]] = np.nan
        before = snapshot(adata)
        with pytest.raises(sclcm.InputError, match=rf"NaN or infinite values \(first at "
                                                   rf"cell '{re.escape(adata.obs_names[row])}'"):
            sclcm.tl.perturb(adata, [a], model=model, n_null=2,
                             goal={"key": "state", "start": "start", "goal": "goal"})
        assert_unchanged(adata, before)
