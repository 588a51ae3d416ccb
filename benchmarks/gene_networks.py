"""Do gene networks read out of the model recover known relationships? Two checks on real data.

Each network is built on the same genes and cells three ways: attention
(:func:`sclcm.tl.attention`, symmetric and both directed forms), the cosine of contextual gene
embeddings (both also of the same model untrained: random weights, same tokenizer), and
co-expression (Pearson's r of log1p counts per 10,000: the baseline), with degree-preserving
random networks (each method's 20-nearest-gene graph, rewired by igraph's edge swaps, the
weights shuffled over the new edges) as the null.

(a) CRISPR knockouts (Papalexi et al. 2021, ECCITE-seq, THP-1; 299 measured genes). For each
    knocked-out regulator among the measured genes, its true targets are the genes that
    change in its knockout cells against the non-targeting cells: two-sided Mann-Whitney U on
    log1p counts per 10,000, Benjamini-Hochberg FDR < 0.05 (the regulator itself left out).
    Networks are built on non-targeting cells; each ranks the other genes by their edge to the
    regulator: AUROC, AUPRC (against its chance level, the share of targets) and precision
    at 10.
(b) IFN-beta stimulation (Kang et al. 2018, PBMC). The induced genes are those up in
    stimulated against control cells (Mann-Whitney U, BH FDR < 0.01, log2 fold change of mean
    counts per 10,000 > 1). Networks are built per condition; Leiden programmes (10
    neighbours, resolution 1); module recovery: the programme holding most induced genes,
    its precision, recall and hypergeometric p, and the mean edge weight among the induced
    genes against random gene sets of the same size and expression.

Prints what it finds, whatever it is.

    python benchmarks/gene_networks.py [--model DIR] [--cells 600] [--n-random 20]
"""

from __future__ import annotations

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) in sys.path:  # benchmarks/tokenize.py
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))

import argparse
import random
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse, stats
from sklearn.metrics import average_precision_score, roc_auc_score

import sclcm
from sclcm.tl._attention import top_edges

PAPALEXI = "sceptredata_papalexi2021_eccite_lowmoi_20729.h5ad"
KANG = "muscat_kang2018_ifnb_pbmc_1556.h5ad"
#: Neighbours per gene of the graphs that are rewired for the random networks.
RANDOM_K = 20


def data_dir() -> Path:
    return Path(os.environ.get("SCLCM_DATA", Path(__file__).resolve().parents[2] / "shared"
                               / "data"))


def log_cp10k(X) -> np.ndarray:
    X = sparse.csr_matrix(X, dtype=np.float64)
    total = np.asarray(X.sum(1)).ravel()
    return np.log1p(X.multiply(1e4 / np.maximum(total, 1)[:, None]).toarray())


def differential(y_a: np.ndarray, y_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BH-adjusted two-sided Mann-Whitney p per gene (1 for genes zero in both), and the
    log2 ratio of mean counts per 10,000 (b over a)."""
    p = np.ones(y_a.shape[1])
    varies = (y_a.max(0) > 0) | (y_b.max(0) > 0)
    p[varies] = stats.mannwhitneyu(y_a[:, varies], y_b[:, varies], axis=0).pvalue
    fc = np.log2((np.expm1(y_b).mean(0) + 1) / (np.expm1(y_a).mean(0) + 1))
    return stats.false_discovery_control(p), fc


def untrained(model):
    """A model of the same shape and tokenizer with random weights: what attention shows
    without training (the token layout, expression ranks)."""
    import torch

    from sclcm.models import CellModel

    torch.manual_seed(0)
    return CellModel(model.config, tokenizer=model.tokenizer).eval()


def networks(adata: ad.AnnData, model, genes: list[str], groupby: str) -> dict:
    """Full weight matrices per method and group (NaN diagonal), on the same genes and cells."""
    out: dict[str, dict[str, np.ndarray]] = {}
    times = {}
    random_model = untrained(model)
    for label, net in (("attention", model), ("attention, untrained", random_model)):
        t0 = time.perf_counter()
        sclcm.tl.attention(adata, net, genes=genes, groupby=groupby, top_k=None, min_cells=1)
        times[label] = time.perf_counter() - t0
        rec = adata.uns["sclcm_attention"]
        for name, form in ((f"{label} (symmetric)", "symmetric"),
                           (f"{label} (directed)", "directed")):
            out[name] = {g: rec[form][g].toarray().astype(np.float64) for g in rec["groups"]}
    for label, method, net in (("embedding", "embedding", model),
                               ("embedding, untrained", "embedding", random_model),
                               ("coexpression", "coexpression", None)):
        t0 = time.perf_counter()
        sclcm.tl.gene_network(adata, method=method, model=net, genes=genes,
                              groupby=groupby, top_k=None, n_neighbors=10)
        times[label] = time.perf_counter() - t0
        r = adata.uns[f"sclcm_network_{method}"]
        out[label] = {g: r["weights"][g].toarray().astype(np.float64) for g in r["groups"]}
    for ws in out.values():
        for w in ws.values():
            np.fill_diagonal(w, np.nan)
    print("   seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return out


def rewired(w: np.ndarray, rng: np.random.Generator, k: int = RANDOM_K) -> np.ndarray:
    """The ``k``-nearest-gene graph of ``w`` with its edges swapped at random, every gene
    keeping its degree; the weights shuffled over the new edges (0 = no edge)."""
    import igraph as ig

    g = sparse.triu(top_edges(np.where(np.isfinite(w), w, np.nan), k, symmetric=True), 1)
    g = g.tocoo()
    graph = ig.Graph(n=w.shape[0], edges=list(zip(g.row, g.col, strict=True)))
    ig.set_random_number_generator(random.Random(int(rng.integers(1 << 31))))
    graph.rewire(n=10 * graph.ecount(), allowed_edge_types="simple")
    # igraph's rewiring drops edge attributes: the weights go to the new edges at random
    a, b = np.asarray(graph.get_edgelist()).T
    out = np.zeros_like(w)
    out[a, b] = out[b, a] = rng.permutation(g.data)
    np.fill_diagonal(out, np.nan)
    return out


def scores(weight: np.ndarray, truth: np.ndarray, k: int = 10) -> tuple[float, float, float]:
    """AUROC, AUPRC and precision at ``k`` of ``weight`` (NaN ranked last) on ``truth``."""
    fin = np.isfinite(weight)
    w = np.where(fin, weight, weight[fin].min() - 1 if fin.any() else 0.0)
    top = np.argsort(-w, kind="stable")[:k]
    return (float(roc_auc_score(truth, w)), float(average_precision_score(truth, w)),
            float(truth[top].mean()))


def knockouts(args, model, rng: np.random.Generator) -> None:
    adata = ad.read_h5ad(data_dir() / PAPALEXI)
    target = adata.obs["perturbation_target"].astype(str).to_numpy()
    report = sclcm.genes.resolve(adata, count_coverage=False)
    in_vocab = model.tokenizer.column_map(adata, report=report).slot >= 0
    genes = list(adata.var_names[in_vocab])
    regulators = sorted(t for t in set(target) if t in genes)
    y = log_cp10k(adata.X)
    nt = np.flatnonzero(target == "non-targeting")
    print(f"\n== (a) Papalexi 2021 ECCITE-seq knockouts: {len(regulators)} regulators among "
          f"the {len(genes)} measured genes in the model's vocabulary")
    print(f"   true targets: genes changed in the knockout cells vs all {len(nt)} non-"
          "targeting cells, two-sided Mann-Whitney U on log1p CP10k, BH FDR < 0.05")
    truth = {}
    for r in regulators:
        fdr, fc = differential(y[nt], y[target == r])
        hit = fdr < 0.05
        hit[adata.var_names.get_loc(r)] = False  # its own knockout
        truth[r] = hit[[adata.var_names.get_loc(g) for g in genes]]
        down = (fc[hit] < 0).sum()
        print(f"   {r:<9} {int((target == r).sum()):>5} cells: {int(hit.sum()):>3} targets "
              f"({down} down, {hit.sum() - down} up)")
    cells = np.sort(rng.choice(nt, min(args.cells, len(nt)), replace=False))
    sub = adata[cells].copy()
    sub.obs["state"] = "non-targeting"
    print(f"   networks on {len(cells)} non-targeting cells, {len(genes)} genes")
    nets = networks(sub, model, genes, "state")
    w = {name: v["non-targeting"] for name, v in nets.items()}
    rows = {"attention (symmetric)": lambda i: w["attention (symmetric)"][i],
            "attention (regulator -> gene)": lambda i: w["attention (directed)"][i],
            "attention (gene -> regulator)": lambda i: w["attention (directed)"][:, i],
            "attention, untrained (symmetric)": lambda i: w["attention, untrained (symmetric)"][i],
            "attention, untrained (regulator -> gene)":
                lambda i: w["attention, untrained (directed)"][i],
            "embedding cosine": lambda i: w["embedding"][i],
            "embedding cosine, untrained": lambda i: w["embedding, untrained"][i],
            "co-expression |r|": lambda i: np.abs(w["coexpression"][i])}
    randoms = {f"random of {m} ({RANDOM_K}-NN, rewired)":
               [rewired(base, rng) for _ in range(args.n_random)]
               for m, base in (("attention", w["attention (symmetric)"]),
                               ("embedding", w["embedding"]),
                               ("co-expression", np.abs(w["coexpression"])))}
    table = []
    for r in regulators:
        i, keep = genes.index(r), np.arange(len(genes)) != genes.index(r)
        t = truth[r][keep]
        if t.sum() == 0:
            print(f"   {r}: no target, left out")
            continue
        for name, f in rows.items():
            table.append((r, name, *scores(f(i)[keep], t), t.mean()))
        for name, nets_r in randoms.items():
            s = np.mean([scores(n[i][keep], t) for n in nets_r], axis=0)
            table.append((r, name, *s, t.mean()))
    df = pd.DataFrame(table, columns=["regulator", "network", "AUROC", "AUPRC", "P@10",
                                      "chance"])
    per = df.pivot(index="regulator", columns="network", values="AUROC")
    per.insert(0, "targets", [int(truth[r].sum()) for r in per.index])
    print("\n   AUROC per regulator (0.5 = chance):")
    short = {c: c.replace("attention", "att").replace("random of ", "rnd ")
             .replace(", untrained", " untr.").replace("regulator", "reg")
             .replace(f" ({RANDOM_K}-NN, rewired)", "") for c in per.columns}
    print(per.rename(columns=short).round(2).to_string(max_colwidth=18))
    n_targets = df["regulator"].map(lambda r: int(truth[r].sum()))
    for label, rows_ in (("all", df), (">= 10 targets", df[n_targets >= 10])):
        mean = rows_.groupby("network", sort=False)[["AUROC", "AUPRC", "P@10",
                                                      "chance"]].mean()
        print(f"\n   mean over {rows_['regulator'].nunique()} regulators ({label}; AUPRC "
              f"chance = mean share of targets; random: mean of {args.n_random} rewirings):")
        print(mean.round(3).to_string())


def interferon(args, model, rng: np.random.Generator) -> None:
    adata = ad.read_h5ad(data_dir() / KANG)
    cond = adata.obs["condition"].astype(str).to_numpy()
    report = sclcm.genes.resolve(adata, count_coverage=False)
    in_vocab = model.tokenizer.column_map(adata, report=report).slot >= 0
    frac = np.asarray((adata.X > 0).mean(0)).ravel()
    genes = list(adata.var_names[in_vocab & (frac >= 0.05)])
    y = log_cp10k(adata.X)
    fdr, fc = differential(y[cond == "ctrl"], y[cond == "stim"])
    cols = adata.var_names.get_indexer(genes)
    induced = (fdr[cols] < 0.01) & (fc[cols] > 1)
    print(f"\n== (b) Kang 2018 IFN-beta: {int(induced.sum())} of {len(genes)} genes (in the "
          "vocabulary, in >= 5% of cells) induced: stim vs ctrl Mann-Whitney U, BH FDR < 0.01, "
          "log2 FC > 1")
    print("   " + ", ".join(np.asarray(genes)[induced][np.argsort(-fc[cols][induced])][:25])
          + (" ..." if induced.sum() > 25 else ""))
    nets = networks(adata, model, genes, "condition")
    nets.pop("attention (directed)")
    nets.pop("attention, untrained (directed)")
    expr = frac[cols]
    bins = np.digitize(expr, np.quantile(expr, np.linspace(0, 1, 11)[1:-1]))
    rows = []
    for method, by_group in nets.items():
        for group in ("ctrl", "stim"):
            w = by_group[group]
            rows.append((method, group, *module_recovery(w, induced, rng),
                         *set_enrichment(w, induced, bins, rng, args.n_random * 5)))
            rec = [module_recovery(rewired(w, rng), induced, rng)
                   for _ in range(max(args.n_random // 4, 3))]
            rows.append((f"random of {method}", group, *np.mean(rec, axis=0),
                         np.nan, np.nan))
    df = pd.DataFrame(rows, columns=["network", "cells", "programme size", "induced in it",
                                     "precision", "recall", "-log10 p", "within-set weight z",
                                     "empirical p"])
    print(f"\n   the programme holding most of the {int(induced.sum())} induced genes "
          "(Leiden, 10 neighbours, resolution 1; -log10 p: hypergeometric), and the mean edge "
          "weight among the induced genes as a z-score against expression-matched random sets:")
    print(df.round(3).to_string(index=False))


def module_recovery(w: np.ndarray, induced: np.ndarray, rng: np.random.Generator
                    ) -> tuple[float, float, float, float, float]:
    from sclcm.tl._gene_network import leiden_programmes

    graph = top_edges(np.where(w > 0, w, np.nan), 10, symmetric=True)
    labels = np.asarray(leiden_programmes(graph, resolution=1.0,
                                          seed=int(rng.integers(1 << 31))))
    best = max(set(labels), key=lambda c: (induced[labels == c].sum(), -(labels == c).sum()))
    in_p = labels == best
    hit = int(induced[in_p].sum())
    p = stats.hypergeom.sf(hit - 1, len(w), int(induced.sum()), int(in_p.sum()))
    return (int(in_p.sum()), hit, hit / in_p.sum(), hit / induced.sum(),
            -np.log10(max(p, 1e-300)))


def set_enrichment(w: np.ndarray, induced: np.ndarray, bins: np.ndarray,
                   rng: np.random.Generator, n: int) -> tuple[float, float]:
    """z-score and empirical p of the mean weight among ``induced`` against random sets with
    the same number of genes from each expression decile."""
    def mean_within(idx):
        sub = w[np.ix_(idx, idx)]
        return np.nanmean(sub[~np.eye(len(idx), dtype=bool)])

    idx = np.flatnonzero(induced)
    obs = mean_within(idx)
    null = []
    for _ in range(n):
        pick = [rng.choice(np.flatnonzero(bins == b), (bins[idx] == b).sum(), replace=False)
                for b in np.unique(bins[idx])]
        null.append(mean_within(np.concatenate(pick)))
    null = np.asarray(null)
    return float((obs - null.mean()) / null.std()), float((1 + (null >= obs).sum()) / (n + 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model directory or name (default: the shipped model)")
    p.add_argument("--cells", type=int, default=600,
                   help="non-targeting cells the Papalexi networks are built on")
    p.add_argument("--n-random", type=int, default=20, help="rewired random networks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["knockouts", "interferon"])
    args = p.parse_args()
    sclcm.settings.verbosity, sclcm.settings.progress = "warning", False
    model = sclcm.tl.get_model(args.model)
    print(f"model: {args.model or sclcm.tl.DEFAULT_MODEL} ({model.config.tokenizer}, "
          f"{model.config.n_layers} layers x {model.config.d_model}, {model.config.n_heads} "
          "heads); attention from the last layer, all heads")
    if args.only != "interferon":
        knockouts(args, model, np.random.default_rng(args.seed))
    if args.only != "knockouts":
        interferon(args, model, np.random.default_rng(args.seed))


if __name__ == "__main__":
    main()
