"""Does pretraining on both species help cross-species mapping? Two arms, one recipe.

    nice -n 5 python benchmarks/species_corpus.py --out /tmp/species_arms
    python benchmarks/cross_species.py --models human=/tmp/species_arms/human/model \
        both=/tmp/species_arms/human+mouse/model

Each arm pretrains the shipped model's shape and recipe (geneformer, 4 x 128, masked gene
identity + 100 x reconstruction, as ``benchmarks/pretrain_objectives.py``) for the same
number of steps of the same token budget, one CPU thread, on:

- ``human``: pbmc3k + Baron 2016 human pancreas (2,142 cells),
- ``human+mouse``: the same plus Baron 2016 mouse pancreas (1,886 cells, through one-to-one
  orthologs).

No label is read. Both arms see the human pancreas the mapping uses as reference or query,
so neither is held out from it: the comparison asks only whether adding the other species'
cells helps. ``cross_species.py --models`` scores the saved models.
"""

from __future__ import annotations

import sys

sys.path = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("SCLCM_PROGRESS", "0")
os.environ.setdefault("SCLCM_VERBOSITY", "warning")

PBMC3K = "sctypegsea_10x_pbmc3k_raw_2700.h5ad"
BARON_HUMAN = "came_baron2016_pancreas_human_2142.h5ad"
BARON_MOUSE = "came_baron2016_pancreas_mouse_1886.h5ad"
CORPORA = {"human": [PBMC3K, BARON_HUMAN], "human+mouse": [PBMC3K, BARON_HUMAN, BARON_MOUSE]}


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    objectives = _sibling("pretrain_objectives")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arms", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=_sibling("_models").DATA)
    args = parser.parse_args()
    args.full_vocab, args.corpus = False, "pbmc3k"  # corpus replaced per arm below

    import torch

    from sclcm.train import pretrain

    torch.set_num_threads(1)
    for arm in args.arms:
        out_dir = args.out / arm
        cfg = objectives.config("mlm+recon100", args, out_dir)  # the shipped recipe and shape
        cfg["data"]["h5ad"] = [str(args.data / f) for f in CORPORA[arm]]
        start = time.perf_counter()
        _, metrics = pretrain(cfg)
        seconds = time.perf_counter() - start
        (out_dir / "arm.json").write_text(json.dumps(
            {"arm": arm, "corpus": CORPORA[arm], "steps": args.steps, "train_s": seconds,
             "held_out": metrics}, indent=1, default=str))
        print(f"{arm}: {args.steps} steps in {seconds:.0f} s -> {out_dir / 'model'}", flush=True)


if __name__ == "__main__":
    main()
