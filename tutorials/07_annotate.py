# %% [markdown]
# # Annotating cell types: fine-tune on a labelled reference, label a new donor
#
# `sclcm.train.finetune` trains a classification head on the shipped model's pooled cell
# embedding with a labelled reference; `sclcm.tl.annotate` labels any query with it, and
# leaves `"Unassigned"` the cells it is not confident about. This tutorial fine-tunes on
# four donors of the Kang et al. 2018 control PBMCs (held out from the shipped model's
# pretraining), annotates the fifth donor, and compares with `method="knn"`, which needs
# no training: each query cell takes the vote of its nearest reference cells in the
# model's embedding. One reference type is then left out, to see it come out Unassigned.
#
# Run as a script (`python tutorials/07_annotate.py`) or open as a notebook with jupytext.
# Reads the data from `$SCLCM_DATA` (default `../shared/data`); writes its figures into
# `$TUTORIAL_OUT` (default `tutorial_output`).

# %%
import os
from pathlib import Path

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc
import torch

import sclcm

DATA = Path(os.environ.get("SCLCM_DATA", "../shared/data"))
OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(exist_ok=True)
sclcm.settings.verbosity = "warning"
torch.set_num_threads(1)

# %% [markdown]
# ## Reference and query
#
# Raw counts, labelled by `cell_type` (B, CD14+ monocytes, CD4 T, NK). The reference is
# 600 cells of four donors, the query 300 cells of donor 1015: a new donor is the
# boundary an annotation has to cross in practice.

# %%
kang = ad.read_h5ad(DATA / "muscat2019_kang2018_ctrl_pbmc_8684.h5ad")
donor = kang.obs["donor"].astype(str)
rng = np.random.default_rng(0)


def sample(mask, n):
    rows = np.flatnonzero(mask)
    return kang[np.sort(rng.choice(rows, n, replace=False))].copy()


ref = sample(donor != "1015", 600)
query = sample(donor == "1015", 300)
print(ref.obs["cell_type"].value_counts().to_string())

# %% [markdown]
# ## Fine-tuning
#
# Whole donors of the reference are held out for validation (`groupby="donor"`), so the
# step kept is the one that generalizes to a new donor. A short run on one CPU thread:
# the three lower blocks stay frozen, the top block and the head learn (the setting
# `benchmarks/annotation.py` chose). After training, a temperature is fitted on the
# validation cells so that the probabilities the threshold reads are calibrated.

# %%
model = sclcm.train.finetune(ref, "cell_type", "sclcm-small", groupby="donor",
                             max_steps=40, lr=1e-3, freeze_layers=3, max_tokens=4096,
                             val_every=10, progress_bar=False, accelerator="cpu")
m = model.finetune_metrics
print(f"best validation macro-F1 {m['best_val_macro_f1']:.3f} at step {m['best_step']}, "
      f"temperature {m['temperature']:.2f}")

# %% [markdown]
# ## Annotating the new donor
#
# `obs["sclcm_label"]` holds the label, `obsm["sclcm_label_probabilities"]` every class's
# probability, and `obs["sclcm_label_score"]` the confidence: the top probability times
# the cell's *typicality*, how its distance to the classifier's training cells (in the
# model's embedding) compares with the training cells' distances among themselves, after
# the query's overall shift (a new donor, a condition) is divided out. Cells scoring below
# the threshold (0.05 by default; 0.02 for kNN) are `"Unassigned"`. `sclcm.pl.annotation` draws the
# confusion matrix (each row a true type, normalized to 1) and each type's F1.

# %%
sclcm.tl.annotate(query, model)
print(query.obs["sclcm_label"].value_counts().to_string())
fig = sclcm.pl.annotation(query, truth="cell_type", save=OUT / "annotate_confusion.png",
                          show=False)

# %% [markdown]
# ## The query's embedding, coloured by label and by confidence
#
# The fine-tuned model still embeds (`sclcm.tl.embed`); its UMAP shows where the labels
# and the low-confidence cells lie.

# %%
sclcm.tl.embed(query, model)
sc.pp.neighbors(query, use_rep="X_sclcm", random_state=0)
sc.tl.umap(query, random_state=0)
fig, axes = plt.subplots(1, 3, figsize=(14, 4))
sc.pl.umap(query, color="cell_type", ax=axes[0], show=False, title="true type")
sc.pl.umap(query, color="sclcm_label", ax=axes[1], show=False, title="predicted")
sc.pl.umap(query, color="sclcm_label_score", ax=axes[2], show=False, vmin=0, vmax=1,
           title="confidence", color_map="viridis")
fig.tight_layout()
fig.savefig(OUT / "annotate_umap.png", dpi=110)

# %% [markdown]
# ## Without training: kNN label transfer, and a type the reference lacks
#
# `method="knn"` embeds reference and query with the same model; each query cell takes the
# distance-weighted vote of its 15 nearest reference cells, and its score is the winning
# share of the vote times its typicality against the reference. Here NK cells are left
# out of the reference: the query's NK cells have no type to go to, and should come out
# Unassigned.

# %%
no_nk = ref[ref.obs["cell_type"] != "NK cells"].copy()
sclcm.tl.annotate(query, method="knn", reference=no_nk, label_key="cell_type",
                  key_added="knn")
nk = (query.obs["cell_type"] == "NK cells").to_numpy()
unassigned = (query.obs["knn"] == "Unassigned").to_numpy()
print(f"Unassigned: {unassigned[nk].mean():.0%} of the {nk.sum()} NK cells, "
      f"{unassigned[~nk].mean():.1%} of the other cells")
fig = sclcm.pl.annotation(query, "knn", truth="cell_type", save=OUT / "annotate_knn.png",
                          show=False)
print("wrote", ", ".join(str(OUT / f"annotate_{n}.png") for n in ("confusion", "umap",
                                                                  "knn")))
