"""sclcm.genes.resolve: each route to an Ensembl ID, species handling, real-data coverage."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import (
    ALL_DATASETS,
    CHAI_MOUSE,
    CIDER,
    KANG_CTRL,
    KANG_IFNB,
    PBMC3K,
    SUPERCELL_MOUSE,
    assert_unchanged,
    data_path,
    snapshot,
)
from scipy import sparse

import sclcm
from sclcm.genes import gene_table, resolve, synonym_table


def make(names, var=None, counts=None) -> ad.AnnData:
    n = len(names)
    X = np.ones((3, n), dtype=np.float32) if counts is None else np.asarray(counts, np.float32)
    return ad.AnnData(sparse.csr_matrix(X), var=pd.DataFrame(var or {}, index=names))


def resolved(report) -> dict:
    return dict(zip(report.var_names, zip(report.ensembl_id, report.method, strict=True),
                    strict=True))


# --- each route, on hand-made genes with known answers --------------------------------
def test_ensembl_ids_with_versions_and_symbols():
    r = resolved(resolve(make(["ENSG00000075624.17", "ENSG00000111640", "ACTB"])))
    assert r["ENSG00000075624.17"] == ("ENSG00000075624", "ensembl_id")
    assert r["ENSG00000111640"] == ("ENSG00000111640", "ensembl_id")
    assert r["ACTB"] == ("ENSG00000075624", "symbol")


@pytest.mark.parametrize("column", ["feature_id", "gene_ids", "ensembl_id", "gene_id"])
def test_id_column_takes_precedence_over_var_names(column):
    # var_names say GAPDH, the ID column says ACTB: the ID wins, as Ensembl IDs are exact
    r = resolve(make(["GAPDH"], var={column: ["ENSG00000075624"]}))
    assert r.ensembl_id[0] == "ENSG00000075624"
    assert r.method[0] == "ensembl_id"


def test_symbol_column_used_when_var_names_are_opaque():
    r = resolve(make(["g1", "g2"], var={"gene_symbols": ["CD3E", "MS4A1"]}))
    assert list(r.symbols) == ["CD3E", "MS4A1"]


@pytest.mark.parametrize(
    ("name", "symbol", "method"),
    [
        ("GNB2L1", "RACK1", "alias"),  # hg19-era symbol, an NCBI alias today
        ("H3F3B", "H3-3B", "alias"),
        ("SEPT7", "SEPTIN7", "alias"),
        ("KIAA2026", "BRD10", "previous"),  # official symbol of an earlier GENCODE
        ("C3orf14", "CEP15", "previous"),
        ("actb", "ACTB", "case_insensitive"),
        ("UQCR11.1", "UQCR11", "unique_suffix"),  # anndata's make_unique
        ("CCL5_ENSG00000161570", "CCL5", "unique_suffix"),  # GRCh37 ID, symbol stem
        ("INS1", "INS", "other_species"),  # mouse Ins1 written in a human table
        ("CD99", "CD99", "symbol"),  # two current IDs (PAR_Y copy): the long-standing one
    ],
)
def test_human_symbol_routes(name, symbol, method):
    r = resolve(make(["ACTB", "GAPDH", name]), "human")
    assert r.symbols[2] == symbol
    assert r.method[2] == method
    if name == "CD99":
        assert r.ensembl_id[2] == "ENSG00000002586"


@pytest.mark.parametrize(
    ("name", "symbol", "method"),
    [
        ("Ttc30a1", "Ift70a1", "previous"),
        ("Sep15", "Selenof", "ortholog_previous"),
        ("Gnb2l1", "Rack1", "ortholog_previous"),  # renamed with its human ortholog
        ("Selk", "Selenok", "ortholog_previous"),
        ("ACTB", "Actb", "case_insensitive"),
    ],
)
def test_mouse_symbol_routes(name, symbol, method):
    r = resolve(make(["Actb", "Gapdh", name]), "mouse")
    assert r.symbols[2] == symbol
    assert r.method[2] == method


def test_r_make_names_read_back():
    # no dash anywhere and dotted names: R wrote "-" as "."; KRTAP16.1 is KRTAP16-1 here,
    # although "KRTAP16.1" is also an old alias of KRTAP17-1
    r = resolve(make(["ACTB", "KRTAP16.1", "KRTAP17.1", "HLA.A"]))
    assert list(r.symbols) == ["ACTB", "KRTAP16-1", "KRTAP17-1", "HLA-A"]
    assert not r.duplicates
    # with dashes in the table, a ".1" is anndata's make_unique suffix instead
    r = resolve(make(["HLA-A", "UQCR11", "UQCR11.1"]))
    assert list(r.method) == ["symbol", "symbol", "unique_suffix"]


def test_retired_id_maps_to_successor():
    retired = synonym_table("human").query("kind == 'retired_id'").iloc[0]
    r = resolve(make([retired["name"], "ENSG00000075624"]))
    assert r.ensembl_id[0] == retired["ensembl_id"]
    assert r.method[0] == "retired_id"


def test_ambiguous_symbol_is_reported_not_guessed():
    # SEPT2 is an NCBI alias of both SEPTIN2 and SEPTIN6 and no earlier symbol table has it
    r = resolve(make(["ACTB", "SEPT2"]))
    assert r.ensembl_id[1] is None
    assert set(r.ambiguous["SEPT2"]) == {"ENSG00000168385", "ENSG00000125354"}
    assert r.unmatched == ["SEPT2"]


def test_unknown_genes_stay_unmatched():
    r = resolve(make(["ACTB", "not_a_gene", "RP11-34P13.7"]))
    assert r.unmatched == ["not_a_gene", "RP11-34P13.7"]
    assert r.coverage == pytest.approx(1 / 3)


def test_count_coverage_weighs_by_counts():
    counts = [[90, 10, 0], [0, 0, 0]]
    r = resolve(make(["ACTB", "not_a_gene", "GAPDH"], counts=counts))
    assert r.coverage == pytest.approx(2 / 3)
    assert r.count_coverage == pytest.approx(0.9)


def test_duplicates_found_and_summed():
    adata = make(["RACK1", "GNB2L1", "ACTB"], counts=[[1, 2, 3], [4, 5, 6]])
    r = resolve(adata)
    assert r.duplicates == {"ENSG00000204628": ["RACK1", "GNB2L1"]}
    out = r.collapse(adata)
    assert list(out.var_names) == ["ENSG00000204628", "ENSG00000075624"]
    assert out.X.toarray().tolist() == [[3, 3], [9, 6]]
    assert out.var["n_merged"].tolist() == [2, 1]
    assert out.uns["sclcm_genes"]["n_duplicated_ids"] == 1


def test_collapse_rejects_other_anndata():
    r = resolve(make(["ACTB", "GAPDH"]))
    with pytest.raises(ValueError, match="another AnnData"):
        r.collapse(make(["ACTB", "CD3E"]))


# --- species ---------------------------------------------------------------------------
def test_species_inferred():
    assert resolve(make(["Actb", "Gapdh", "Cd3e"])).species == "mus_musculus"
    assert resolve(make(["ACTB", "GAPDH", "CD3E"])).species == "homo_sapiens"
    assert resolve(make(["ENSMUSG00000029580"])).species == "mus_musculus"


def test_wrong_species_gets_a_clear_error():
    with pytest.raises(sclcm.InputError, match="pass species='homo_sapiens'"):
        resolve(make(["ENSG00000075624", "ENSG00000111640"]), species="mouse")


def test_no_overlap_gets_a_clear_error():
    with pytest.raises(sclcm.InputError, match="is a human or mouse Ensembl ID or symbol"):
        resolve(make(["gene_1", "gene_2", "gene_3"]))


def test_unknown_species_name():
    with pytest.raises(ValueError, match="ships gene references for human"):
        resolve(make(["ACTB"]), species="zebrafish")


def test_no_genes():
    with pytest.raises(sclcm.InputError, match="no genes"):
        resolve(ad.AnnData(np.zeros((2, 0), dtype=np.float32)))


def test_to_species_maps_one_to_one_orthologs():
    r = resolve(make(["Actb", "Gapdh", "Ins2", "Ins1", "Xist"]))
    human = r.to_species("human")
    assert list(human.symbols) == ["ACTB", "GAPDH", "INS", None, None]
    # Ins1 is one of two mouse insulins (one-to-many); Xist has no ortholog in the tables
    assert human.ortholog_coverage == pytest.approx(3 / 5)
    assert human.source is r
    assert r.to_species("mouse") is r


# --- real data ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_DATASETS)
def test_real_data_coverage(name, load):
    adata = load(name)
    before = snapshot(adata)
    r = resolve(adata)
    assert_unchanged(adata, before)
    mouse = name in (CHAI_MOUSE, SUPERCELL_MOUSE)
    assert r.species == ("mus_musculus" if mouse else "homo_sapiens")
    # every human and mouse set, symbols or IDs, resolves at least 97% of its counts
    assert r.count_coverage >= 0.97, r
    assert 0 < r.coverage <= 1
    summary = r.summary()
    assert summary["n_matched"] == r.n_matched
    assert sum(summary["methods"].values()) == adata.n_vars


def test_ensembl_input_resolves_every_id_of_the_reference(load):
    adata = load(KANG_CTRL)
    r = resolve(adata)
    assert set(r.method[r.matched]) <= {"ensembl_id", "retired_id"}
    # what is left are GRCh37-era IDs that no shipped release carries
    known = set(gene_table("human").index) | set(synonym_table("human").name)
    assert not set(r.unmatched) & known
    assert r.coverage > 0.99
    assert r.count_coverage > 0.995


def test_ensembl_round_trip_is_complete(load):
    # symbols -> collapse to Ensembl IDs (with version suffixes) -> resolve: 100%
    adata = load(PBMC3K)
    ens = resolve(adata).collapse(adata)
    ens.var_names = [f"{i}.3" for i in ens.var_names]
    r = resolve(ens)
    assert r.coverage == 1.0
    assert r.count_coverage == 1.0
    assert set(r.method) == {"ensembl_id"}


def test_ids_embedded_in_names(load):
    # var_names like "HLA-B_ENSG00000234745" plus var["ensembl_id"]
    r = resolve(load(KANG_IFNB))
    assert r.coverage > 0.995
    assert "unique_suffix" in set(r.method)


def test_pbmc3k_hg19_symbols(load):
    adata = load(PBMC3K)
    r = resolve(adata)
    assert r.count_coverage >= 0.99
    methods = r.methods()
    # current symbols alone are not enough on hg19 names: the older names close the gap
    current_only = r.var_counts[r.method == "symbol"].sum() / r.var_counts.sum()
    assert current_only < 0.97
    assert methods["previous"] > 1000
    assert methods["alias"] > 100
    # duplicated IDs are summed by collapse, total counts preserved
    assert len(r.duplicates) > 50
    out = r.collapse(adata)
    assert out.X.sum() == pytest.approx(r.var_counts[r.matched].sum(), rel=1e-6)
    some_id, cols = next(iter(r.duplicates.items()))
    j = [list(adata.var_names).index(c) for c in cols]
    expected = np.asarray(adata.X[:, j].sum(axis=1)).ravel()
    got = out[:, some_id].X.toarray().ravel()
    np.testing.assert_allclose(got, expected)


@pytest.mark.parametrize("name", [CHAI_MOUSE, SUPERCELL_MOUSE])
def test_mouse_sets_map_onto_human_orthologs(name, load):
    r = resolve(load(name))
    human = r.to_species("human")
    assert human.species == "homo_sapiens"
    # the fraction of resolved mouse genes with a one-to-one human ortholog, reported
    assert 0.75 <= human.ortholog_coverage <= 1
    assert human.summary()["ortholog_coverage"] == human.ortholog_coverage
    assert human.count_coverage > 0.9
    assert set(pd.Series(human.ensembl_id).dropna().str[:4]) == {"ENSG"}


def test_cider_mouse_insulin_in_human_table(load):
    r = resolve(load(CIDER))
    i = list(r.var_names).index("INS1")  # mouse Ins1, 4% of the counts
    assert (r.ensembl_id[i], r.method[i]) == ("ENSG00000254647", "other_species")
    assert r.duplicates == {"ENSG00000150527": ["CTAGE5", "MIA2"]}  # merged genes


def test_backed_equals_in_memory(load):
    backed = ad.read_h5ad(data_path(SUPERCELL_MOUSE), backed="r")
    try:
        a, b = resolve(backed), resolve(load(SUPERCELL_MOUSE))
        assert list(a.ensembl_id) == list(b.ensembl_id)
        np.testing.assert_allclose(a.var_counts, b.var_counts)
        out = a.collapse(backed)
        assert out.shape == (backed.n_obs, len(a.unique_ids))
    finally:
        backed.file.close()
