"""GeneVocab: token ids, vectorized lookup of AnnData columns, JSON persistence."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import CHAI_MOUSE, KANG_CTRL, PBMC3K
from scipy import sparse

from sclcm.genes import SPECIAL_TOKENS, GeneVocab, resolve

ACTB, GAPDH, CD3E = "ENSG00000075624", "ENSG00000111640", "ENSG00000198851"


def test_special_tokens_first():
    v = GeneVocab([ACTB, GAPDH], species="human")
    assert v.tokens[:4] == list(SPECIAL_TOKENS)
    assert (v.pad_id, v.mask_id, v.cls_id, v.eos_id) == (0, 1, 2, 3)
    assert v[ACTB] == 4
    assert len(v) == 6
    assert v.n_genes == 2
    assert ACTB in v
    assert v.decode([2, 5]) == ["<cls>", GAPDH]


def test_encode_is_vectorized_with_minus_one_for_absent():
    v = GeneVocab([ACTB, GAPDH])
    ids = v.encode([GAPDH, None, "ENSG00000000003", ACTB, "<cls>"])
    assert ids.tolist() == [5, -1, -1, 4, -1]  # genes never map onto special tokens
    assert ids.dtype == np.int64


def test_validation():
    with pytest.raises(ValueError, match="unique"):
        GeneVocab([ACTB, ACTB])
    with pytest.raises(ValueError, match="must include"):
        GeneVocab([ACTB], special_tokens=["<pad>"])
    v1 = GeneVocab([ACTB], special_tokens=["<pad>", "<mask>"])  # Geneformer V1 layout
    assert v1[ACTB] == 2
    with pytest.raises(KeyError, match="not in this vocabulary"):
        _ = v1.cls_id
    with pytest.raises(ValueError, match="unique"):
        GeneVocab(["<pad>"])


def test_json_round_trip(tmp_path):
    v = GeneVocab([ACTB, GAPDH, CD3E], species="mouse",
                  special_tokens=[*SPECIAL_TOKENS, "<sep>"])
    path = tmp_path / "vocab.json"
    v.save(path)
    data = json.loads(path.read_text())  # plain JSON, nothing pickled
    assert data["format"] == "sclcm.GeneVocab"
    assert data["genes"] == [ACTB, GAPDH, CD3E]
    w = GeneVocab.load(path)
    assert w == v
    assert w.species == "mus_musculus"
    assert w["<sep>"] == 4


def test_load_rejects_foreign_or_newer_files(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"genes": []}))
    with pytest.raises(ValueError, match="Not a sclcm gene vocabulary"):
        GeneVocab.load(path)
    path.write_text(json.dumps({"format": "sclcm.GeneVocab", "version": 99}))
    with pytest.raises(ValueError, match="upgrade sclcm"):
        GeneVocab.load(path)


def test_from_reference():
    v = GeneVocab.from_reference("human", biotypes=["protein_coding"])
    assert 19_000 < v.n_genes < 21_000
    assert GAPDH in v
    assert GeneVocab.from_reference("mouse", biotypes=None).n_genes > 70_000


def test_lookup_anndata_columns():
    adata = ad.AnnData(sparse.csr_matrix(np.ones((2, 4), dtype=np.float32)),
                       var=pd.DataFrame(index=["GAPDH", "ACTB", "RACK1", "GNB2L1"]))
    v = GeneVocab([ACTB, GAPDH, "ENSG00000204628"], species="human")
    assert v.lookup(adata).tolist() == [5, 4, 6, 6]  # duplicated genes share a token


def test_lookup_rejects_report_of_other_data():
    a = ad.AnnData(np.ones((1, 2), dtype=np.float32), var=pd.DataFrame(index=["ACTB", "CD3E"]))
    b = ad.AnnData(np.ones((1, 2), dtype=np.float32), var=pd.DataFrame(index=["ACTB", "CD4"]))
    with pytest.raises(ValueError, match="another AnnData"):
        GeneVocab([ACTB]).lookup(a, report=resolve(b))


@pytest.mark.parametrize("name", [PBMC3K, KANG_CTRL])
def test_lookup_real_human_data(name, load):
    adata = load(name)
    report = resolve(adata)
    vocab = GeneVocab.from_report(report)
    ids = vocab.lookup(adata, report=report)
    assert (ids >= 0).sum() == report.n_matched
    assert len(np.unique(ids[ids >= 0])) == vocab.n_genes
    # every resolved column's token decodes back to its Ensembl ID
    ok = ids >= 0
    assert vocab.decode(ids[ok]) == list(report.ensembl_id[ok])


def test_lookup_mouse_data_into_human_vocab(load):
    adata = load(CHAI_MOUSE)
    vocab = GeneVocab.from_reference("human")
    ids = vocab.lookup(adata)
    report = resolve(adata).to_species("human")
    np.testing.assert_array_equal(ids, vocab.encode(report.ensembl_id))
    # orthologs of biotypes outside the vocabulary (snRNA, pseudogenes) stay out
    assert report.n_matched - 50 < (ids >= 0).sum() <= report.n_matched
    assert (ids >= 0).mean() > 0.8
    i = list(adata.var_names).index("Gapdh")
    assert ids[i] == vocab[GAPDH]
