"""Cell-type annotation across real boundaries: sclcm beside logistic regression and CellTypist.

    python benchmarks/annotation.py                       # the table (all splits, methods)
    python benchmarks/annotation.py --splits donor --methods finetuned,logreg
    python benchmarks/annotation.py --variants donor      # fine-tuning choices side by side

Splits (real labelled data from $SCLCM_DATA, subsampled so that one run fits one CPU
thread; the sizes are printed):

- ``donor``: Kang 2018 control PBMC, reference = four donors, query = the fifth (1015).
- ``donor-NK``: the same, NK cells left out of the reference: how many query NK cells
  each method rejects (``"Unassigned"``) is the held-out-type rejection.
- ``condition``: Kang 2018 IFN-beta PBMC, reference = control cells, query = the
  IFN-beta-stimulated cells (5 types).
- ``species``: Baron 2016 pancreas, reference = human (inDrop, 4 donors), query = mouse
  (both mouse donors), genes mapped through one-to-one orthologs; accuracy and F1 on the
  types both share, rejection on the mouse types the human reference lacks.

Methods: ``finetuned`` (sclcm.train.finetune from the shipped model, then
``tl.annotate``), ``random-init`` (the same fine-tuning from a random initialisation of
the same shape: what pretraining adds), ``sclcm-knn`` (``tl.annotate(method="knn")`` on
the shipped model's embedding), ``logreg`` (L1 logistic regression on log-normalized
genes, scikit-learn liblinear one-vs-rest, C by 3-fold inner cross-validation on macro-F1),
``pca-knn`` (HVG + PCA, then the same kNN vote and typicality as sclcm-knn), and
``celltypist`` (CellTypist's own logistic regression, trained here, when it is installed).

Accuracy, macro-F1 and per-class F1 are over the query cells of the reference's types, every
cell assigned (threshold 0); "unassigned" is the share of those cells each method rejects at
its default threshold (sclcm 0.02 on the top probability or vote share x typicality;
logistic regression and CellTypist 0.5 on the top probability; pca-knn as sclcm-knn);
the notes give the calibrated probability's own rejection at 0.5; "rejected" the
share of the query cells of a type the reference lacks that it rejects.
"""

from __future__ import annotations

import sys

# benchmarks/tokenize.py would shadow the standard library's tokenize module
sys.path = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("SCLCM_PROGRESS", "0")
os.environ.setdefault("SCLCM_VERBOSITY", "warning")

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import sclcm  # noqa: E402

DATA = Path(os.environ.get("SCLCM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
UNASSIGNED = "Unassigned"
METHODS = ("finetuned", "random-init", "sclcm-knn", "logreg", "pca-knn", "celltypist")


@dataclass
class Split:
    name: str
    ref: ad.AnnData
    query: ad.AnnData
    label_key: str
    groupby: str | None
    absent: list[str] = field(default_factory=list)  # query types the reference lacks


def _sub(adata: ad.AnnData, n: int, seed: int = 0) -> ad.AnnData:
    if adata.n_obs <= n:
        return adata.copy()
    rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, n, replace=False))
    return adata[rows].copy()


def make_splits(names: list[str], n_ref: int, n_query: int) -> list[Split]:
    out = []
    if {"donor", "donor-NK"} & set(names):
        kang = ad.read_h5ad(DATA / "muscat2019_kang2018_ctrl_pbmc_8684.h5ad")
        donor = kang.obs["donor"].astype(str)
        ref, query = _sub(kang[donor != "1015"], n_ref), _sub(kang[donor == "1015"], n_query)
        if "donor" in names:
            out.append(Split("donor", ref, query, "cell_type", "donor"))
        if "donor-NK" in names:
            out.append(Split("donor-NK", ref[ref.obs["cell_type"] != "NK cells"].copy(), query,
                             "cell_type", "donor", ["NK cells"]))
    if "condition" in names:
        ifnb = ad.read_h5ad(DATA / "muscat_kang2018_ifnb_pbmc_1556.h5ad")
        ctrl = ifnb.obs["condition"] == "ctrl"
        out.append(Split("condition", _sub(ifnb[ctrl], n_ref), _sub(ifnb[~ctrl], n_query),
                         "cell_type", "sample"))
    if "species" in names:
        human = ad.read_h5ad(DATA / "came_baron2016_pancreas_human_2142.h5ad")
        mouse = ad.read_h5ad(DATA / "came_baron2016_pancreas_mouse_1886.h5ad")
        counts = human.obs["cell_type"].value_counts()
        human = human[human.obs["cell_type"].isin(counts.index[counts >= 20])]
        ref = _sub(human, n_ref)
        known = set(ref.obs["cell_type"].astype(str))
        query = _sub(mouse, n_query)
        absent = sorted(set(query.obs["cell_type"].astype(str)) - known)
        # stratified validation: whole human donors could take a rare type's every cell
        out.append(Split("species", ref, query, "cell_type", None, absent))
    return out


# --- the gene-level baselines: one shared gene space, log-normalized ---


def _ensembl(adata: ad.AnnData) -> np.ndarray:
    """Human Ensembl ID per column (mouse genes through one-to-one orthologs); None where
    unresolved."""
    report = sclcm.genes.resolve(adata)
    if report.species != "human":
        report = report.to_species("human")
    return np.asarray(report.ensembl_id, dtype=object)


def shared_genes(ref: ad.AnnData, query: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
    """Both restricted to the genes (human Ensembl IDs) they share, in one order, with
    X = log1p(counts per 10,000) over all of each cell's counts."""
    import scanpy as sc

    out = []
    ids = [_ensembl(a) for a in (ref, query)]
    common = sorted(set(ids[0][pd.notna(ids[0])]) & set(ids[1][pd.notna(ids[1])]))
    for a, g in zip((ref, query), ids, strict=True):
        a = a.copy()
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        first = pd.Series(np.arange(len(g)), index=g).groupby(level=0).first()
        b = a[:, first.loc[common].to_numpy()].copy()
        b.var_names = common
        out.append(b)
    return out[0], out[1]


def logreg(ref: ad.AnnData, query: ad.AnnData, labels: np.ndarray, seed: int = 0):
    """L1 logistic regression (one-vs-rest liblinear), C from 3-fold CV on macro-F1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.multiclass import OneVsRestClassifier

    grid = GridSearchCV(
        OneVsRestClassifier(LogisticRegression(penalty="l1", solver="liblinear",
                                               max_iter=200, random_state=seed)),
        {"estimator__C": [0.03, 0.1, 0.3, 1.0]}, scoring="f1_macro",
        cv=StratifiedKFold(3, shuffle=True, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grid.fit(ref.X, labels)
    p = grid.predict_proba(query.X)
    p = p / p.sum(1, keepdims=True)  # one-vs-rest scores -> a distribution
    return list(grid.classes_), p, {"C": grid.best_params_["estimator__C"]}


def pca_knn(ref: ad.AnnData, query: ad.AnnData, labels: np.ndarray):
    """HVG + PCA fitted on the reference, the query projected; sclcm's kNN vote on it."""
    import scanpy as sc

    from sclcm.tl._transfer import transfer_labels

    r = ref.copy()
    sc.pp.highly_variable_genes(r, n_top_genes=min(2000, r.n_vars))
    hv = r.var["highly_variable"].to_numpy()
    r, q = ref[:, hv].to_memory() if ref.isbacked else ref[:, hv].copy(), query[:, hv].copy()
    from sklearn.decomposition import PCA

    X = np.asarray(r.X.todense() if hasattr(r.X, "todense") else r.X)
    mean, std = X.mean(0), X.std(0) + 1e-8
    pca = PCA(50, random_state=0).fit((X - mean) / std)
    Q = np.asarray(q.X.todense() if hasattr(q.X, "todense") else q.X)
    res = transfer_labels(pca.transform((X - mean) / std), pca.transform((Q - mean) / std),
                          labels)
    return res.classes, res.probabilities, res.vote * res.typicality


def celltypist_(ref: ad.AnnData, query: ad.AnnData, labels: np.ndarray):
    import celltypist

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # CellTypist 1.7.1's default trainer passes LogisticRegression(multi_class=...),
        # which scikit-learn 1.8 removed; its SGD trainer fits the same one-vs-rest
        # logistic loss
        model = celltypist.train(ref, labels=labels, n_jobs=1, use_SGD=True,
                                 check_expression=False)
        res = celltypist.annotate(query, model=model, mode="best match")
    p = res.probability_matrix
    return list(p.columns), p.to_numpy(), None


# --- sclcm ---


def random_like(name: str = sclcm.tl.DEFAULT_MODEL, seed: int = 0):
    """A random initialisation of the shipped model's shape, vocabulary and tokenizer."""
    import torch

    from sclcm.models import CellModel

    shipped = sclcm.tl.get_model(name)
    torch.manual_seed(seed)
    return CellModel(shipped.config, vocab=shipped.vocab, tokenizer=shipped.tokenizer)


#: The model that sclcm's rows start from (--model; None: the shipped default).
MODEL: str | None = None


def sclcm_finetuned(split: Split, start, opts: dict):
    opts = dict(opts)
    start = MODEL if start is None else start
    if "pooling" in opts:
        start = with_pooling(opts.pop("pooling"))
    model = sclcm.train.finetune(split.ref, split.label_key, start, groupby=split.groupby,
                                 progress_bar=False, accelerator="cpu", **opts)
    q = split.query.copy()
    sclcm.tl.annotate(q, model, threshold=0)
    classes = q.uns["sclcm_label"]["classes"]
    p = q.obsm["sclcm_label_probabilities"]
    conf = q.obs["sclcm_label_score"].to_numpy()  # top probability x typicality
    info = {"best_step": model.finetune_metrics["best_step"],
            "val_f1": round(model.finetune_metrics["best_val_macro_f1"], 3)}
    if "temperature" in model.finetune_metrics:
        info["T"] = round(model.finetune_metrics["temperature"], 2)
    # without the typicality: how the calibrated probability alone rejects at 0.5
    top = np.nan_to_num(p).max(1)
    known = split.query.obs[split.label_key].astype(str).isin(classes).to_numpy()
    info["p<0.5 known"] = f"{(top[known] < 0.5).mean():.3f}"
    if (~known).any():
        info["p<0.5 absent"] = f"{(top[~known] < 0.5).mean():.3f}"
    return classes, p, conf, info


def sclcm_knn(split: Split):
    q = split.query.copy()
    sclcm.tl.annotate(q, MODEL, method="knn", reference=split.ref,
                      label_key=split.label_key, threshold=0)
    return q.uns["sclcm_label"]["classes"], q.obsm["sclcm_label_probabilities"], \
        q.obs["sclcm_label_score"].to_numpy()


# --- scoring ---

ABBREV = {"CD14+ Monocytes": "CD14", "CD4 T cells": "CD4", "B cells": "B", "NK cells": "NK",
          "FCGR3A+ Monocytes": "FCGR3A", "CD8 T cells": "CD8"}


def score(split: Split, classes, probs, conf, threshold: float) -> dict:
    from sklearn.metrics import f1_score

    truth = split.query.obs[split.label_key].astype(str).to_numpy()
    probs = np.asarray(probs, dtype=np.float64)
    ok = ~np.isnan(probs).any(axis=1)
    pred = np.full(len(truth), UNASSIGNED, dtype=object)
    pred[ok] = np.asarray(classes, dtype=object)[probs[ok].argmax(1)]
    conf = np.where(ok, np.nan_to_num(probs).max(1), 0) if conf is None else \
        np.nan_to_num(np.asarray(conf, dtype=np.float64))
    rejected = conf < threshold
    known = np.isin(truth, classes)
    # the reference's types the query has: one it lacks (acinar in mouse) has no F1
    ref_types = sorted(set(classes) & set(truth))
    f1s = f1_score(truth[known], pred[known], labels=ref_types, average=None,
                   zero_division=0)
    row = {"accuracy": float((pred[known] == truth[known]).mean()),
           "macro_f1": float(f1s.mean()),
           "unassigned": float(rejected[known].mean()),
           "rejected": float(rejected[~known].mean()) if (~known).any() else np.nan,
           "per_class_f1": " ".join(f"{ABBREV.get(c, c)} {f:.2f}"
                                    for c, f in zip(ref_types, f1s, strict=True))}
    return row


#: Fine-tuning settings of the table, chosen by --variants on the donor split (lr 1e-3 with
#: the lower 3 of 4 blocks frozen: the best macro-F1 there, and the cheapest step). 4,096
#: padded tokens per step (16 cells of the shipped model's 256 tokens) keep a step cheap
#: on one thread.
FINETUNE = {"max_steps": 120, "lr": 1e-3, "freeze_layers": 3, "val_every": 20,
            "max_tokens": 4096}


def run_split(split: Split, methods: list[str], finetune_opts: dict) -> list[dict]:
    rows = []
    labels = split.ref.obs[split.label_key].astype(str).to_numpy()
    genes: list = []  # the shared gene space of the gene-level baselines, made once
    for method in methods:
        try:
            row = run_method(split, method, labels, finetune_opts, genes)
        except sclcm.InputError as e:  # reported as a row: the table still comes out
            print(f"  {method}: failed: {e}", flush=True)
            row = {"split": split.name, "method": method, "notes": f"failed: {e}"}
        if row is not None:
            rows.append(row)
    return rows


def run_method(split: Split, method: str, labels: np.ndarray, finetune_opts: dict,
               genes: list) -> dict | None:
    t0 = time.perf_counter()
    info, threshold, conf = None, 0.5, None
    if method == "finetuned":
        classes, probs, conf, info = sclcm_finetuned(split, None, finetune_opts)
        threshold = 0.02
    elif method == "random-init":
        classes, probs, conf, info = sclcm_finetuned(split, random_like(), finetune_opts)
        threshold = 0.02
    elif method == "sclcm-knn":
        classes, probs, conf = sclcm_knn(split)
        threshold = 0.02
    elif method in ("logreg", "pca-knn", "celltypist"):
        if not genes:
            genes.extend(shared_genes(split.ref, split.query))
        if method == "logreg":
            classes, probs, info = logreg(*genes, labels)
        elif method == "pca-knn":
            classes, probs, conf = pca_knn(*genes, labels)
            threshold = 0.02
        else:
            try:
                classes, probs, info = celltypist_(*genes, labels)
            except ImportError:
                print("  celltypist is not installed: skipped", flush=True)
                return None
    row = {"split": split.name, "method": method,
           **score(split, classes, probs, conf, threshold),
           "time_s": time.perf_counter() - t0, "notes": "" if info is None else
           " ".join(f"{k}={v}" for k, v in info.items())}
    print(f"  {method}: macro-F1 {row['macro_f1']:.3f}, {row['time_s']:.0f} s",
          flush=True)
    return row


VARIANTS = {  # fine-tuning choices compared on one split, same step budget
    "lr 3e-4": {"lr": 3e-4},
    "lr 1e-3": {"lr": 1e-3},
    "lr 1e-3, 3 of 4 blocks frozen": {"lr": 1e-3, "freeze_layers": 3},
    "lr 3e-4, head on <cls>": {"lr": 3e-4, "pooling": "cls"},
    "lr 3e-4, no class weights": {"lr": 3e-4, "class_weights": False},
    "lr 3e-3, all 4 blocks frozen (head only)": {"lr": 3e-3, "freeze_layers": 4},
    "lr 1e-3, 3 frozen, gene dropout 0.2": {"lr": 1e-3, "freeze_layers": 3,
                                            "gene_dropout": 0.2},
    "lr 1e-3, 3 frozen, gene dropout 0.4": {"lr": 1e-3, "freeze_layers": 3,
                                            "gene_dropout": 0.4},
    "lr 3e-4, gene dropout 0.3": {"lr": 3e-4, "gene_dropout": 0.3},
}


def with_pooling(pooling: str, name: str = sclcm.tl.DEFAULT_MODEL):
    """The shipped model with its pooled embedding taken from another position."""
    import dataclasses

    from sclcm.models import CellModel

    shipped = sclcm.tl.get_model(name)
    model = CellModel(dataclasses.replace(shipped.config, pooling=pooling),
                      vocab=shipped.vocab, tokenizer=shipped.tokenizer)
    model.load_state_dict(shipped.state_dict())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default="donor,donor-NK,condition,species")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--n-ref", type=int, default=800, help="reference cells (subsample)")
    parser.add_argument("--n-query", type=int, default=400, help="query cells (subsample)")
    parser.add_argument("--steps", type=int, default=FINETUNE["max_steps"])
    parser.add_argument("--lr", type=float, default=FINETUNE["lr"])
    parser.add_argument("--max-tokens", type=int, default=FINETUNE["max_tokens"])
    parser.add_argument("--variants", default=None,
                        help="a split: compare fine-tuning choices on it instead")
    parser.add_argument("--only-variants", default=None,
                        help="with --variants: their names to run, separated by ';'")
    parser.add_argument("--model", default=None,
                        help="a model directory for sclcm's rows (default: the shipped one)")
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    global MODEL
    MODEL = args.model
    import torch

    torch.set_num_threads(1)
    opts = {**FINETUNE, "max_steps": args.steps, "lr": args.lr, "max_tokens": args.max_tokens,
            "val_every": max(1, args.steps // 6)}
    t0 = time.perf_counter()
    rows = []
    if args.variants:
        (split,) = make_splits([args.variants], args.n_ref, args.n_query)
        print(f"{split.name}: reference {split.ref.n_obs} cells, query {split.query.n_obs}")
        base = {k: v for k, v in opts.items() if k not in ("lr", "freeze_layers")}
        chosen = VARIANTS if args.only_variants is None else {
            k: VARIANTS[k] for k in args.only_variants.split(";")}
        for name, change in chosen.items():
            for r in run_split(split, ["finetuned"], {**base, **change}):
                rows.append({**r, "method": f"finetuned {name}"})
        rows += run_split(split, ["logreg"], opts)
    else:
        for split in make_splits(args.splits.split(","), args.n_ref, args.n_query):
            print(f"{split.name}: reference {split.ref.n_obs} cells, query "
                  f"{split.query.n_obs} (absent from the reference: {split.absent or '-'})",
                  flush=True)
            rows += run_split(split, args.methods.split(","), opts)
    table = pd.DataFrame(rows)
    with pd.option_context("display.max_rows", None, "display.width", 250,
                           "display.max_colwidth", 80, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    print(f"fine-tuning: {opts}; total {time.perf_counter() - t0:.0f} s on "
          f"{torch.get_num_threads()} thread")
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
