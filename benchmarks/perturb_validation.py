"""Does in-silico perturbation predict real perturbations? Two checks on real data.

1. CRISPR knockouts (Papalexi et al. 2021, ECCITE-seq, THP-1 cells; 299 measured genes).
   For each knocked-out gene among the measured genes, delete it in silico in non-targeting
   cells and compare the predicted embedding shift (mean of perturbed minus original
   embedding, ``uns[key]["embedding_shift"]``) with the observed one (mean embedding of the
   knockout cells minus that of the non-targeting cells): the cosine of the two vectors,
   and the target's rank among random measured genes deleted the same way (rank 1: the
   target's own deletion points closest to its observed shift).
2. IFN-beta stimulation (Kang et al. 2018, PBMC). Activate interferon-stimulated genes in
   control cells and measure the shift toward the stimulated cells' mean embedding
   (``goal={"key": "condition", "start": "ctrl", "goal": "stim"}``), against random genes
   activated the same way.

Prints what it finds, whatever it is. A random model is expected to show nothing.

    python benchmarks/perturb_validation.py [--model DIR] [--cells 300] [--n-random 30]
    python benchmarks/perturb_validation.py --random-init geneformer   # pipeline check only
"""

from __future__ import annotations

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) in sys.path:  # benchmarks/tokenize.py
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
from scipy import stats

import sclcm

PAPALEXI = "sceptredata_papalexi2021_eccite_lowmoi_20729.h5ad"
KANG = "muscat_kang2018_ifnb_pbmc_1556.h5ad"
ISGS = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1", "OAS1", "ISG20", "IFITM3", "LY6E", "IFI44L"]


def data_dir() -> Path:
    return Path(os.environ.get("SCLCM_DATA", Path(__file__).resolve().parents[2] / "shared"
                               / "data"))


def load_model(args, adata: ad.AnnData):
    """The model to validate: ``--model``, the shipped default, or a random one."""
    if args.random_init:
        import torch

        from sclcm.genes import GeneVocab, resolve
        from sclcm.models import CellModel, ModelConfig
        from sclcm.tokenizers import (
            GeneformerTokenizer,
            ScBERTTokenizer,
            ScFoundationTokenizer,
            ScGPTTokenizer,
        )

        report = resolve(adata, count_coverage=False)
        vocab = GeneVocab.from_report(report)
        tok = {"geneformer": lambda: GeneformerTokenizer(vocab).fit(adata, report=report),
               "scgpt": lambda: ScGPTTokenizer(vocab), "scbert": lambda: ScBERTTokenizer(vocab),
               "scfoundation": lambda: ScFoundationTokenizer(vocab)}[args.random_init]()
        torch.manual_seed(0)
        return CellModel(ModelConfig.preset(args.random_init, args.size, vocab=vocab),
                         tokenizer=tok)
    return sclcm.tl.get_model(args.model)


def random_genes(adata: ad.AnnData, rows: np.ndarray, exclude: list[str], n: int,
                 rng: np.random.Generator) -> list[str]:
    """``n`` random genes expressed in at least 5% of ``rows``, none of ``exclude``."""
    frac = np.asarray((adata.X[rows] > 0).mean(0)).ravel()
    pool = [g for g, f in zip(adata.var_names, frac, strict=True) if f >= 0.05
            and g not in exclude]
    return sorted(rng.choice(pool, min(n, len(pool)), replace=False).tolist())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def knockouts(args, rng: np.random.Generator) -> None:
    adata = ad.read_h5ad(data_dir() / PAPALEXI)
    target = adata.obs["perturbation_target"].astype(str).to_numpy()
    measured = sorted(t for t in set(target) if t in adata.var_names)
    model = load_model(args, adata)
    # the cells embedded: up to --cells non-targeting and --cells of each knockout
    keep = np.concatenate([rng.permutation(np.flatnonzero(target == t))[:args.cells]
                           for t in ["non-targeting", *measured]])
    sub = adata[np.sort(keep)].copy()
    t_sub = sub.obs["perturbation_target"].astype(str).to_numpy()
    nt = np.flatnonzero(t_sub == "non-targeting")
    print(f"\n== Papalexi 2021 ECCITE-seq: {len(measured)} knocked-out genes are measured: "
          f"{', '.join(measured)}")
    start = time.perf_counter()
    sclcm.tl.embed(sub, model=model, key_added="X_model")
    emb = sub.obsm["X_model"].astype(np.float64)
    base = np.nanmean(emb[nt], axis=0)
    ctrl = sub[nt].copy()
    others = random_genes(ctrl, np.arange(ctrl.n_obs), measured, args.n_random, rng)
    sclcm.tl.perturb(ctrl, measured + others, mode="delete", model=model, n_null=5)
    rec = ctrl.uns["sclcm_perturb"]
    pred = dict(zip(rec["names"], rec["embedding_shift"].astype(np.float64), strict=True))
    table = rec["table"].set_index("gene")
    others = [g for g in others if g in pred]  # genes without a token were skipped
    print(f"   {len(nt)} non-targeting cells; {len(others)} random measured genes deleted "
          f"the same way ({time.perf_counter() - start:.0f} s)")
    print(f"   {'target':<9} {'KO cells':>8} {'expr KO/NT':>11} {'NT del.':>7} "
          f"{'|obs|':>7} {'|pred|':>8} {'cos':>7} {'rank':>7} {'rand cos mean':>13}")
    cos_t, ranks = [], []
    for t in measured:
        ko = np.flatnonzero(t_sub == t)
        observed = np.nanmean(emb[ko], axis=0) - base
        col = sub.var_names.get_loc(t)
        expr = (np.asarray((sub.X[ko, col] > 0).mean()), np.asarray((sub.X[nt, col] > 0).mean()))
        if not np.isfinite(pred[t]).all():
            print(f"   {t:<9} {len(ko):>8} {expr[0]:>5.2f}/{expr[1]:<5.2f} not expressed in "
                  "any non-targeting cell's tokens")
            continue
        c = cosine(pred[t], observed)
        rand = np.array([cosine(pred[g], observed) for g in others if np.isfinite(pred[g]).all()])
        rank = 1 + int((rand > c).sum())
        cos_t.append(c)
        ranks.append(rank / (len(rand) + 1))
        print(f"   {t:<9} {len(ko):>8} {expr[0]:>5.2f}/{expr[1]:<5.2f} "
              f"{int(table.loc[t, 'n_perturbed']):>7} {np.linalg.norm(observed):>7.4f} "
              f"{np.linalg.norm(pred[t]):>8.5f} {c:>7.3f} {rank:>3}/{len(rand) + 1:<3} "
              f"{rand.mean():>13.3f}")
    if cos_t:
        print(f"   mean cosine of the targets {np.mean(cos_t):.3f}; mean rank quantile "
              f"{np.mean(ranks):.2f} (0.5 expected by chance; lower is better); "
              f"{sum(r <= 0.1 for r in ranks)} of {len(ranks)} targets in the top 10%")


def interferon(args, rng: np.random.Generator) -> None:
    adata = ad.read_h5ad(data_dir() / KANG)
    model = load_model(args, adata)
    isgs = [g for g in ISGS if g in adata.var_names]
    ctrl = np.flatnonzero(adata.obs["condition"].astype(str).to_numpy() == "ctrl")
    others = random_genes(adata, ctrl, isgs, args.n_random, rng)
    goal = {"key": "condition", "start": "ctrl", "goal": "stim"}
    print(f"\n== Kang 2018 IFN-beta: shift of control cells toward the stimulated state; "
          f"{len(isgs)} interferon-stimulated genes vs {len(others)} random genes")
    for mode in ("activate", "overexpress"):
        start = time.perf_counter()
        sclcm.tl.perturb(adata, isgs + others, mode=mode, model=model, goal=goal,
                         n_cells=args.cells, n_null=5)
        table = adata.uns["sclcm_perturb"]["table"].set_index("gene")
        isgs = [g for g in isgs if g in table.index]
        others = [g for g in others if g in table.index]
        mine, rand = table.loc[isgs, "mean_goal_shift"], table.loc[others, "mean_goal_shift"]
        print(f"   {mode} ({time.perf_counter() - start:.0f} s): mean goal shift of the ISGs "
              f"{np.nanmean(mine):+.2e} (positive in {int((mine > 0).sum())}/{mine.notna().sum()})"
              f", of random genes {np.nanmean(rand):+.2e} (positive in "
              f"{int((rand > 0).sum())}/{rand.notna().sum()})")
        if mine.notna().sum() >= 2 and rand.notna().sum() >= 2:
            test = stats.mannwhitneyu(mine.dropna(), rand.dropna(), alternative="greater")
            print(f"      ISGs > random genes (Mann-Whitney U on per-gene means, one-sided): "
                  f"p = {test.pvalue:.2g}")
        for g in isgs:
            row = table.loc[g]
            print(f"      {g:<8} goal shift {row['mean_goal_shift']:+.2e}  cells "
                  f"{int(row['n_perturbed']):>4}  FDR vs matched null {row['fdr']:.2g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model directory (default: the shipped default model)")
    p.add_argument("--random-init", choices=["geneformer", "scgpt", "scbert", "scfoundation"],
                   help="a random model of this family, to check the pipeline only")
    p.add_argument("--size", default="tiny", help="size of the --random-init model")
    p.add_argument("--cells", type=int, default=300,
                   help="cells per group (non-targeting, each knockout, control)")
    p.add_argument("--n-random", type=int, default=30, help="random genes to compare with")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sclcm.settings.verbosity, sclcm.settings.progress = "warning", False
    if not args.model and not args.random_init and not sclcm.tl.shipped_models():
        print(f"No model is shipped yet ({sclcm.tl.DEFAULT_MODEL!r} is not in the package): "
              "pass --model DIR (a directory written by save_pretrained), or --random-init "
              "FAMILY to check the pipeline.")
        return
    what = args.model or (f"random {args.random_init} ({args.size}): a pipeline check, "
                          "no biology expected" if args.random_init else
                          sclcm.tl.DEFAULT_MODEL)
    print(f"model: {what}")
    knockouts(args, np.random.default_rng(args.seed))
    interferon(args, np.random.default_rng(args.seed))


if __name__ == "__main__":
    main()
