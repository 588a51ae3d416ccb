"""sclcm.metrics on hand-made embeddings with known answers, and the PCA references."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import KANG_IFNB

from sclcm import metrics

pytest.importorskip("igraph", reason="Leiden clustering needs igraph (sclcm[bench])")


def blobs(n_per: int = 40, n_types: int = 3, spread: float = 0.1, seed: int = 0):
    """Well separated clusters, one per type: ``(X, labels)``."""
    rng = np.random.default_rng(seed)
    centers = np.eye(n_types, 5) * 20
    X = np.concatenate([c + rng.normal(0, spread, (n_per, 5)) for c in centers])
    return X.astype(np.float32), np.repeat([f"t{i}" for i in range(n_types)], n_per)


def test_perfect_separation_scores_one():
    X, labels = blobs()
    scores = metrics.bio_conservation(X, labels)
    assert scores["NMI"] == pytest.approx(1.0)
    assert scores["ARI"] == pytest.approx(1.0)
    assert scores["n_clusters"] == 3
    assert scores["cASW"] > 0.98
    assert scores["AvgBIO"] > 0.99
    assert np.isnan(scores["bASW"])  # no batches given


def test_labels_unrelated_to_the_embedding_score_low():
    X, labels = blobs()
    shuffled = np.random.default_rng(1).permutation(labels)
    scores = metrics.bio_conservation(X, shuffled)
    assert scores["NMI"] < 0.1
    assert abs(scores["ARI"]) < 0.1
    assert 0.4 < scores["cASW"] < 0.55  # silhouette near 0


def test_batch_asw_mixed_versus_separated():
    X, labels = blobs(n_per=40)
    mixed = np.tile(["b1", "b2"], len(labels) // 2)  # batches interleaved within each type
    assert metrics.silhouette_batch(X, mixed, labels) > 0.85  # |silhouette| ~ noise
    # within each type, batch b2 shifted far away: batches separate
    apart = np.where(np.arange(len(labels)) % 40 < 20, "b1", "b2")
    X_apart = X + (apart == "b2")[:, None] * np.r_[0, 0, 0, 0, 5].astype(np.float32)
    assert metrics.silhouette_batch(X_apart, apart, labels) < 0.1
    # a type in one batch only is left out, as in scIB
    one = np.where(labels == "t0", "b1", mixed)
    assert metrics.silhouette_batch(X, one, labels) == pytest.approx(
        metrics.silhouette_batch(X[labels != "t0"], mixed[labels != "t0"],
                                 labels[labels != "t0"]))
    assert np.isnan(metrics.silhouette_batch(X, np.full(len(labels), "b"), labels))


def test_quality_table_skips_cells_without_an_embedding():
    import anndata as ad

    X, labels = blobs()
    adata = ad.AnnData(obs={"cell_type": labels, "batch": np.tile(["a", "b"], 60)})
    with_nan = X.copy()
    with_nan[:5] = np.nan
    adata.obsm["X_emb"] = with_nan
    table = metrics.quality_table(adata, {"emb": "X_emb", "raw": X}, label_key="cell_type",
                                  batch_key="batch")
    assert list(table.index) == ["emb", "raw"]
    assert list(table.columns[:5]) == ["NMI", "ARI", "cASW", "AvgBIO", "bASW"]
    assert table.loc["emb", "n_cells"] == 115
    assert table.loc["raw", "n_cells"] == 120
    assert (table[["NMI", "ARI"]] > 0.99).all().all()


def test_pca_references_on_real_cells(load):
    adata = load(KANG_IFNB)
    X_before = adata.X.copy()
    hvg = metrics.pca_embedding(adata)
    raw = metrics.pca_embedding(adata, n_top_genes=None, scale=False)
    assert hvg.shape == raw.shape == (adata.n_obs, 50)
    assert (X_before != adata.X).nnz == 0  # counts untouched
    assert "highly_variable" not in adata.var
    scores = metrics.bio_conservation(hvg, adata.obs["cell_type"], adata.obs["sample"])
    assert scores["NMI"] > 0.5  # PBMC types separate on HVG PCA
    assert 0 < scores["bASW"] <= 1
