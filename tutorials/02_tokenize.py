# %% [markdown]
# # Tokenizing cells: the four families on real PBMCs
#
# Run as a script (`python tutorials/02_tokenize.py`) or open as a notebook with jupytext.
# Reads pbmc3k from `$SCLCM_DATA` (default `../shared/data`).

# %%
import os
from pathlib import Path

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np

import sclcm
from sclcm.tokenizers import (
    GeneformerTokenizer,
    ScBERTTokenizer,
    ScFoundationTokenizer,
    ScGPTTokenizer,
    TokenizedCorpus,
)

DATA = Path(os.environ.get("SCLCM_DATA", "../shared/data"))
OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(exist_ok=True)
sclcm.settings.verbosity = "warning"

adata = ad.read_h5ad(DATA / "sctypegsea_10x_pbmc3k_raw_2700.h5ad", backed="r")
report = sclcm.genes.resolve(adata)          # resolve once, reuse for every tokenizer
vocab = sclcm.genes.GeneVocab.from_reference("human")
symbol = sclcm.genes.gene_table("human").symbol

# %% [markdown]
# ## Geneformer: genes ranked by expression relative to their corpus median

# %%
geneformer = GeneformerTokenizer(vocab).fit(adata, report=report)
batch = sclcm.pp.tokenize(adata, geneformer, report=report)
ids, values = batch.cell(0)
print(batch)
print("cell 0:", " ".join(symbol.get(g, g) for g in vocab.decode(ids[1:11])), "...")

# %% [markdown]
# ## scGPT: per-cell quantile bins

# %%
scgpt = ScGPTTokenizer(vocab, n_bins=51, max_len=1200, seed=0)
sb = sclcm.pp.tokenize(adata, scgpt, report=report)
ids, bins = sb.cell(0)
print(sb)
print("bins of cell 0:", np.bincount(bins[1:].astype(int), minlength=51)[1:])

# %% [markdown]
# ## scBERT and scFoundation

# %%
panel = sclcm.genes.GeneVocab.from_reference("human", biotypes=["protein_coding"])
scbert = sclcm.pp.tokenize(adata[:200].to_memory(), ScBERTTokenizer(panel), report=None)
scf = sclcm.pp.tokenize(adata, ScFoundationTokenizer(vocab), report=report)
print(scbert, "levels:", np.unique(scbert.values))
print(scf, "read depth S of cell 0:", scf.extras["depth_S"][0])

# %% [markdown]
# ## A corpus on disk for pretraining

# %%
corpus = sclcm.pp.tokenize(adata, geneformer, report=report, out=OUT / "pbmc3k_geneformer",
                           overwrite=True)
again = TokenizedCorpus(OUT / "pbmc3k_geneformer")
print(again, "first 64 cells:", again[:64])

# %% [markdown]
# ## Sequence lengths by family

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
bins = np.linspace(0, batch.lengths.max() + 50, 70)
for name, b, style in [("geneformer (+ <cls>, <eos>)", batch, "-"),
                       ("scfoundation", scf, "--"), ("scgpt (max 1,200)", sb, "-")]:
    ax.hist(b.lengths, bins=bins, histtype="step", label=name, linestyle=style)
ax.set_xlabel("tokens per cell")
ax.set_ylabel("cells")
ax.legend(frameon=False)
fig.tight_layout()
fig.savefig(OUT / "lengths.png", dpi=120)
print("wrote", OUT / "lengths.png")
