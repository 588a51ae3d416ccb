# %% [markdown]
# # Running a published model: scGPT, by name, offline
#
# Run as a script (`python tutorials/03_published_models.py`) or open as a notebook with
# jupytext. Reads pbmc3k from `$SCLCM_DATA` (default `../shared/data`).
#
# Published checkpoints are listed in a registry; `sclcm.models.load(name)` fetches their
# files through the Hugging Face cache, checks their SHA-256, converts them to a sclcm model
# once and keeps it. So that this tutorial runs anywhere, without network, it writes a
# small **random** checkpoint in scGPT's published layout (`best_model.pt`, `vocab.json`,
# `args.json`) and uses it where you would use the real whole-human folder: the embeddings
# below show the mechanics, not biology.

# %%
import os
import shutil
import time
from pathlib import Path

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np

import sclcm

DATA = Path(os.environ.get("SCLCM_DATA", "../shared/data"))
OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(exist_ok=True)
# a Hugging Face cache of this tutorial's own (emptied: the run starts from nothing), so
# that it leaves yours as it is
shutil.rmtree(OUT / "hf", ignore_errors=True)
os.environ["HF_HUB_CACHE"] = str(OUT / "hf" / "hub")
sclcm.settings.verbosity = "warning"

# %% [markdown]
# ## The registry

# %%
print(sclcm.models.published()[["model", "family", "parameters", "licence", "pinned"]]
      .to_string())

# %% [markdown]
# scGPT's checkpoints are not on the hub: the entry says where to get them.

# %%
try:
    sclcm.models.load("scgpt-human")
except sclcm.InputError as e:
    print(e)

# %% [markdown]
# ## A checkpoint in scGPT's layout
#
# With the real model, download the whole-human folder instead; here, random weights of a
# smaller shape over pbmc3k's genes (gene symbols, as scGPT's vocabulary has them).

# %%
adata = ad.read_h5ad(DATA / "sctypegsea_10x_pbmc3k_raw_2700.h5ad")[:300].copy()
folder = OUT / "scGPT_random"
sclcm.models.write_scgpt_checkpoint(folder, adata.var_names, n_layers=4, d_model=128,
                                    n_heads=4, d_ff=256)
print(sorted(p.name for p in folder.iterdir()))

# %% [markdown]
# `import_scgpt` reads it strictly (every tensor placed, every shape checked against
# `args.json`) and returns a `CellModel` with scGPT's tokenizer settings: 51 quantile bins,
# `<cls>` first with value -2, at most 1,200 tokens per cell.

# %%
model = sclcm.models.import_scgpt(folder)
print(model.config.n_layers, "layers x", model.config.d_model, "| tokenizer:", model.tokenizer)

# %% [markdown]
# ## By name, converted once
#
# `load(name, directory=...)` converts the folder and caches the sclcm model beside the
# Hugging Face cache; the second call, and every tool given the name, reuses it.

# %%
for attempt in ("first", "second"):
    start = time.perf_counter()
    sclcm.models.load("scgpt-human", directory=folder)
    print(f"{attempt} load: {time.perf_counter() - start:.2f} s")

os.environ["HF_HUB_OFFLINE"] = "1"  # a cluster node without network: the cache suffices
sclcm.tl.embed(adata, model="scgpt-human")
emb = adata.obsm["X_sclcm"]
print(emb.shape, "| norms (scGPT L2-normalises the <cls> embedding):",
      np.round(np.linalg.norm(emb, axis=1)[:3], 6))
print(adata.uns["sclcm"]["model"])

# %% [markdown]
# ## The embedding
#
# Random weights: the picture shows that every cell got a vector, nothing more.

# %%
centered = emb - emb.mean(0)
pcs = np.linalg.svd(centered, full_matrices=False)[2][:2]
xy = centered @ pcs.T
counts = np.asarray(adata.X.sum(1)).ravel()
fig, ax = plt.subplots(figsize=(4.5, 4))
sc_ = ax.scatter(xy[:, 0], xy[:, 1], c=np.log10(counts), s=6, cmap="viridis")
fig.colorbar(sc_, label="log10 counts")
ax.set(xlabel="PC 1", ylabel="PC 2", title="random scGPT-layout model, 300 pbmc3k cells")
fig.tight_layout()
fig.savefig(OUT / "published_model_pca.png", dpi=100)
print(f"wrote {OUT / 'published_model_pca.png'}")
