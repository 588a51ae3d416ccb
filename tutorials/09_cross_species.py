# %% [markdown]
# # Cross-species mapping: mouse pancreas cells labelled from a human reference
#
# Run as a script (`python tutorials/09_cross_species.py`) or open as a notebook with
# jupytext. Reads the Baron 2016 pancreas files from `$SCLCM_DATA` (default
# `../shared/data`): 2,142 human cells with their types as the reference, 1,886 mouse
# cells as the query. The shipped model `sclcm-small` reads human genes; mouse genes reach
# it through orthologs. It was pretrained (no label read) on pbmc3k, E15.5 mouse pancreas
# and these Baron *mouse* cells; the Baron human cells were held out.

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

human = ad.read_h5ad(DATA / "came_baron2016_pancreas_human_2142.h5ad")
mouse = ad.read_h5ad(DATA / "came_baron2016_pancreas_mouse_1886.h5ad")
# one name per type across the two files (human "t_cell" is mouse "T_cell")
for adata in (human, mouse):
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).str.lower()
print(pd.crosstab(pd.concat([human.obs.cell_type, mouse.obs.cell_type]),
                  ["human"] * human.n_obs + ["mouse"] * mouse.n_obs))

# %% [markdown]
# ## What reaches the model: one-to-one orthologs or all of them
#
# `orthologs="one2one"` keeps only genes with exactly one ortholog each way;
# `orthologs="all"` also maps one-to-many and many-to-many orthologs, copying a mouse
# gene's count onto each of its human orthologs and summing several mouse genes onto one.
# `sclcm.genes.SpeciesMap` says what each rule carries over, before any model runs.

# %%
model = sclcm.tl.get_model()
tok = model.tokenizer
report = sclcm.genes.resolve(mouse)
rows = {}
for rule in ("one2one", "all"):
    smap = sclcm.genes.SpeciesMap.build(report, "human", orthologs=rule)
    in_vocab = tok.token_ids_of_genes(tok.vocab.encode(smap.target_ids)) >= 0
    rows[f"{rule}: any human gene"] = smap.coverage(var_counts=report.var_counts)
    rows[f"{rule}: model's vocabulary"] = smap.coverage(in_vocab, var_counts=report.var_counts)
coverage = pd.DataFrame(rows).T[["n_genes_in_vocab", "gene_coverage", "count_coverage",
                                 "n_one_to_many", "n_many_to_one"]]
with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
    print(coverage)

# %% [markdown]
# The one-to-one rule drops mouse *Ins1* (its human ortholog INS also has *Ins2*): 6.8% of
# all mouse counts. `"all"` keeps it, but INS is not in the shipped model's vocabulary
# anyway, so both rules give the model about the same 77% of the counts. The biggest genes
# one-to-one loses:

# %%
smap = sclcm.genes.SpeciesMap.build(report, "human")
lost = smap.lost()
lost["share of counts"] = lost["counts"] / report.var_counts.sum()
print(lost.sort_values("counts", ascending=False).head(8)[["symbol", "n_orthologs",
                                                            "share of counts"]])

# %% [markdown]
# ## Map the mouse cells onto the human reference
#
# `sclcm.tl.map_species` embeds both with the one model, gives each mouse cell the
# distance-weighted vote of its 15 nearest human cells, and leaves a cell `"Unassigned"`
# where its score (vote share x typicality) is below 0.1: a cell of a type the human
# reference lacks (mouse B cells, `immune_other`) is far from every human cell. It returns
# one AnnData of both, with the joint embedding in `obsm["X_sclcm"]`; the inputs are not
# changed.

# %%
joint = sclcm.tl.map_species(mouse, human, label_key="cell_type")
query = joint[joint.obs["dataset"] == "query"].obs
shared = query["cell_type"].isin(joint.uns["sclcm"]["classes"])
ok = query["sclcm_label"].astype(str) == query["cell_type"].astype(str)
print(f"shared types: accuracy {ok[shared].mean():.3f} over {shared.sum()} mouse cells")
print("types the reference lacks:", query.loc[~shared, "sclcm_label"].astype(str)
      .value_counts().to_dict())
print("counts reaching the model:", joint.uns["sclcm"]["count_coverage"])

# %% [markdown]
# ## The joint embedding in scanpy
#
# Scanpy reads the joint embedding as any other: neighbours, UMAP, Leiden. The figure shows
# the two species side by side, the labels (the reference's own, the mouse cells'
# transferred), and the confusion matrix of the types both species share.

# %%
sc.pp.neighbors(joint, use_rep="X_sclcm", random_state=0)
sc.tl.umap(joint, random_state=0)
fig = sclcm.pl.map_species(joint, label_key="cell_type", save=OUT / "cross_species.png")

# %% [markdown]
# ## Confidence
#
# The score separates the shared types' cells from the others: the histogram shows it per
# group, with the threshold.

# %%
fig, ax = plt.subplots(figsize=(6, 3))
bins = np.linspace(0, 1, 41)
ax.hist(query.loc[shared, "sclcm_score"], bins=bins, alpha=0.7, density=True,
        label=f"types the reference has ({shared.sum()})")
ax.hist(query.loc[~shared, "sclcm_score"], bins=bins, alpha=0.7, density=True,
        label=f"types it lacks ({(~shared).sum()})")
ax.axvline(joint.uns["sclcm"]["params"]["threshold"], color="black", lw=1)
ax.set_xlabel("mapping score (vote x typicality)")
ax.set_ylabel("density")
ax.legend(frameon=False)
fig.tight_layout()
fig.savefig(OUT / "cross_species_score.png", dpi=110)

# %% [markdown]
# The joint object is a plain AnnData: write it, read it back, and the labels, scores,
# embedding and record come with it.

# %%
joint.write_h5ad(OUT / "baron_joint.h5ad")
back = ad.read_h5ad(OUT / "baron_joint.h5ad")
assert back.obs["sclcm_label"].equals(joint.obs["sclcm_label"])
print("wrote", OUT / "cross_species.png", OUT / "cross_species_score.png")
