# %% [markdown]
# # Pretraining a model on a Census-shaped store
#
# Pretraining reads cells from the CELLxGENE Census, or from a local store of the same
# shape. This tutorial writes such a store from two real datasets, pretrains a tiny
# Geneformer-style model on it with `sclcm pretrain` (the same command trains the large
# shapes on many GPUs), draws the loss curves, and embeds a dataset the model never saw.
# The model is tiny and trained for a few hundred CPU steps: enough to see the losses fall
# and the cell types separate, not a model to use (the shipped `sclcm-small` is one).
#
# Run as a script (`python tutorials/06_pretraining.py`) or open as a notebook with
# jupytext. Reads the data from `$SCLCM_DATA`; writes the store, the run and the figures
# into `$TUTORIAL_OUT`.

# %%
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import cellxgene_census
import matplotlib.pyplot as plt
import scanpy as sc
import yaml

import sclcm
from sclcm.data import write_local_census

DATA = Path(os.environ.get("SCLCM_DATA", "../shared/data"))
OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(exist_ok=True)
sclcm.settings.verbosity = "warning"

# %% [markdown]
# ## A local Census from two datasets
#
# `write_local_census` resolves each dataset's genes to Ensembl IDs, puts it in the
# experiment of its species and writes the Census's tables (`census_info`, `obs` with the
# Census columns, `var`, raw counts). Here: the 10x pbmc3k PBMCs and Baron et al. 2016's
# human pancreas cells (its `cell_type` and `donor` columns become the Census's
# `cell_type` and `donor_id`).

# %%
uri = write_local_census(
    [DATA / "sctypegsea_10x_pbmc3k_raw_2700.h5ad", DATA / "came_baron2016_pancreas_human_2142.h5ad"],
    OUT / "census", names=["pbmc3k", "baron_human"], overwrite=True)
with cellxgene_census.open_soma(uri=uri) as census:
    print(census["census_info"]["datasets"].read().concat().to_pandas()[
        ["dataset_id", "dataset_title", "dataset_total_cell_count"]])
    obs = cellxgene_census.get_obs(census, "homo_sapiens",
                                   column_names=["dataset_id", "cell_type", "donor_id"])
print(obs.groupby(["dataset_id", "donor_id"], observed=True).size())

# %% [markdown]
# ## The run's config
#
# One YAML file describes a run (see the pretraining guide for every key). The cells come
# from the store's human experiment; a Census run holds out whole groups of cells by an obs
# filter (here one Baron donor, scored at the start and the end), so that no donor is on
# both sides. A tiny Geneformer (64 tokens a cell, genes detected in at least 100 training
# cells) learns masked gene identity plus the cell-level reconstruction objective, which
# makes the pooled cell embedding keep what separates cell types.

# %%
donors = obs["donor_id"].astype(str)
held_out = donors[donors != "unknown"].value_counts().index[-1]  # the smallest Baron donor
config = {
    "data": {"census": {"uri": uri, "organism": "Homo sapiens"}, "block_size": 256,
             "held_out_filter": f"donor_id == '{held_out}'", "held_out_max_cells": 300},
    "tokenizer": {"options": {"max_len": 64}},
    "vocab": {"min_cells": 100},
    "model": {"preset": "geneformer", "size": "tiny"},
    "objectives": {"token": 1.0, "reconstruction": 10.0, "panel_size": 500},
    "optim": {"lr": 3e-3, "warmup_steps": 20, "max_steps": 150, "max_tokens": 2048},
    "trainer": {"val_every": 50, "checkpoint_every": 0, "log_every": 10, "seed": 0},
    "out_dir": str(OUT / "run"),
}
(OUT / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
print((OUT / "run.yaml").read_text())

# %% [markdown]
# ## `sclcm pretrain`
#
# From a shell this is `sclcm pretrain --config run.yaml`; here the same command runs in a
# subprocess. `--set key=value` overrides any key of the file.

# %%
env = {**os.environ, "SCLCM_PROGRESS": "0"}
run = subprocess.run([sys.executable, "-m", "sclcm", "pretrain", "--config",
                      str(OUT / "run.yaml")], capture_output=True, text=True, env=env)
if run.returncode != 0:
    raise RuntimeError(f"sclcm pretrain failed:\n{run.stderr[-3000:]}")
# the command prints metrics.json at the end: held-out losses at step 0 and at the end
metrics = yaml.safe_load((OUT / "run" / "metrics.json").read_text())  # JSON is YAML
print(f"{metrics['steps']} steps, {metrics['train_cells']:,} training cells, "
      f"{metrics['vocab_genes']:,} genes, {metrics['n_params']:,} parameters, "
      f"{metrics['wall_time_s']:.0f} s")
for key in ("loss_step0", "loss_end", "baseline", "reconstruction_step0",
            "reconstruction_end", "reconstruction_baseline"):
    print(f"{key:>24}: {metrics[key]:.3f}")

# %% [markdown]
# ## Loss curves
#
# `sclcm.pl.pretraining` reads the run's Lightning log: one panel per objective, the
# training loss smoothed, the held-out loss at each validation, and the baselines of
# `metrics.json` (the token objective's: predicting every masked gene by its frequency;
# the reconstruction's: every cell predicted by the training cells' mean panel).

# %%
fig = sclcm.pl.pretraining(OUT / "run", smooth=5, save=OUT / "pretraining_loss.png")

# %% [markdown]
# ## Embedding unseen cells with the new model
#
# The run's `model/` directory is a model for every tool. Kang et al. 2018's IFN-beta
# PBMCs are in neither dataset of the store.

# %%
kang = ad.read_h5ad(DATA / "muscat_kang2018_ifnb_pbmc_1556.h5ad")
sclcm.tl.embed(kang, model=OUT / "run" / "model")
print(kang.uns["sclcm"]["model"], kang.obsm["X_sclcm"].shape)
sc.pp.neighbors(kang, use_rep="X_sclcm", random_state=0)
sc.tl.umap(kang, random_state=0)
kang.obsm["X_hvg_pca"] = sclcm.metrics.pca_embedding(kang)
table = sclcm.metrics.quality_table(kang, {"tiny model": "X_sclcm", "HVG + PCA": "X_hvg_pca"},
                                    label_key="cell_type", batch_key="sample")
print(table.to_string(float_format="{:.3f}".format))

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
sc.pl.umap(kang, color="cell_type", ax=axes[0], show=False, frameon=False,
           title=f"tiny model, {metrics['steps']} steps: cell type")
sc.pl.umap(kang, color="condition", ax=axes[1], show=False, frameon=False,
           title="condition")
fig.tight_layout()
fig.savefig(OUT / "pretraining_umap.png", dpi=110, bbox_inches="tight")
print("wrote", OUT / "pretraining_loss.png", OUT / "pretraining_umap.png")
print(f"AvgBIO: tiny model {table.loc['tiny model', 'AvgBIO']:.3f}, "
      f"HVG + PCA {table.loc['HVG + PCA', 'AvgBIO']:.3f}")
