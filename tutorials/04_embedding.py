# %% [markdown]
# # Embedding cells with the shipped model: UMAP, Leiden and quality against PCA
#
# `sclcm.tl.embed` puts a cell embedding in `adata.obsm["X_sclcm"]`, where scanpy's
# neighbors, UMAP and Leiden read it like any other representation. This tutorial embeds
# real control PBMCs of Kang et al. 2018 (labelled by cell type, five donors, held out from
# the shipped model's pretraining) with the shipped model `sclcm-small`, clusters them, and
# scores the embedding against the usual scanpy reference, PCA of highly variable genes,
# with the scIB bio-conservation metrics of `sclcm.metrics`.
#
# Run as a script (`python tutorials/04_embedding.py`) or open as a notebook with jupytext.
# Reads the data from `$SCLCM_DATA` (default `../shared/data`); writes its figures into
# `$TUTORIAL_OUT` (default `tutorial_output`).

# %%
import os
from pathlib import Path

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc

import sclcm

DATA = Path(os.environ.get("SCLCM_DATA", "../shared/data"))
OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(exist_ok=True)
sclcm.settings.verbosity = "warning"

# %% [markdown]
# ## The cells
#
# Raw counts of 8,684 control PBMCs (Ensembl IDs in `var_names`); 2,000 of them, drawn at
# random, keep the tutorial short. `sclcm.pp.check_counts` refuses normalized data, which
# the model's tokenizer cannot read.

# %%
adata = ad.read_h5ad(DATA / "muscat2019_kang2018_ctrl_pbmc_8684.h5ad")
rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, 2000, replace=False))
adata = adata[rows].copy()
adata.obs["donor"] = adata.obs["donor"].astype(str).astype("category")  # ids, not numbers
sclcm.pp.check_counts(adata)
print(adata)
print(adata.obs["cell_type"].value_counts().to_string())

# %% [markdown]
# ## Embed with the shipped model
#
# With no `model` argument, `embed` uses the model shipped in the package (`sclcm-small`,
# a 2.6 M-parameter Geneformer-style model); a directory written by `save_pretrained`, a
# published model's name or a `CellModel` work the same way. The record in
# `uns["sclcm"]` says how many of the genes and counts reached the model.

# %%
sclcm.tl.embed(adata)
rec = adata.uns["sclcm"]
print(adata.obsm["X_sclcm"].shape, rec["model"])
print(f"genes reaching the model: {rec['gene_coverage']:.1%}, "
      f"counts: {rec['count_coverage']:.1%}")

# %% [markdown]
# ## Neighbors, UMAP and Leiden, as with any representation
#
# The reference is scanpy's standard recipe (normalize, log1p, 2,000 highly variable genes,
# scale, 50 principal components), computed by `sclcm.metrics.pca_embedding` without
# touching `adata.X`.

# %%
adata.obsm["X_hvg_pca"] = sclcm.metrics.pca_embedding(adata)
umaps = {}
for rep in ("X_sclcm", "X_hvg_pca"):
    sc.pp.neighbors(adata, use_rep=rep, key_added=rep, random_state=0)
    sc.tl.umap(adata, neighbors_key=rep, random_state=0)
    umaps[rep] = adata.obsm["X_umap"].copy()
    sc.tl.leiden(adata, neighbors_key=rep, key_added=f"leiden_{rep}", resolution=0.5,
                 flavor="igraph", n_iterations=2, directed=False, random_state=0)
adata.obsm["X_umap_sclcm"], adata.obsm["X_umap_hvg_pca"] = umaps["X_sclcm"], umaps["X_hvg_pca"]
print(pd.crosstab(adata.obs["cell_type"], adata.obs["leiden_X_sclcm"]))

# %% [markdown]
# ## The two UMAPs side by side
#
# Top: coloured by the published cell types; bottom: by donor (a good embedding mixes the
# donors within each cell type).

# %%
fig, axes = plt.subplots(2, 2, figsize=(10, 8.5))
for col, (basis, title) in enumerate([("umap_sclcm", "sclcm-small"),
                                      ("umap_hvg_pca", "HVG + PCA")]):
    for row, color in enumerate(["cell_type", "donor"]):
        sc.pl.embedding(adata, basis=basis, color=color, ax=axes[row, col], show=False,
                        title=f"{title}: {color.replace('_', ' ')}",
                        legend_loc="right margin" if col == 1 else None, frameon=False)
fig.tight_layout()
fig.savefig(OUT / "embedding_umaps.png", dpi=110, bbox_inches="tight")

# %% [markdown]
# ## Leiden clusters of the sclcm embedding

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
sc.pl.embedding(adata, basis="umap_sclcm", color="leiden_X_sclcm", ax=axes[0], show=False,
                title="Leiden (resolution 0.5) on sclcm-small", legend_loc="on data",
                frameon=False)
sc.pl.embedding(adata, basis="umap_sclcm", color="cell_type", ax=axes[1], show=False,
                title="published cell types", frameon=False)
fig.tight_layout()
fig.savefig(OUT / "embedding_leiden.png", dpi=110, bbox_inches="tight")

# %% [markdown]
# ## Quality against PCA
#
# `sclcm.metrics.quality_table` scores each embedding: NMI and ARI of Leiden clusters
# against the cell types at the best of 20 resolutions, the cell-type silhouette (cASW),
# their mean (AvgBIO), and the batch silhouette over donors (bASW, 1 = donors mixed).

# %%
table = sclcm.metrics.quality_table(
    adata, {"sclcm-small": "X_sclcm", "HVG + PCA": "X_hvg_pca"},
    label_key="cell_type", batch_key="donor")
with pd.option_context("display.float_format", "{:.3f}".format):
    print(table)

# %%
scores = table[["NMI", "ARI", "cASW", "AvgBIO", "bASW"]]
fig, ax = plt.subplots(figsize=(6.5, 3.2))
width = 0.8 / len(scores)
for i, (name, row) in enumerate(scores.iterrows()):
    ax.bar(np.arange(scores.shape[1]) + i * width, row, width, label=name)
ax.set_xticks(np.arange(scores.shape[1]) + width * (len(scores) - 1) / 2, scores.columns)
ax.set_ylim(0, 1)
ax.set_ylabel("score (higher is better)")
ax.set_title(f"Kang 2018 ctrl, {adata.n_obs:,} cells")
ax.legend(frameon=False, loc="lower right")
fig.tight_layout()
fig.savefig(OUT / "embedding_quality.png", dpi=110)
print("wrote", ", ".join(str(OUT / f"embedding_{n}.png") for n in ("umaps", "leiden",
                                                                    "quality")))
