"""Ortholog rules (one2one / all) on hand-made tables, the coverage record, and the tools."""

from __future__ import annotations

from functools import cache

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import EMBED_TOL, data_path
from scipy import sparse

import sclcm
from sclcm import InputError
from sclcm.genes import GeneReport, SpeciesMap, ortholog_pairs, ortholog_table, to_species

BARON_MOUSE = "came_baron2016_pancreas_mouse_1886"

# Hand-made pairs: m1-h1 one-to-one; m2 -> h2, h3 (one-to-many); m3, m4 -> h4 (many-to-one);
# m5 no ortholog.
TABLE = pd.DataFrame({"human_id": ["H1", "H2", "H3", "H4", "H4"],
                      "mouse_id": ["M1", "M2", "M2", "M3", "M4"],
                      "one2one": [True, False, False, False, False]})


def mouse_report(ids) -> GeneReport:
    ids = np.array(ids, dtype=object)
    return GeneReport(species="mus_musculus", var_names=pd.Index([f"g{i}" for i in range(
        len(ids))]), ensembl_id=ids, method=np.where(ids != None, "ensembl_id", ""))  # noqa: E711


def moved(rule: str, X: np.ndarray, ids=("M1", "M2", "M3", "M4", "M5")):
    smap = SpeciesMap.build(mouse_report(list(ids)), "human", orthologs=rule, table=TABLE)
    out = smap.apply(X).toarray()
    return smap, pd.DataFrame(out, columns=smap.target_ids)


X = np.array([[1, 2, 3, 4, 5], [0, 7, 0, 1, 0]], dtype=np.float32)


def test_one2one_keeps_only_one_to_one_pairs():
    smap, out = moved("one2one", X)
    assert list(out.columns) == ["H1"]
    assert out["H1"].tolist() == [1, 0]
    rec = smap.coverage(var_counts=X.sum(0))
    assert (rec["n_genes_mapped"], rec["n_one_to_many"], rec["n_many_to_one"]) == (1, 0, 0)
    assert rec["count_coverage"] == pytest.approx(1 / 23)


def test_all_copies_one_to_many_and_sums_many_to_one():
    smap, out = moved("all", X)
    assert sorted(out.columns) == ["H1", "H2", "H3", "H4"]
    assert out["H1"].tolist() == [1, 0]
    assert out["H2"].tolist() == [2, 7]  # m2's whole count on each of its two orthologs
    assert out["H3"].tolist() == [2, 7]
    assert out["H4"].tolist() == [7, 1]  # m3 + m4
    rec = smap.coverage(var_counts=X.sum(0))
    assert rec["n_genes"] == 5
    assert rec["n_genes_mapped"] == rec["n_genes_in_vocab"] == 4
    assert rec["n_one_to_many"] == 1
    assert rec["n_many_to_one"] == 1
    assert rec["n_vocab_genes"] == 4
    # m5's 5 counts are lost; m2's 9 are read twice: (1 + 9 + 9 + 3 + 5) / (1 + 9 + 3 + 5)
    assert rec["count_coverage"] == pytest.approx(18 / 23)
    assert rec["count_inflation"] == pytest.approx(27 / 18)


def test_coverage_counts_only_vocabulary_genes():
    smap, _ = moved("all", X)
    in_vocab = np.asarray(smap.target_ids.isin(["H3", "H4"]))  # H1 and H2 not in the vocab
    rec = smap.coverage(in_vocab, var_counts=X.sum(0))
    # m2 reaches H3 only (no longer one-to-many); m3 and m4 still share H4; m1 lost
    assert rec["n_genes_in_vocab"] == 3
    assert rec["n_one_to_many"] == 0
    assert rec["n_vocab_genes"] == 2
    assert rec["n_many_to_one"] == 1
    assert rec["count_coverage"] == pytest.approx(17 / 23)
    assert rec["count_inflation"] == 1.0
    lost = smap.lost(in_vocab)
    assert list(lost.index) == ["g0", "g4"]  # m1: its H1 is outside; m5: no ortholog


def test_unresolved_columns_and_human_to_mouse():
    _smap, out = moved("all", X, ids=("M1", None, "M3", "M4", "M5"))
    assert sorted(out.columns) == ["H1", "H4"]
    back = SpeciesMap.build(GeneReport(
        species="homo_sapiens", var_names=pd.Index(["a", "b"]),
        ensembl_id=np.array(["H4", "H2"], dtype=object), method=np.array(["", ""])),
        "mouse", orthologs="all", table=TABLE)
    got = pd.DataFrame(back.apply(np.array([[3, 1]])).toarray(), columns=back.target_ids)
    assert got.to_dict("records") == [{"M3": 3.0, "M4": 3.0, "M2": 1.0}]


def test_shipped_table_rules():
    one, every = ortholog_pairs("mouse", "human"), ortholog_pairs("mouse", "human",
                                                                orthologs="all")
    table = ortholog_table()
    assert len(one) == int(table.one2one.sum())
    assert len(every) == len(table)
    assert not one.source.duplicated().any()
    assert not one.target.duplicated().any()
    assert every.source.duplicated().any()  # one-to-many pairs exist


@pytest.mark.parametrize("call", [
    lambda a: to_species(a, "rat"),
    lambda a: ortholog_pairs("mouse", "zebrafish"),
    lambda a: sclcm.tl.embed(a, orthologs="many"),
])
def test_unknown_species_or_rule_is_a_clear_error(call):
    adata = ad.AnnData(np.ones((2, 2), dtype=np.float32),
                       var=pd.DataFrame(index=["Actb", "Gapdh"]))
    before = adata.copy()
    with pytest.raises(InputError, match=r"human|one2one"):
        call(adata)
    assert adata.var_names.equals(before.var_names)
    assert not adata.uns
    assert not adata.obsm


@cache
def _baron_mouse(n: int = 120) -> ad.AnnData:
    full = ad.read_h5ad(data_path(BARON_MOUSE))
    rows = np.random.default_rng(0).choice(full.n_obs, n, replace=False)
    return full[np.sort(rows)].copy()


@pytest.fixture
def baron_mouse():
    return _baron_mouse().copy()


def test_to_species_on_real_mouse_data_leaves_it_unchanged(baron_mouse):
    before = baron_mouse.copy()
    human = to_species(baron_mouse, "human", orthologs="all")
    assert baron_mouse.var_names.equals(before.var_names)
    assert (baron_mouse.X != before.X).nnz == 0
    assert baron_mouse.var.equals(before.var)
    assert human.var_names.str.startswith("ENSG").all()
    # one-to-one: the same counts as collapsing the report mapped to human
    one = to_species(baron_mouse, "human")
    report = sclcm.genes.resolve(baron_mouse).to_species("human")
    ref = report.collapse(baron_mouse)
    assert one.var_names.equals(ref.var_names)
    assert abs(one.X - ref.X).max() == 0
    # INS: mouse Ins2 is its one-to-one ortholog, Ins1 joins under "all"
    ins = "ENSG00000254647"
    cols = [baron_mouse.var_names.get_loc(g) for g in ("Ins1", "Ins2")]
    expect = np.asarray(baron_mouse.X[:, cols].sum(axis=1)).ravel()
    assert np.array_equal(human[:, ins].X.toarray().ravel(), expect)
    assert np.array_equal(one[:, ins].X.toarray().ravel(),
                          baron_mouse[:, "Ins2"].X.toarray().ravel())
    rec = human.uns["sclcm_orthologs"]
    assert rec["orthologs"] == "all"
    assert rec["count_inflation"] > 1
    assert rec["count_coverage"] > one.uns["sclcm_orthologs"]["count_coverage"]


@pytest.mark.slow
def test_embed_records_coverage_and_all_equals_one2one_without_paralogs(baron_mouse):
    """On genes whose only ortholog is one-to-one the two rules are one mapping: the
    expansion path must give the tokenizer path's embedding."""
    model = sclcm.tl.get_model()
    before = baron_mouse.copy()
    sclcm.tl.embed(baron_mouse, model, orthologs="all", key_added="X_all")
    rec = baron_mouse.uns["all"]["orthologs"]
    # the record against an independent count: columns whose orthologs reach a token
    report = sclcm.genes.resolve(baron_mouse)
    every = ortholog_pairs("mouse", "human", orthologs="all")
    tok = model.tokenizer
    ok = every[tok.token_ids_of_genes(tok.vocab.encode(every.target)) >= 0]
    reaches = pd.Index(report.ensembl_id.astype(str)).isin(ok.source)
    counts = np.asarray(baron_mouse.X.sum(axis=0)).ravel()
    assert rec["n_genes_in_vocab"] == int(reaches.sum())
    assert rec["count_coverage"] == pytest.approx(counts[reaches].sum() / counts.sum(),
                                                  rel=1e-9)
    assert baron_mouse.uns["all"]["params"]["orthologs"] == "all"
    assert baron_mouse.var_names.equals(before.var_names)

    n_all = every.groupby("source").size()
    simple = every[every.source.map(n_all).eq(1) & every.target.map(
        every.groupby("target").size()).eq(1)].source
    keep = pd.Index(report.ensembl_id.astype(str)).isin(simple)
    sub = baron_mouse[:, keep].copy()
    a = sclcm.tl.embed(sub, model, orthologs="all", copy=True)
    b = sclcm.tl.embed(sub, model, orthologs="one2one", copy=True)
    assert a.uns["sclcm"]["orthologs"]["n_one_to_many"] == 0
    np.testing.assert_allclose(a.obsm["X_sclcm"], b.obsm["X_sclcm"], **EMBED_TOL)
    assert sparse.issparse(sub.X)
