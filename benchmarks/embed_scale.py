"""sclcm.tl.embed at scale: a backed .h5ad of >= 200,000 real cells in constant memory.

    python benchmarks/embed_scale.py                       # the shipped default model
    python benchmarks/embed_scale.py --model DIR
    python benchmarks/embed_scale.py --preset geneformer --size tiny [--max-len 256]

pbmc3k is replicated ``--copies`` times (75: 202,500 cells) into a temporary .h5ad, written
block by block (one copy of pbmc3k in memory), and embedded from ``backed="r"`` in a fresh
process, so that the peak resident memory (the kernel's high-water mark, reset after the
model is loaded and the file opened) is the embedding's own. The same model embeds the
first ``--subset`` cells in memory in another process, as reference. Prints cells/s and
peak RSS of both; the backed run must stay below 2 GB. The device is
``sclcm.settings.device`` (``SCLCM_DEVICE``; CUDA where there is one), where the peak GPU
memory (torch's allocator, the model's weights included) is printed too; ``--json PATH``
writes the rows there.
"""

from __future__ import annotations

import sys

# benchmarks/tokenize.py would shadow the standard library's tokenize module: keep this
# script's folder off the import path (siblings are loaded by file below).
sys.path = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ["SCLCM_PROGRESS"] = "0"
os.environ["SCLCM_VERBOSITY"] = "warning"

LIMIT_MIB = 2048


def sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_replicated(source: Path, copies: int, path: Path) -> int:
    """``copies`` of ``source``'s cells in one .h5ad, appended one copy at a time."""
    import anndata as ad
    import h5py
    import pandas as pd

    try:
        from anndata.io import sparse_dataset, write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import sparse_dataset, write_elem

    base = ad.read_h5ad(source)
    names = base.obs_names
    base.obs_names = [f"{n}-0" for n in names]
    base.write_h5ad(path)
    with h5py.File(path, "a") as f:
        X = sparse_dataset(f["X"])
        for _ in range(copies - 1):
            X.append(base.X)
        del f["obs"]
        write_elem(f, "obs", pd.DataFrame(index=[f"{n}-{i}" for i in range(copies)
                                                  for n in names]))
    return base.n_obs * copies


CHILD = """
import json, resource, sys, time
import anndata as ad, numpy as np, torch, sclcm

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

path, model, mode, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = sclcm.tl.get_model(None if model == "-" else model)
if mode == "backed":
    adata = ad.read_h5ad(path, backed="r")
else:
    adata = ad.read_h5ad(path, backed="r")[:n].to_memory()
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
cuda = sclcm.settings.resolve_device().type == "cuda"
if cuda:
    torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
sclcm.tl.embed(adata, model)
seconds = time.perf_counter() - start
emb = adata.obsm["X_sclcm"]
print(json.dumps({"cells": adata.n_obs, "seconds": seconds, "rss_before": before,
                  "peak": status("VmHWM"), "d": emb.shape[1],
                  "output_mib": emb.nbytes / 2**20, "threads": torch.get_num_threads(),
                  "nan_rows": int(np.isnan(emb).all(1).sum()),
                  "device": str(sclcm.settings.resolve_device()),
                  "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}))
"""


def run_child(path: Path, model: str | None, mode: str, n: int) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(path), model or "-", mode, str(n)],
                         capture_output=True, text=True, env={**os.environ})
    if res.returncode:
        raise SystemExit(res.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    models = sibling("_models")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models.add_model_args(parser)
    parser.add_argument("--copies", type=int, default=75, help="pbmc3k copies (75: 202,500)")
    parser.add_argument("--subset", type=int, default=5_000,
                        help="cells of the in-memory reference run")
    parser.add_argument("--tmpdir", type=Path, help="where the temporary .h5ad goes")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        args.workdir = tmp
        model = models.load_model_arg(args)
        if model is None:
            raise SystemExit("No model is shipped yet: pass --model DIR, or --preset NAME "
                             "--size SIZE for a random-init model of that shape.")
        path = Path(tmp) / f"pbmc3k_x{args.copies}.h5ad"
        start = time.perf_counter()
        n = write_replicated(args.data / models.PBMC3K, args.copies, path)
        print(f"wrote {n:,} cells (pbmc3k x {args.copies}) to a backed .h5ad of "
              f"{path.stat().st_size / 2**30:.1f} GiB in {time.perf_counter() - start:.0f} s")
        print(f"model: {model}")
        rows = {"backed": run_child(path, model, "backed", n),
                "in memory": run_child(path, model, "memory", min(args.subset, n))}
    first = rows["backed"]
    print(f"(torch threads: {first['threads']}; d_model {first['d']}; peak RSS is the whole "
          "process's high-water mark during embed, incl. torch, the model and the output)\n")
    print(f"{'run':<11}{'cells':>10}{'seconds':>10}{'cells/s':>10}{'RSS before':>12}"
          f"{'peak RSS':>10}{'output':>9}")
    for name, r in rows.items():
        print(f"{name:<11}{r['cells']:>10,}{r['seconds']:>10.1f}{r['cells'] / r['seconds']:>10,.0f}"
              f"{r['rss_before']:>8.0f} MiB{r['peak']:>6.0f} MiB{r['output_mib']:>5.0f} MiB")
    if first["gpu_peak_mib"] is not None:
        print(f"device {first['device']}: peak GPU memory (torch's allocator) "
              + ", ".join(f"{name} {r['gpu_peak_mib']:.0f} MiB" for name, r in rows.items()))
    verdict = "met" if first["peak"] < LIMIT_MIB else "MISSED"
    print(f"\nbacked peak RSS < {LIMIT_MIB} MiB on {first['cells']:,} cells: "
          f"{first['peak']:.0f} MiB ({verdict})")
    if args.json:
        args.json.write_text(json.dumps({"model": model, "rows": rows,
                                         "limit_mib": LIMIT_MIB}, indent=1))


if __name__ == "__main__":
    main()
