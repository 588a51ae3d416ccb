# %% [markdown]
# # Gene networks: the interferon programme in stimulated and control PBMCs
#
# Run as a script (`python tutorials/08_gene_networks.py`) or open as a notebook with
# jupytext. Reads the Kang et al. 2018 IFN-beta PBMCs (1,556 cells, control and stimulated)
# from `$SCLCM_DATA` (default `../shared/data`) and uses the shipped model, `sclcm-small`.
#
# A transformer's attention and its contextual gene embeddings can be read as gene-gene
# networks, one per cell state. Whether they hold more than co-expression is a question to
# measure, not to assume: each network here is set beside co-expression on the same genes
# and cells (`benchmarks/gene_networks.py` measures them against real knockouts).

# %%
import os
from pathlib import Path

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

import sclcm

DATA = Path(os.environ.get("SCLCM_DATA", "../shared/data"))
OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(exist_ok=True)
sclcm.settings.verbosity = "warning"

adata = ad.read_h5ad(DATA / "muscat_kang2018_ifnb_pbmc_1556.h5ad")
print(adata.obs["condition"].value_counts().to_dict())
model = sclcm.tl.get_model()  # the shipped default, sclcm-small

# genes of the model's vocabulary expressed in at least 5% of the cells
report = sclcm.genes.resolve(adata, count_coverage=False)
in_vocab = model.tokenizer.column_map(adata, report=report).slot >= 0
frac = np.asarray((adata.X > 0).mean(0)).ravel()
genes = list(adata.var_names[in_vocab & (frac >= 0.05)])
print(len(genes), "genes")

# %% [markdown]
# ## The interferon-induced genes, from the data alone
#
# Genes up in stimulated cells (Mann-Whitney U on log1p counts per 10,000, BH FDR < 0.01,
# log2 fold change > 1): the set a programme should recover.

# %%
cols = adata.var_names.get_indexer(genes)
X = adata.X[:, cols].toarray().astype(np.float64)
y = np.log1p(X / np.asarray(adata.X.sum(1)) * 1e4)
stim = adata.obs["condition"].to_numpy() == "stim"
p = stats.mannwhitneyu(y[stim], y[~stim], axis=0).pvalue
fc = np.log2((np.expm1(y[stim]).mean(0) + 1) / (np.expm1(y[~stim]).mean(0) + 1))
induced = set(np.asarray(genes)[(stats.false_discovery_control(p) < 0.01) & (fc > 1)])
print(len(induced), "induced genes, e.g.", sorted(induced & {"ISG15", "IFIT1", "MX1", "IFI6",
                                                              "RSAD2", "OAS1"}))

# %% [markdown]
# ## Attention per condition
#
# `sclcm.tl.attention` runs the cells through the model; the last layer's attention
# probabilities (all heads) are averaged over each condition's cells, gene pair by gene pair,
# over the cells in which both genes are tokens. Over all genes it keeps each gene's 50
# strongest edges; for a heatmap of a few genes, a second run on those genes keeps every
# pair (the probabilities are the same: each is a softmax over all of a cell's tokens).

# %%
sclcm.tl.attention(adata, model, groupby="condition", genes=genes, top_k=50)
att = adata.uns["sclcm_attention"]
print({str(g): att["n_cells"][g] for g in att["groups"]})
isgs = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1", "OAS1", "ISG20", "LY6E", "IFITM3", "CXCL10"]
isgs = [g for g in isgs if g in genes]
sclcm.tl.attention(adata, model, groupby="condition", genes=isgs, top_k=None,
                   key_added="sclcm_attention_isgs")
pairs = adata.uns["sclcm_attention_isgs"]["n_pairs"]
print("ISG pairs seen together in >= 5 cells:", {g: pairs[g].nnz for g in ("ctrl", "stim")})
axes = sclcm.pl.attention(adata, isgs, key="sclcm_attention_isgs", show=False)
axes[0].figure.savefig(OUT / "08_attention_isgs.png", dpi=120, bbox_inches="tight")

# %% [markdown]
# ## Three networks, their programmes, and the interferon programme
#
# For each method, Leiden programmes of the graph of each gene's 10 strongest edges. The
# programme that holds most of the induced genes: how many of its genes are induced
# (precision) and how many of the induced genes it holds (recall).

# %%
for method in ("attention", "embedding", "coexpression"):
    sclcm.tl.gene_network(adata, method=method, model=model, groupby="condition", genes=genes,
                          compare=("ctrl", "stim"))
    rec = adata.uns[f"sclcm_network_{method}"]
    for group in ("ctrl", "stim"):
        prog = rec["programmes"][group]
        best = max(prog.cat.categories, key=lambda c: len(induced & set(prog.index[prog == c])))
        members = set(prog.index[prog == best])
        hit = len(induced & members)
        print(f"{method:<13} {group}: programme {best} ({len(members)} genes) holds {hit} of "
              f"{len(induced)} induced genes: precision {hit / len(members):.2f}, recall "
              f"{hit / len(induced):.2f}")

# %% [markdown]
# ## What changes with stimulation
#
# The pairs whose weight changes most from control to stimulated cells (here in the
# contextual-embedding network), and ISG15's neighbourhood in the stimulated cells.

# %%
diff = adata.uns["sclcm_network_embedding"]["difference"]
print(diff.head(10).to_string(index=False))
print("share of the 50 most changed pairs that touch an induced gene:",
      f"{np.mean(diff['gene_1'].isin(induced) | diff['gene_2'].isin(induced)):.2f}")
fig, axs = plt.subplots(1, 2, figsize=(11, 5))
for ax, group in zip(axs, ("ctrl", "stim"), strict=True):
    sclcm.pl.gene_network(adata, "ISG15", key="sclcm_network_embedding", group=group,
                          n_neighbors=10, ax=ax, show=False)
fig.savefig(OUT / "08_isg15_neighbourhood.png", dpi=120, bbox_inches="tight")
print("wrote", OUT / "08_attention_isgs.png", "and", OUT / "08_isg15_neighbourhood.png")
