"""Cross-species mapping on Baron 2016 pancreas: sclcm against ortholog baselines, one run.

    python benchmarks/cross_species.py                       # the whole table (1 thread; over
                                                             # an hour on a shared core, most
                                                             # of it fine-tuning classifiers)
    python benchmarks/cross_species.py --quick               # the two main directions, kNN only
    python benchmarks/cross_species.py --no-classifier --csv rows.csv   # rows as they come
    python benchmarks/cross_species.py --models human=/tmp/arms/human/model \
        both=/tmp/arms/human+mouse/model                     # also score other models (kNN)

Directions: Baron human (2,142 cells) -> Baron mouse (1,886) and back; human -> the
mouse1 donor alone (822); and within the CIDER human + mouse file (175 human -> 153 mouse,
its mouse genes already in human symbols). Labels are compared in lower case (human
``t_cell`` is mouse ``T_cell``). Per direction and method:

- ``acc``, ``macro-F1``: on the query cells whose type the reference has (an
  ``"Unassigned"`` cell counts as wrong; ``acc (assigned)`` counts only assigned cells);
- ``novel Unassigned``: the share of query cells of types the reference lacks that come
  out ``"Unassigned"`` (mouse B_cell and immune_other; human acinar, mast, epsilon);
- on the joint embedding (reference + query): ``AvgBIO`` (Leiden NMI / ARI and cell-type
  ASW, ``sclcm.metrics``) over the shared types, and ``bASW (species)``, scIB's batch
  silhouette with species as batch (1: species mixed within each type).

Methods: ``sclcm.tl.map_species`` with the shipped ``sclcm-small`` (kNN, one2one and
all orthologs; classifier fine-tuned on the reference, 300 steps), kNN at other ``k`` on
the same embedding (these three in the two main directions only), ``--models`` (kNN), and
two baselines on one-to-one orthologs computed here: HVG + PCA of the
concatenated cells + the same kNN transfer, and L2 logistic regression trained on the
reference's log-normalized HVGs. ``sclcm-small`` was pretrained (no label read) on
pbmc3k, E15.5 and Baron 2016 *mouse* pancreas; Baron human was held out.
"""

from __future__ import annotations

import sys

sys.path = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("SCLCM_PROGRESS", "0")
os.environ.setdefault("SCLCM_VERBOSITY", "error")

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HUMAN = "came_baron2016_pancreas_human_2142.h5ad"
MOUSE = "came_baron2016_pancreas_mouse_1886.h5ad"
MOUSE1 = "chai_baron_mouse1_822.h5ad"
CIDER = "cider_baron2016_pancreas_human_mouse_328.h5ad"
LABEL = "cell_type"
#: Pancreas markers whose fate under each ortholog rule is listed (mouse symbols).
MARKERS = ["Ins1", "Ins2", "Gcg", "Sst", "Ppy", "Pyy", "Iapp", "Ghrl", "Cpa1", "Prss2",
           "Try4", "Try5", "Ctrb1", "Cela1", "Pnlip", "Reg1", "Krt19", "Sox9", "Pecam1",
           "Plvap", "Col1a2", "Pdgfrb", "Rgs5", "Cd74", "Cd79a", "Cd3e", "Kit", "Sox10"]


def load(data: Path) -> dict[str, ad.AnnData]:
    """The datasets, labels in lower case (one name per type across the two species)."""
    out = {}
    for name, file in (("human", HUMAN), ("mouse", MOUSE), ("mouse1", MOUSE1)):
        adata = ad.read_h5ad(data / file)
        adata.obs[LABEL] = adata.obs[LABEL].astype(str).str.lower()
        out[name] = adata
    cider = ad.read_h5ad(data / CIDER)
    cider.obs[LABEL] = cider.obs[LABEL].astype(str).str.lower()
    for sp in ("human", "mouse"):
        out[f"cider {sp}"] = cider[cider.obs["species"] == sp].copy()
    return out


def scores(query_labels: np.ndarray, predicted: np.ndarray, ref_types: set[str]) -> dict:
    from sklearn.metrics import f1_score

    y, p = np.asarray(query_labels, dtype=str), np.asarray(predicted, dtype=str)
    shared = np.isin(y, sorted(ref_types))
    assigned = shared & (p != "Unassigned")
    novel = ~shared
    return {"acc": float((y[shared] == p[shared]).mean()),
            "macro-F1": float(f1_score(y[shared], p[shared], labels=sorted(set(y[shared])),
                                       average="macro", zero_division=0)),
            "acc (assigned)": float((y[assigned] == p[assigned]).mean()),
            "shared Unassigned": float((p[shared] == "Unassigned").mean()),
            "novel Unassigned": float((p[novel] == "Unassigned").mean()) if novel.any()
            else float("nan"),
            "n_novel": int(novel.sum())}


def joint_scores(X: np.ndarray, labels: np.ndarray, species: np.ndarray,
                 shared_types: set[str]) -> dict:
    """AvgBIO and species bASW of a joint embedding over the shared types' cells."""
    from sclcm.metrics import bio_conservation

    keep = np.isin(labels, sorted(shared_types))
    m = bio_conservation(X[keep], labels[keep], species[keep])
    return {"AvgBIO": m["AvgBIO"], "bASW (species)": m["bASW"]}


def knn_labels(ref_X, q_X, ref_labels, *, k: int, threshold: float) -> np.ndarray:
    """The kNN transfer of ``map_species`` (vote x typicality, Unassigned below threshold)."""
    from sclcm.tl._transfer import transfer_labels

    r = transfer_labels(ref_X, q_X, ref_labels, k=k)
    score = r.vote * r.typicality
    return np.where(score >= threshold, r.label.astype(object), "Unassigned")


def one2one_counts(reference: ad.AnnData, query: ad.AnnData) -> tuple[ad.AnnData, ad.AnnData]:
    """Both on the human genes of their one-to-one orthologs, shared genes only."""
    import sclcm

    def human(a):
        report = sclcm.genes.resolve(a, count_coverage=False)
        if report.species != "homo_sapiens":
            report = report.to_species("human")
        return report.collapse(a)

    r, q = human(reference), human(query)
    genes = r.var_names.intersection(q.var_names)
    return r[:, genes].copy(), q[:, genes].copy()


def baselines(reference, query, *, threshold: float, k: int) -> dict[str, dict]:
    """HVG + PCA + kNN on the concatenated cells, and logistic regression, one2one genes."""
    import scanpy as sc
    from sklearn.linear_model import LogisticRegression

    r, q = one2one_counts(reference, query)
    both = ad.concat({"reference": r, "query": q}, label="dataset")
    both.obs_names_make_unique()
    sc.pp.normalize_total(both, target_sum=1e4)
    sc.pp.log1p(both)
    sc.pp.highly_variable_genes(both, n_top_genes=2000, batch_key="dataset")
    hvg = both[:, both.var["highly_variable"].to_numpy()].copy()
    hvg.X = hvg.X.toarray()
    sc.pp.scale(hvg, max_value=10)
    sc.pp.pca(hvg, n_comps=50, random_state=0)
    is_ref = (both.obs["dataset"] == "reference").to_numpy()
    X = hvg.obsm["X_pca"]
    ref_labels = r.obs[LABEL].to_numpy()
    out = {"HVG + PCA + kNN (one2one)": {
        "pred": knn_labels(X[is_ref], X[~is_ref], ref_labels, k=k, threshold=threshold),
        "joint": X}}
    # logistic regression: the reference's log-normalized HVGs, each gene scaled on the
    # reference (the query scaled with the reference's mean and sd)
    lr_ref = both[is_ref].copy()
    sc.pp.highly_variable_genes(lr_ref, n_top_genes=2000)
    genes = lr_ref.var["highly_variable"].to_numpy()
    Xr, Xq = both.X[is_ref][:, genes].toarray(), both.X[~is_ref][:, genes].toarray()
    mu, sd = Xr.mean(0), Xr.std(0) + 1e-6
    clf = LogisticRegression(max_iter=1000, C=0.1).fit((Xr - mu) / sd, ref_labels)
    prob = clf.predict_proba((Xq - mu) / sd)
    pred = np.where(prob.max(1) >= 0.5, clf.classes_[prob.argmax(1)], "Unassigned")
    out["logistic regression (one2one)"] = {"pred": pred, "joint": None}
    return out


def lost_genes(mouse: ad.AnnData, model) -> None:
    """How many mouse genes and counts each rule carries to the model, and which are lost."""
    import sclcm
    from sclcm.genes import SpeciesMap, gene_table

    report = sclcm.genes.resolve(mouse)
    tok = model.tokenizer
    total = report.var_counts.sum()
    human_symbol = gene_table("human").symbol
    print("\nBaron mouse (1,886 cells) genes under each rule (table: the shipped ortholog "
          "table; vocab: the shipped model's 13,556 genes):")
    rows, maps = [], {}
    for rule in ("one2one", "all"):
        smap = maps[rule] = SpeciesMap.build(report, "human", orthologs=rule)
        usable = tok.token_ids_of_genes(tok.vocab.encode(smap.target_ids)) >= 0
        for where, keep in (("table", None), ("vocab", usable)):
            c = smap.coverage(keep, var_counts=report.var_counts)
            rows.append({"rule": rule, "reaches": where, **{k: c[k] for k in (
                "n_genes", "n_genes_in_vocab", "gene_coverage", "count_coverage",
                "n_one_to_many", "n_many_to_one", "count_inflation")}})
    print(pd.DataFrame(rows).to_string(index=False, float_format="{:.3f}".format))
    lost = maps["one2one"].lost()
    lost["share of counts"] = lost["counts"] / total
    gained = lost[lost["n_orthologs"] > 0]
    print(f"\none2one loses {len(lost)} of {report.n_matched} resolved mouse genes "
          f"({lost['share of counts'].sum():.1%} of counts); {len(gained)} of them "
          f"({gained['share of counts'].sum():.1%} of counts) have orthologs that 'all' "
          "keeps. Top 12 by counts:")
    print(lost.sort_values("counts", ascending=False).head(12)[
        ["symbol", "n_orthologs", "share of counts"]].to_string(float_format="{:.4f}".format))
    print("\nPancreas markers: human genes reached under each rule (* = in the model's "
          "vocabulary):")
    for gene in MARKERS:
        if gene not in mouse.var_names:
            continue
        i = mouse.var_names.get_loc(gene)
        cells = []
        for rule in ("one2one", "all"):
            smap = maps[rule]
            ids = smap.target_ids[smap.matrix[i].indices]
            inv = tok.token_ids_of_genes(tok.vocab.encode(ids)) >= 0
            cells.append(",".join(f"{human_symbol.get(g, g)}{'*' if v else ''}"
                                  for g, v in zip(ids, inv, strict=True)) or "-")
        print(f"  {gene:8s} {report.var_counts[i] / total:7.2%} of counts   one2one: "
              f"{cells[0]:24s} all: {cells[1]}")


def run_direction(name: str, reference, query, args, rows: list, models: dict, *,
                  main: bool = True) -> None:
    import sclcm
    from sclcm.tl._map_species import THRESHOLDS

    ref_types = set(reference.obs[LABEL])
    shared = ref_types & set(query.obs[LABEL])
    y = query.obs[LABEL].to_numpy()
    thr = THRESHOLDS["knn"]

    def add(method, pred, joint=None, seconds=None, note=""):
        row = {"direction": name, "method": method, **scores(y, pred, ref_types)}
        if joint is not None and not args.no_joint:
            labels = np.r_[reference.obs[LABEL].to_numpy(), y].astype(str)
            species = np.r_[["reference"] * reference.n_obs, ["query"] * query.n_obs]
            row.update(joint_scores(joint, labels, species, shared))
        row["s"] = seconds
        row["note"] = note
        rows.append(row)
        print("  " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v)
                                for v in row.values()), flush=True)
        if args.csv is not None:
            pd.DataFrame(rows).to_csv(args.csv, index=False)

    for mname, model in models.items():
        rules = ("one2one", "all") if mname == "sclcm-small" and main and not args.quick \
            else ("one2one",)
        for rule in rules:
            start = time.perf_counter()
            j = sclcm.tl.map_species(query, reference, model=model, label_key=LABEL,
                                     orthologs=rule)
            q = (j.obs["dataset"] == "query").to_numpy()
            add(f"{mname} kNN k=15, {rule}", j.obs["sclcm_label"].to_numpy()[q],
                j.obsm["X_sclcm"], time.perf_counter() - start,
                f"query counts reaching vocab {j.uns['sclcm']['count_coverage']['query']:.3f}")
            if mname == "sclcm-small" and rule == "one2one" and main and not args.quick:
                X = j.obsm["X_sclcm"]
                for k in (5, 30):
                    add(f"{mname} kNN k={k}, {rule}", knn_labels(
                        X[~q], X[q], reference.obs[LABEL].to_numpy(), k=k, threshold=thr))
                raw = knn_labels(X[~q], X[q], reference.obs[LABEL].to_numpy(), k=15,
                                 threshold=0.0)
                add(f"{mname} kNN k=15, {rule}, no Unassigned", raw)
    if args.classifier and main and not args.quick:
        start = time.perf_counter()
        j = sclcm.tl.map_species(query, reference, label_key=LABEL, method="classifier",
                                 finetune={"max_steps": args.finetune_steps, "seed": 0})
        q = (j.obs["dataset"] == "query").to_numpy()
        add(f"sclcm-small classifier ({args.finetune_steps} steps), one2one",
            j.obs["sclcm_label"].to_numpy()[q], j.obsm["X_sclcm"],
            time.perf_counter() - start)
    start = time.perf_counter()
    for method, res in baselines(reference, query, threshold=thr, k=15).items():
        add(method, res["pred"], res["joint"], time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "SCLCM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-classifier", dest="classifier", action="store_false")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--no-joint", action="store_true", help="skip AvgBIO / bASW")
    parser.add_argument("--models", nargs="*", default=[],
                        help="name=model_dir pairs scored with kNN beside the shipped model")
    parser.add_argument("--directions", nargs="*", default=None)
    parser.add_argument("--csv", type=Path, default=None, help="write the rows here as they come")
    args = parser.parse_args()

    import torch

    import sclcm

    torch.set_num_threads(1)
    data = load(args.data)
    models = {"sclcm-small": None, **dict(m.split("=", 1) for m in args.models)}
    lost_genes(data["mouse"], sclcm.tl.get_model())
    directions = {"human -> mouse": ("human", "mouse"), "mouse -> human": ("mouse", "human"),
                  "human -> mouse1 (822)": ("human", "mouse1"),
                  "CIDER human -> mouse (328)": ("cider human", "cider mouse")}
    if args.quick:
        directions = dict(list(directions.items())[:2])
    if args.directions:
        directions = {k: v for k, v in directions.items() if k in args.directions}
    rows: list[dict] = []
    print()
    for name, (ref, query) in directions.items():
        main = name in ("human -> mouse", "mouse -> human")  # the rest: kNN and baselines
        run_direction(name, data[ref], data[query], args, rows,
                      models if main else {"sclcm-small": None}, main=main)
    table = pd.DataFrame(rows).set_index(["direction", "method"])
    with pd.option_context("display.width", 250, "display.max_colwidth", 60,
                           "display.max_rows", 200):
        print("\nCross-species label transfer (shared types; Unassigned counts as wrong):")
        print(table.to_string(float_format="{:.3f}".format))


if __name__ == "__main__":
    main()
