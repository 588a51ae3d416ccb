"""Ship a pretraining run's model inside the package, compactly.

    python scripts/ship_model.py RUN_DIR sclcm-small [--dtype float16]

Writes ``sclcm/models/pretrained/<name>/``: the model (weights in ``--dtype``, cast back to
float32 on load), the run's ``metrics.json``, its loss curves (``loss_curves.png``, from
``sclcm.pl.pretraining``) and ``tests/data/default_model_float32_embeddings.npy``: the
float32 model's embeddings of 40 Kang 2018 ctrl cells, which the tests compare the shipped
weights against. The model card and ``pretrain.yaml`` are written by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SCLCM_DATA", ROOT.parent / "shared" / "data"))
KANG_CTRL = "muscat2019_kang2018_ctrl_pbmc_8684.h5ad"


def main() -> None:
    import anndata as ad
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import sclcm
    from sclcm.models import CellModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = parser.parse_args()

    out = ROOT / "sclcm" / "models" / "pretrained" / args.name
    out.mkdir(parents=True, exist_ok=True)
    model = CellModel.from_pretrained(args.run_dir / "model").eval()
    for stale in ("model.safetensors", "tokenizer"):  # a directory shipped before
        path = out / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    model.save_pretrained(out, dtype=args.dtype)
    shutil.copy(args.run_dir / "metrics.json", out / "metrics.json")
    sclcm.pl.pretraining(args.run_dir, save=str(out / "loss_curves.png"), show=False)

    cells = ad.read_h5ad(DATA / KANG_CTRL)[::200][:40].copy()
    batch = sclcm.pp.tokenize(cells, model.tokenizer)
    reference = model.embed(batch)
    np.save(ROOT / "tests" / "data" / "default_model_float32_embeddings.npy", reference)
    shipped = CellModel.from_pretrained(out).embed(batch)
    err = float(np.abs(shipped - reference).max() / np.abs(reference).max())
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"dir": str(out), "dtype": args.dtype, "bytes": size,
                      "max_abs_diff_over_max": err}, indent=1))


if __name__ == "__main__":
    main()
