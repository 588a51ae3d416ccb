"""Cell-embedding quality on labelled real data held out from pretraining (scIB bio metrics).

    python benchmarks/embedding_quality.py                   # the shipped default model
    python benchmarks/embedding_quality.py --model DIR
    python benchmarks/embedding_quality.py --preset geneformer --size tiny   # random init
    python benchmarks/embedding_quality.py --baselines-only

Datasets: Kang 2018 control PBMC (labels cell_type, batch donor), Kang 2018 IFN-beta PBMC
(cell_type, batch sample), Baron 2016 human pancreas (2,142 cells of 14 types, batch donor):
held out from the shipped model's pretraining; and Baron 2016 pancreas, human and mouse
(cell_type, batch species), whose 153 mouse cells are among the Baron mouse cells the
shipped model was pretrained on (unlabelled), so it is marked "not held out". Each is
scored for the sclcm
embedding, HVG + PCA (normalize_total, log1p, 2,000 HVGs, scale, 50 PCs) and PCA of all
log-normalized genes (50 PCs): NMI and ARI of Leiden clusters at scIB's optimal resolution,
cell-type ASW, AvgBIO = mean(NMI, ARI, cASW), and batch ASW (1 = batches mixed within each
cell type). Prints one table; ``--csv`` also writes it.
"""

from __future__ import annotations

import sys

# benchmarks/tokenize.py would shadow the standard library's tokenize module: keep this
# script's folder off the import path (siblings are loaded by file below).
sys.path = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("SCLCM_PROGRESS", "0")
os.environ.setdefault("SCLCM_VERBOSITY", "warning")

import anndata as ad  # noqa: E402
import pandas as pd  # noqa: E402

import sclcm  # noqa: E402
from sclcm.metrics import compare_with_pca  # noqa: E402

#: (name, file, label key, batch key)
DATASETS = [
    ("Kang 2018 ctrl", "muscat2019_kang2018_ctrl_pbmc_8684.h5ad", "cell_type", "donor"),
    ("Kang 2018 IFN-b", "muscat_kang2018_ifnb_pbmc_1556.h5ad", "cell_type", "sample"),
    ("Baron human+mouse (not held out)", "cider_baron2016_pancreas_human_mouse_328.h5ad",
     "cell_type", "species"),
    ("Baron human", "came_baron2016_pancreas_human_2142.h5ad", "cell_type", "donor"),
]


def sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def score_dataset(path: Path, label_key: str, batch_key: str, model: str | None,
                  name: str) -> pd.DataFrame:
    adata = ad.read_h5ad(path)
    use_rep = None
    if model is not None:
        start = time.perf_counter()
        sclcm.tl.embed(adata, model)
        print(f"  embedded {adata.n_obs:,} cells of {path.name} in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        adata.obsm[name] = adata.obsm["X_sclcm"]
        use_rep = name
    return compare_with_pca(adata, use_rep, label_key=label_key, batch_key=batch_key)


def main() -> None:
    models = sibling("_models")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models.add_model_args(parser)
    parser.add_argument("--baselines-only", action="store_true",
                        help="score the two PCA references alone")
    parser.add_argument("--csv", type=Path, help="also write the table here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = tmp
        model = None if args.baselines_only else models.load_model_arg(args)
        if model is None and not args.baselines_only:
            print("No model is shipped yet and none was given (--model DIR or --preset): "
                  "scoring the PCA references only.\n")
        name = "sclcm" if model is None else (
            f"sclcm {args.preset}-{args.size} (random init)" if args.preset
            else f"sclcm {Path(model).name}")
        tables = {}
        for label, file, label_key, batch_key in DATASETS:
            path = args.data / file
            if not path.exists():
                print(f"  {path} not found: skipped")
                continue
            tables[label] = score_dataset(path, label_key, batch_key, model, name)
    table = pd.concat(tables, names=["dataset", "embedding"])
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200):
        print(table.to_string())
    print("\nNMI/ARI: Leiden at the resolution (0.1..2.0) with the best NMI; cASW: "
          "(silhouette + 1) / 2 over cell types; AvgBIO: mean of the three; bASW: "
          "1 - |silhouette over batches| within cell types (1 = batches mixed).")
    if args.csv is not None:
        table.to_csv(args.csv)


if __name__ == "__main__":
    main()
