"""sclcm.tl.embed on the real datasets, with tiny random models of the four families."""

from __future__ import annotations

import logging
from functools import cache

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import (
    ALL_DATASETS,
    EMBED_TOL,
    KANG_CTRL,
    PBMC3K,
    SUPERCELL_MOUSE,
    assert_unchanged,
    data_path,
    snapshot,
)
from scipy import sparse
from test_model_data import cell_rows, tokenizer

import sclcm
from sclcm.models import CellModel, ModelConfig
from sclcm.tl._forward import Budget, plan_batches

FAMILIES = ["geneformer", "scgpt", "scbert", "scfoundation"]
N_CELLS = 300  # cells per dataset: every length, in seconds on a tiny model


@cache
def tiny_model(family: str) -> CellModel:
    """A random tiny model with its tokenizer (pbmc3k's genes; scBERT: a 200-gene panel)."""
    torch.manual_seed(0)
    tok = tokenizer(family)
    return CellModel(ModelConfig.preset(family, "tiny", vocab=tok.vocab), tokenizer=tok).eval()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """``model_dir(family)``: the tiny model saved with ``save_pretrained``."""
    root = tmp_path_factory.mktemp("models")

    def get(family: str):
        path = root / family
        if not path.exists():
            tiny_model(family).save_pretrained(path)
        return path

    return get


@cache
def _subsample(name: str) -> ad.AnnData:
    adata = ad.read_h5ad(data_path(name))
    if adata.n_obs > N_CELLS:
        rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, N_CELLS, replace=False))
        adata = adata[rows].copy()
    return adata


def subsample(name: str) -> ad.AnnData:
    """A fresh copy of ``N_CELLS`` random cells of a real dataset."""
    return _subsample(name).copy()


def pbmc_cells(n: int) -> ad.AnnData:
    """pbmc3k's shortest and longest cells and a random draw (lengths 1..4k tokens)."""
    adata = ad.read_h5ad(data_path(PBMC3K))
    return adata[np.sort(cell_rows()[:n])].copy()


def reference(model: CellModel, adata: ad.AnnData) -> np.ndarray:
    """The embeddings sclcm.pp.tokenize + CellModel.embed give (cells in one list)."""
    return model.embed(sclcm.pp.tokenize(adata, model.tokenizer), batch_size=5)


def warnings_of(fn) -> list[str]:
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("sclcm")
    logger.addHandler(handler)
    try:
        fn()
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records if r.levelno == logging.WARNING]


# --- every real dataset ---------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_DATASETS)
def test_embed_every_real_dataset(name, model_dir):
    family = FAMILIES[ALL_DATASETS.index(name) % len(FAMILIES)]
    adata = subsample(name)
    sclcm.tl.embed(adata, str(model_dir(family)))
    emb = adata.obsm["X_sclcm"]
    assert emb.shape == (adata.n_obs, 64)
    assert emb.dtype == np.float32
    empty = np.isnan(emb).all(axis=1)
    assert np.isfinite(emb[~empty]).all()
    assert empty.mean() < 0.05  # a 200-gene scBERT panel misses a few cells
    assert np.isnan(emb[empty]).all()
    rec = adata.uns["sclcm"]
    assert rec["model"] == str(model_dir(family).resolve())
    assert rec["tokenizer"]["name"] == rec["config"]["tokenizer"] == family
    assert rec["n_empty_cells"] == int(empty.sum())
    assert 0 < rec["gene_coverage"] <= 1
    assert rec["count_coverage"] > (0.05 if family == "scbert" else 0.9)  # a PBMC panel
    assert rec["params"]["key_added"] == "X_sclcm"
    # different cells get different embeddings
    assert np.unique(emb[~empty].round(5), axis=0).shape[0] > 0.9 * (~empty).sum()


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_equal_model_embed(family):
    model = tiny_model(family)
    adata = pbmc_cells(12)
    expected = reference(model, adata)
    for batch_size in (None, 7):
        got = sclcm.tl.embed(adata, model, batch_size=batch_size, copy=True).obsm["X_sclcm"]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_backed_equals_in_memory(tmp_path, model_dir):
    adata = subsample(KANG_CTRL)[:150].copy()
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    model = str(model_dir("geneformer"))
    sclcm.tl.embed(adata, model, gene_embeddings=True)
    backed = ad.read_h5ad(path, backed="r")
    sclcm.tl.embed(backed, model, gene_embeddings=True)
    assert backed.isbacked
    np.testing.assert_allclose(backed.obsm["X_sclcm"], adata.obsm["X_sclcm"], **EMBED_TOL)
    np.testing.assert_allclose(backed.varm["sclcm_gene_embedding"],
                               adata.varm["sclcm_gene_embedding"], **EMBED_TOL)
    assert backed.uns["sclcm"]["count_coverage"] == adata.uns["sclcm"]["count_coverage"]
    with pytest.raises(ValueError, match="copy=True on a backed AnnData"):
        sclcm.tl.embed(backed, model, copy=True)
    backed.file.close()
    assert "X_sclcm" not in ad.read_h5ad(path).obsm  # the file opened "r" is not written


def test_dense_int_and_view_inputs():
    model = tiny_model("scfoundation")
    adata = pbmc_cells(12)
    expected = reference(model, adata)
    dense = ad.AnnData(adata.X.toarray().astype(np.int32), var=adata.var)
    sclcm.tl.embed(dense, model)
    np.testing.assert_allclose(dense.obsm["X_sclcm"], expected, rtol=1e-5, atol=1e-5)
    view = adata[:6]
    assert view.is_view
    sclcm.tl.embed(view, model)  # no ImplicitModificationWarning (warnings are errors)
    assert not view.is_view
    np.testing.assert_allclose(view.obsm["X_sclcm"], expected[:6], rtol=1e-5, atol=1e-5)


# --- layers and normalized data --------------------------------------------------------
def test_layer_of_a_real_dataset(model_dir):
    adata = subsample(SUPERCELL_MOUSE)[:100].copy()  # real spliced / unspliced counts
    model = str(model_dir("geneformer"))
    out = sclcm.tl.embed(adata, model, layer="spliced", copy=True)
    alone = ad.AnnData(adata.layers["spliced"], obs=adata.obs, var=adata.var)
    sclcm.tl.embed(alone, model)
    np.testing.assert_allclose(out.obsm["X_sclcm"], alone.obsm["X_sclcm"], **EMBED_TOL,
                               equal_nan=True)
    assert out.uns["sclcm"]["params"]["layer"] == "spliced"
    with pytest.raises(sclcm.InputError, match=r"layer 'counts' is not in adata\.layers"):
        sclcm.tl.embed(adata, model, layer="counts")


def lognorm(adata: ad.AnnData) -> ad.AnnData:
    """``adata`` with log1p(normalize_total) in X and the counts in layers["counts"]."""
    import scanpy as sc

    out = adata.copy()
    out.layers["counts"] = out.X.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


@pytest.mark.parametrize("family", ["geneformer", "scbert", "scfoundation"])
def test_normalized_data_refused_where_counts_are_read(family):
    adata = lognorm(pbmc_cells(8))
    before = snapshot(adata)
    with pytest.raises(sclcm.InputError, match=rf"non-integer values: it looks normalized .*first "
                                               rf"at cell .*A {family} model reads raw "
                                               r"counts: .* Pass layer="):
        sclcm.tl.embed(adata, tiny_model(family))
    assert_unchanged(adata, before)
    sclcm.tl.embed(adata, tiny_model(family), layer="counts")  # the counts layer works
    np.testing.assert_allclose(adata.obsm["X_sclcm"], reference(tiny_model(family),
                                                                pbmc_cells(8)),
                               rtol=1e-5, atol=1e-5)


def test_binned_scgpt_reads_normalized_data_as_counts():
    # per-cell quantile bins depend only on the order of a cell's values
    model = tiny_model("scgpt")
    counts = pbmc_cells(12)
    sclcm.tl.embed(counts, model)
    for X in ("log1p", "normalize_total"):
        adata = lognorm(counts)
        if X == "normalize_total":
            adata.X = adata.X.expm1()
        sclcm.tl.embed(adata, model)
        np.testing.assert_allclose(adata.obsm["X_sclcm"], counts.obsm["X_sclcm"], **EMBED_TOL)


# --- copy and failures ----------------------------------------------------------------
def test_copy_returns_a_new_object_and_leaves_the_input(model_dir):
    adata = subsample(PBMC3K)[:20].copy()
    adata.obsm["X_pca"] = np.zeros((adata.n_obs, 2))
    adata.uns["note"] = "kept"
    before = snapshot(adata)
    out = sclcm.tl.embed(adata, str(model_dir("scgpt")), copy=True, gene_embeddings=True)
    assert out is not adata
    assert_unchanged(adata, before)
    assert {"X_sclcm", "X_pca"} <= set(out.obsm)
    assert "sclcm_gene_embedding" in out.varm
    assert out.uns["note"] == "kept"
    assert sclcm.tl.embed(adata, str(model_dir("scgpt")), key_added="X_gpt") is None
    assert set(adata.obsm) == {"X_pca", "X_gpt"}
    assert "gpt" in adata.uns
    np.testing.assert_array_equal(adata.obsm["X_gpt"], out.obsm["X_sclcm"])


def test_bad_inputs_get_clear_errors_and_change_nothing(model_dir):
    model = str(model_dir("geneformer"))
    adata = subsample(PBMC3K)[:50].copy()
    with pytest.raises(ValueError, match="'no-such-model' is neither a model directory"):
        sclcm.tl.embed(adata, "no-such-model")
    with pytest.raises(ValueError, match="batch_size must be a positive number"):
        sclcm.tl.embed(adata, model, batch_size=0)
    with pytest.raises(ValueError, match="key_added must be a non-empty string"):
        sclcm.tl.embed(adata, model, key_added="")
    with pytest.raises(sclcm.InputError, match="The AnnData is empty"):
        sclcm.tl.embed(adata[:0].copy(), model)
    with pytest.raises(sclcm.InputError, match=r"empty \(50 cells x 0 genes"):
        sclcm.tl.embed(adata[:, :0].copy(), model)
    no_overlap = ad.AnnData(adata.X[:, :20], var={"gene": [f"x{i}" for i in range(20)]})
    no_overlap.var_names = no_overlap.var["gene"].astype(str)
    with pytest.raises(sclcm.InputError, match="None of the 20 genes"):
        sclcm.tl.embed(no_overlap, model)
    # genes that resolve, but none in the vocabulary of a 200-gene scBERT panel
    panel = set(tiny_model("scbert").vocab.genes)
    report = sclcm.genes.resolve(adata, count_coverage=False)
    outside = np.flatnonzero([g is not None and g not in panel for g in report.ensembl_id])
    with pytest.raises(sclcm.InputError, match="None of the AnnData's genes is in"):
        sclcm.tl.embed(adata[:, outside[:50]].copy(), tiny_model("scbert"))
    negative = adata.copy()
    negative.X = negative.X.copy()
    negative.X.data[5] = -1
    with pytest.raises(sclcm.InputError, match="negative values"):
        sclcm.tl.embed(negative, model)
    # a bad value after the first block checked up front: the error comes late, and
    # still nothing is written
    late = ad.concat([subsample(PBMC3K)] * 5, index_unique="-")
    late.X = late.X.tocsr()
    late.X.data[late.X.indptr[1400]] = 0.5
    before = snapshot(late)
    with pytest.raises(sclcm.InputError, match="non-integer"):
        sclcm.tl.embed(late, model)
    assert_unchanged(late, before)


def test_cells_without_vocabulary_counts_are_nan_with_a_warning():
    for family in ("geneformer", "scbert"):
        adata = pbmc_cells(12)
        X = adata.X.tolil()
        X[[2, 5]] = 0  # no counts at all
        adata.X = X.tocsr()
        warned = warnings_of(lambda a=adata, f=family: sclcm.tl.embed(a, tiny_model(f)))
        emb = adata.obsm["X_sclcm"]
        assert np.isnan(emb[[2, 5]]).all()
        assert np.isfinite(np.delete(emb, [2, 5], axis=0)).all()
        assert any("2 of 12 cells have no count" in w for w in warned)
        assert adata.uns["sclcm"]["n_empty_cells"] == 2


# --- gene embeddings ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["geneformer", "scfoundation"])
def test_gene_embeddings_equal_a_brute_force_mean(family):
    model = tiny_model(family)
    adata = pbmc_cells(16)
    sclcm.tl.embed(adata, model, gene_embeddings=True)
    genes = adata.varm["sclcm_gene_embedding"]
    assert genes.shape == (adata.n_vars, 64)
    assert genes.dtype == np.float32
    batch = sclcm.pp.tokenize(adata, model.tokenizer)
    with torch.no_grad():
        out = model(**model.inputs(batch), heads=False)
    h = out["last_hidden_state"].numpy()
    n_prefix = 2 if family == "scfoundation" else 0
    cell = np.repeat(np.arange(batch.n_cells), batch.lengths)
    rows = out["offsets"].numpy()[cell] + n_prefix + np.arange(batch.n_tokens) - \
        batch.offsets[cell]
    ids = model.vocab.lookup(adata)
    expressed = np.asarray((adata.X > 0).sum(0)).ravel()
    single = np.bincount(ids[ids >= 0])[np.maximum(ids, 0)] == 1  # one column, one gene
    for col in [*np.flatnonzero((ids >= 0) & single & (expressed > 0))[[0, 10, 100, -1]],
                int(np.argmax(np.where(single, expressed, 0)))]:
        where = batch.gene_ids == ids[col]
        assert where.sum() == expressed[col]
        np.testing.assert_allclose(genes[col], h[rows[where]].mean(0), rtol=1e-4, atol=1e-5)
    assert np.isnan(genes[ids < 0]).all()  # not in the vocabulary
    assert np.isnan(genes[(ids >= 0) & single & (expressed == 0)]).all()  # never seen
    assert np.isfinite(genes[(ids >= 0) & (expressed > 0)]).all()


# --- forward batches, the default model -------------------------------------------------
def test_forward_batches_follow_the_token_budget():
    lengths = np.random.default_rng(0).integers(1, 3000, 500)
    budget = Budget(tokens=8192, scores=2**22)
    parts = plan_batches(lengths, n_heads=2, budget=budget)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(500))
    for part in parts:
        longest = lengths[part].max()
        assert lengths[part[0]] == longest  # longest first, sorted
        assert len(part) == 1 or (len(part) * longest <= budget.tokens
                                   and len(part) * 2 * longest**2 <= budget.scores)
    assert [len(p) for p in plan_batches(lengths, n_heads=2, batch_size=64)][-1] == 500 % 64
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        plan_batches(lengths, n_heads=2, batch_size=0)


def test_default_model_loads_offline():
    if not sclcm.tl.shipped_models():
        pytest.skip("no model is shipped yet (sclcm/models/pretrained/ is empty)")
    model = sclcm.tl.get_model(device="cpu")
    adata = subsample(PBMC3K)[:20].copy()
    sclcm.tl.embed(adata, device="cpu")
    assert adata.obsm["X_sclcm"].shape == (20, model.config.d_model)
    assert adata.uns["sclcm"]["model"] == sclcm.tl.DEFAULT_MODEL


def knn_accuracy(X: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour vote over the other cells."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X, return_distance=False)
    votes = labels[idx[:, 1:]]
    pred = np.array([max(set(v), key=list(v).count) for v in votes])
    return float((pred == labels).mean())


@pytest.mark.slow
def test_default_model_separates_held_out_cell_types(load):
    """The shipped model never saw Kang 2018: its embedding's neighbours share a cell's type
    as often as HVG + PCA's do, and far more often than a random model's."""
    if not sclcm.tl.shipped_models():
        pytest.skip("no model is shipped")
    from sclcm.metrics import pca_embedding

    adata = load(KANG_CTRL)[::4].copy()  # 2,171 cells of 5 donors
    labels = adata.obs["cell_type"].to_numpy()
    model = sclcm.tl.get_model(device="cpu")
    sclcm.tl.embed(adata, model, device="cpu")
    ours = knn_accuracy(adata.obsm["X_sclcm"], labels)
    pca = knn_accuracy(pca_embedding(adata), labels)
    torch.manual_seed(0)
    random = CellModel(model.config, tokenizer=model.tokenizer)
    rand = knn_accuracy(sclcm.tl.embed(adata, random, device="cpu", copy=True)
                        .obsm["X_sclcm"], labels)
    print(f"15-NN accuracy: shipped {ours:.3f}, HVG + PCA {pca:.3f}, random {rand:.3f}")
    assert ours >= pca - 0.02
    assert ours > rand + 0.1


def test_retired_shipped_name_names_its_replacement():
    with pytest.raises(ValueError, match=f"replaced by '{sclcm.tl.DEFAULT_MODEL}'"):
        sclcm.tl.get_model("sclcm-pbmc-small")


def test_bf16_embeddings_agree_with_float32():
    if not sclcm.tl.shipped_models():
        pytest.skip("no model is shipped yet (sclcm/models/pretrained/ is empty)")
    adata = subsample(PBMC3K)[:40].copy()
    a = sclcm.tl.embed(adata, device="cpu", copy=True)
    b = sclcm.tl.embed(adata, device="cpu", precision="bfloat16", copy=True)
    assert a.uns["sclcm"]["params"]["dtype"] == "float32"
    assert b.uns["sclcm"]["params"]["dtype"] == "bfloat16"
    x, y = a.obsm["X_sclcm"], b.obsm["X_sclcm"]
    assert not np.array_equal(x, y)
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cos.min() > 0.999
    with pytest.raises(ValueError, match="precision must be one of"):
        sclcm.tl.embed(adata, precision="fp8")
    assert "X_sclcm" not in adata.obsm


def test_csr_sparse_formats_agree():
    model = tiny_model("geneformer")
    adata = pbmc_cells(8)
    expected = sclcm.tl.embed(adata, model, copy=True).obsm["X_sclcm"]
    adata.X = sparse.csc_matrix(adata.X)
    sclcm.tl.embed(adata, model)
    np.testing.assert_allclose(adata.obsm["X_sclcm"], expected, **EMBED_TOL)


# --- the demo's embedding step ----------------------------------------------------------
# scanpy 1.11's UMAP plot calls a colormap method matplotlib is phasing out
@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")
def test_demo_embeds_kang_ctrl_to_a_umap_and_a_quality_table(tmp_path, model_dir, capsys):
    from sclcm._demo_embed import demo_embed

    data = data_path(KANG_CTRL).parent
    table = demo_embed(data, tmp_path, str(model_dir("geneformer")), max_cells=400)
    printed = capsys.readouterr().out
    assert "embedded 400 Kang 2018 control PBMCs" in printed
    assert "embedding quality on Kang 2018 ctrl" in printed
    assert (tmp_path / "kang_ctrl_umap.png").stat().st_size > 10_000
    saved = ad.read_h5ad(tmp_path / "kang_ctrl_sclcm.h5ad")
    assert {"X_sclcm", "X_umap"} <= set(saved.obsm)
    assert list(table.index) == ["X_sclcm", "HVG + PCA", "PCA (all genes)"]
    assert table.loc["HVG + PCA", "NMI"] > 0.5  # the reference separates PBMC types
    assert (tmp_path / "embedding_quality.csv").exists()


def test_demo_embed_says_so_without_a_model(tmp_path, capsys, monkeypatch):
    from sclcm._demo_embed import demo_embed

    monkeypatch.setattr(sclcm.tl, "shipped_models", list)
    assert demo_embed(tmp_path, tmp_path) is None
    assert "no model is shipped yet" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
