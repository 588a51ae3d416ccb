"""Pretraining objectives side by side: same shape, data and step budget, scored on held-out data.

    python benchmarks/pretrain_objectives.py --out /tmp/objectives           # every arm
    python benchmarks/pretrain_objectives.py --out DIR --arms mlm recon --steps 300
    python benchmarks/pretrain_objectives.py --out DIR --table-only          # print DIR's table

Each arm pretrains the shipped model's shape (geneformer, 4 x 128, 256 tokens per cell)
with ``sclcm.train.pretrain`` on the same corpus (default: pbmc3k, 5% of it held out for
the held-out losses) for the same number of steps of ``--max-tokens`` tokens, then embeds
labelled datasets no arm trains on (``embedding_quality.DATASETS``; Kang ctrl subsampled to
``--kang-cells`` cells) and scores AvgBIO / NMI / ARI / cASW / bASW with ``sclcm.metrics``,
for the last layer and (``--layers``) inner ones. HVG + PCA on the same cells is the
reference. Arms run ``--jobs`` at a time, one CPU thread each; each writes
``DIR/<arm>.json``, and the table is printed from all of them (so arms can be added later).
"""

from __future__ import annotations

import sys

sys.path = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("SCLCM_PROGRESS", "0")
os.environ.setdefault("SCLCM_VERBOSITY", "warning")

#: name -> (objectives, model overrides); the token objective is the family's (mlm)
ARMS = {
    "random": ({"token": 1.0}, {}),  # no training: the reference every arm must beat
    "mlm": ({"token": 1.0}, {}),
    "recon": ({"token": 0.0, "reconstruction": 1.0}, {}),
    "contrastive": ({"token": 0.0, "contrastive": 1.0}, {}),
    "mlm+recon": ({"token": 1.0, "reconstruction": 1.0}, {}),
    "mlm+recon10": ({"token": 1.0, "reconstruction": 10.0}, {}),
    "mlm+recon100": ({"token": 1.0, "reconstruction": 100.0}, {}),
    "mlm+contrastive": ({"token": 1.0, "contrastive": 1.0}, {}),
    "recon+contrastive": ({"token": 0.0, "reconstruction": 1.0, "contrastive": 1.0}, {}),
    "mlm+recon10+contrastive": ({"token": 1.0, "reconstruction": 10.0, "contrastive": 1.0},
                                {}),
    "recon (cls)": ({"token": 0.0, "reconstruction": 1.0}, {"pooling": "cls"}),
    "mlm+recon10 (cls)": ({"token": 1.0, "reconstruction": 10.0}, {"pooling": "cls"}),
}
SHAPE = {"n_layers": 4, "d_model": 128, "n_heads": 4, "d_ff": 256}
PBMC3K = "sctypegsea_10x_pbmc3k_raw_2700.h5ad"
PAPALEXI = "sceptredata_papalexi2021_eccite_lowmoi_20729.h5ad"
BASTIDAS = "supercell_bastidasponce2019_mouse_pancreas_e15_3696.h5ad"
BARON_MOUSE = "came_baron2016_pancreas_mouse_1886.h5ad"
#: The corpora compared; no Kang file and no human Baron cell is in any (they are the
#: held-out sets). "+baron" adds the Baron mouse cells, which are also the mouse half of the
#: Baron human + mouse set: with it, that set is no longer held out.
CORPORA = {
    "pbmc3k": [PBMC3K],
    "pbmc3k+mouse": [PBMC3K, BASTIDAS],  # mouse pancreas through one-to-one orthologs
    "pbmc3k+mouse+baron": [PBMC3K, BASTIDAS, BARON_MOUSE],
    "human": [PBMC3K, PAPALEXI],
    "human+mouse": [PBMC3K, PAPALEXI, BASTIDAS],
}


def sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(arm: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """The pretraining config of one arm."""
    objectives, overrides = ARMS[arm]
    return {
        "data": {"h5ad": [str(args.data / f) for f in CORPORA[args.corpus]],
                 "held_out_fraction": 0.05, "block_size": 512},
        "tokenizer": {"options": {"max_len": 256}},
        "vocab": {"species": "human", "min_cells": 10, "restrict_to_data": not args.full_vocab},
        "model": {"preset": "geneformer", "size": "small",
                  "overrides": {**SHAPE, **overrides}},
        "optim": {"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": min(100, args.steps // 3),
                  "max_steps": max(args.steps, 1), "max_tokens": args.max_tokens,
                  "grad_clip": 1.0, "mask_prob": 0.15},
        "objectives": {"panel_size": 2000, **objectives},
        "trainer": {"val_every": 10**9, "checkpoint_every": 0, "log_every": 25,
                    "seed": args.seed},
        "out_dir": str(out_dir),
    }


def score(model, args: argparse.Namespace) -> list[dict]:
    """AvgBIO & co. of the model's last layer (and ``args.layers``) on the held-out datasets
    (and of HVG + PCA on the same cells, once: with the random arm)."""
    import anndata as ad
    import numpy as np

    import sclcm
    from sclcm.metrics import bio_conservation, pca_embedding

    quality = sibling("embedding_quality")
    rows = []
    for name, file, label_key, batch_key in quality.DATASETS:
        adata = ad.read_h5ad(args.data / file)
        if name.startswith("Kang 2018 ctrl") and adata.n_obs > args.kang_cells:
            keep = np.random.default_rng(0).choice(adata.n_obs, args.kang_cells, replace=False)
            adata = adata[np.sort(keep)].copy()
        labels, batches = adata.obs[label_key].to_numpy(), adata.obs[batch_key].to_numpy()
        reads = {"last": None, **{f"layer {i}": i for i in args.layers}}
        batch = sclcm.pp.tokenize(adata, model.tokenizer)
        for read, layer in reads.items():
            X = np.full((adata.n_obs, model.config.d_model), np.nan, np.float32)
            X[batch.cell_index] = model.embed(batch, layer=layer)
            rows.append({"dataset": name, "read": read, **bio_conservation(X, labels, batches)})
        if args.with_pca and model.config.extra.get("arm") == "random":
            rows.append({"dataset": name, "read": "HVG + PCA", **bio_conservation(
                pca_embedding(adata), labels, batches)})
    return rows


def arm_name(arm: str, args: argparse.Namespace) -> str:
    """The arm's file name: the arm, and the corpus unless it is the default."""
    name = arm if args.corpus == "pbmc3k" else f"{arm} @ {args.corpus}"
    name += ", full vocab" if args.full_vocab else ""
    return name.replace(" ", "_")


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from sclcm.train import load_config, pretrain
    from sclcm.train._prepare import prepare
    from sclcm.train._run import build_model

    out_dir = args.out / "runs" / arm_name(arm, args)
    start = time.perf_counter()
    cfg = config(arm, args, out_dir)
    saved = args.out / f"{arm_name(arm, args)}.json"
    if arm == "random":
        prep = prepare(load_config(cfg))
        model, metrics = build_model(load_config(cfg), prep.vocab, prep.tokenizer), {}
    elif args.reuse and (out_dir / "model").is_dir() and saved.is_file():
        from sclcm.models import CellModel

        model = CellModel.from_pretrained(out_dir / "model")
        metrics = json.loads(saved.read_text())["held_out"]
        start = time.perf_counter() - json.loads(saved.read_text())["train_s"]
    else:
        model, metrics = pretrain(cfg)
    model.config.extra["arm"] = arm
    train_s = time.perf_counter() - start
    rows = score(model.eval(), args)
    result = {"arm": arm, "steps": 0 if arm == "random" else args.steps,
              "corpus": args.corpus + (", full vocab" if args.full_vocab else ""),
              "train_s": round(train_s, 1),
              "objectives": ARMS[arm][0], "overrides": ARMS[arm][1],
              "held_out": {k: v for k, v in metrics.items()
                           if k.endswith(("_step0", "_end", "baseline"))},
              "scores": rows}
    saved.write_text(json.dumps(result, indent=1))
    print(f"  {arm}: trained in {train_s:.0f} s, scored in "
          f"{time.perf_counter() - start - train_s:.0f} s", flush=True)
    return result


def table(out: Path):
    import pandas as pd

    rows, losses = [], []
    for path in sorted(out.glob("*.json")):
        r = json.loads(path.read_text())
        for s in r["scores"]:
            corpus = "" if r["corpus"] == "pbmc3k" else f" @ {r['corpus']}"
            arm = s["read"] if s["read"] == "HVG + PCA" else r["arm"] + corpus + (
                "" if s["read"] == "last" else f" [{s['read']}]")
            rows.append({"dataset": s["dataset"], "embedding": arm, **{
                k: s[k] for k in ("NMI", "ARI", "cASW", "AvgBIO", "bASW")}})
        h = r["held_out"]
        losses.append({"arm": r["arm"], "corpus": r["corpus"], "steps": r["steps"],
                       "train_s": r["train_s"],
                       "token loss (end)": h.get("loss_end", h.get("loss_step0")),
                       "token baseline": h.get("baseline"),
                       "recon MSE (end)": h.get("reconstruction_end"),
                       "recon baseline": h.get("reconstruction_baseline"),
                       "InfoNCE (end)": h.get("contrastive_end")})
    scores = pd.DataFrame(rows).drop_duplicates(["dataset", "embedding"])
    wide = scores.pivot(index="embedding", columns="dataset", values="AvgBIO")
    return pd.DataFrame(losses), scores.set_index(["dataset", "embedding"]), wide


def main() -> None:
    models = sibling("_models")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for runs and results")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--corpus", choices=list(CORPORA), default="pbmc3k")
    parser.add_argument("--full-vocab", action="store_true",
                        help="keep every reference gene in the vocabulary (default: genes "
                             "detected in >= 10 training cells)")
    parser.add_argument("--kang-cells", type=int, default=3000)
    parser.add_argument("--layers", type=int, nargs="*", default=[],
                        help="inner layers to read as well (0 = embeddings)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pca", dest="with_pca", action="store_false")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--reuse", action="store_true",
                        help="score an arm's saved model again (e.g. with --layers) instead "
                             "of training it anew")
    parser.add_argument("--data", type=Path, default=models.DATA)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        with ProcessPoolExecutor(args.jobs) as pool:
            list(pool.map(run_arm, args.arms, [args] * len(args.arms)))
    import pandas as pd

    losses, scores, wide = table(args.out)
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 250,
                           "display.max_rows", 500):
        print("\nHeld-out losses (5% of the corpus' cells):")
        print(losses.to_string(index=False))
        print("\nAvgBIO on held-out datasets:")
        print(wide.to_string())
        print("\nAll metrics:")
        print(scores.to_string())


if __name__ == "__main__":
    main()
