"""The demo's embedding step: a held-out real dataset through the default model to a UMAP."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

#: Kang 2018 control PBMCs: labelled, across donors, and never used in pretraining.
KANG_CTRL = "muscat2019_kang2018_ctrl_pbmc_8684.h5ad"


def demo_embed(data: Path, out: Path, model: str | None = None, *,
               max_cells: int | None = None) -> pd.DataFrame | None:
    """Embed Kang 2018 ctrl, draw its UMAP by cell type, save it, print the quality table.

    Writes ``kang_ctrl_sclcm.h5ad``, ``kang_ctrl_umap.png`` and ``embedding_quality.csv``
    to ``out``. Skips (returning ``None``) with a message when no model is given and none is
    shipped, or the dataset is not in ``data``. ``max_cells`` takes a random subset.
    """
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scanpy as sc

    from . import metrics, tl

    path = data / KANG_CTRL
    if model is None and not tl.shipped_models():
        print("\nEmbedding step skipped: no model is shipped yet (sclcm/models/pretrained/ is "
              "empty). Run `sclcm demo --data DIR --model MODEL_DIR` with a model directory "
              "(written by save_pretrained or the pretraining run).")
        return None
    if not path.exists():
        print(f"\nEmbedding step skipped: {path} not found.")
        return None
    adata = ad.read_h5ad(path)
    if max_cells is not None and max_cells < adata.n_obs:
        rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, max_cells, replace=False))
        adata = adata[rows].copy()
    start = time.perf_counter()
    tl.embed(adata, model)
    seconds = time.perf_counter() - start
    rec = adata.uns["sclcm"]
    print(f"\nembedded {adata.n_obs:,} Kang 2018 control PBMCs (held out from pretraining) "
          f"with {rec['model']} ({rec['config']['tokenizer']}, {rec['config']['n_layers']} "
          f"layers x {rec['config']['d_model']}) in {seconds:.1f} s "
          f"({adata.n_obs / seconds:,.0f} cells/s); {rec['gene_coverage']:.1%} of genes, "
          f"{rec['count_coverage']:.1%} of counts reach the model")
    usable = ~np.isnan(adata.obsm["X_sclcm"]).any(axis=1)
    if not usable.all():
        print(f"{(~usable).sum()} cells without a model gene are left out of the UMAP")
    # exact kNN: scanpy 1.11's pynndescent path (from 8,192 cells) fails on recent scipy
    shown = adata[usable].copy()
    sc.pp.neighbors(shown, use_rep="X_sclcm", transformer="sklearn", random_state=0)
    sc.tl.umap(shown, random_state=0)
    shown.write_h5ad(out / "kang_ctrl_sclcm.h5ad")
    shown.obs["donor"] = shown.obs["donor"].astype(str).astype("category")  # ids, not numbers
    fig = sc.pl.umap(shown, color=["cell_type", "donor"], show=False, return_fig=True,
                     title=["cell type (sclcm embedding)", "donor"], wspace=0.45)
    fig.savefig(out / "kang_ctrl_umap.png", dpi=120, bbox_inches="tight")
    table = metrics.compare_with_pca(adata, "X_sclcm", label_key="cell_type",
                                     batch_key="donor")
    table.to_csv(out / "embedding_quality.csv")
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200):
        print("\nembedding quality on Kang 2018 ctrl (scIB bio-conservation; bASW over "
              "donors):\n" + table.to_string())
    print(f"Outputs in {out}/: kang_ctrl_sclcm.h5ad (obsm X_sclcm, X_umap), "
          "kang_ctrl_umap.png, embedding_quality.csv.")
    return table
