# %% [markdown]
# # Gene identity: from a real AnnData to model vocabulary tokens
#
# Run as a script (`python tutorials/01_gene_identity.py`) or open as a notebook with
# jupytext. It reads the real datasets of `$SCLCM_DATA` (default `../shared/data`).

# %%
import os
from pathlib import Path

import anndata as ad

import sclcm

DATA = Path(os.environ.get("SCLCM_DATA", "../shared/data"))
OUT = Path(os.environ.get("TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(exist_ok=True)
sclcm.settings.verbosity = "warning"

# %% [markdown]
# ## 1. Check that X holds raw counts
# pbmc3k (10x, hg19 symbols). `check_counts` raises a clear error on normalized data.

# %%
pbmc = ad.read_h5ad(DATA / "sctypegsea_10x_pbmc3k_raw_2700.h5ad")
sclcm.pp.check_counts(pbmc)
try:
    normalized = pbmc[:100].copy()
    normalized.X = normalized.X.multiply(1e4 / normalized.X.sum(axis=1)).tocsr()
    sclcm.pp.check_counts(normalized, allow_empty_cells=True)
except sclcm.InputError as err:
    print("refused:", err)

# %% [markdown]
# ## 2. Resolve genes to Ensembl IDs
# Old hg19 symbols resolve through previous symbols and aliases.

# %%
report = sclcm.genes.resolve(pbmc)
print(report)
print(report.methods())
frame = report.to_frame()
print(frame[frame.method == "alias"].sort_values("counts", ascending=False).head())

# %% [markdown]
# ## 3. Sum duplicated genes into an Ensembl-indexed AnnData

# %%
ens = report.collapse(pbmc)
print(ens)
assert abs(ens.X.sum() - report.var_counts[report.matched].sum()) < 1e-3 * ens.X.sum()

# %% [markdown]
# ## 4. Mouse cells onto human genes

# %%
mouse = ad.read_h5ad(DATA / "chai_baron_mouse1_822.h5ad")
mreport = sclcm.genes.resolve(mouse)
human = mreport.to_species("human")
print(mreport)
print(human, f"ortholog coverage {human.ortholog_coverage:.1%}")

# %% [markdown]
# ## 5. One vocabulary for both

# %%
vocab = sclcm.genes.GeneVocab.from_reference("human")
for name, adata, r in [("pbmc3k", pbmc, report), ("mouse pancreas", mouse, mreport)]:
    ids = vocab.lookup(adata, report=r)
    print(f"{name}: {(ids >= 0).sum()} of {adata.n_vars} columns have a token")
vocab.save(OUT / "vocab.json")
sclcm.pl.gene_coverage({"pbmc3k": report, "mouse pancreas": mreport},
                       save=str(OUT / "coverage.png"), show=False)
print("wrote", OUT / "vocab.json", OUT / "coverage.png")
