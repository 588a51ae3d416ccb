"""Tokenizer speed and memory on pbmc3k replicated to >= 100,000 cells, on one core.

    python benchmarks/tokenize.py [--copies 38] [--repeats 3] [--data DIR]

Prints, on one pinned core:

- the first call of each family in a fresh process: the tokenizers' numba kernels are
  compiled then (with an empty cache: once per environment) or loaded from numba's on-disk
  cache (every later process); this is not in the rates below;
- cells/s for each family in the steady state (in-memory CSR through
  ``sclcm.pp.tokenize``, best of ``--repeats`` runs, as other processes on the machine
  make single runs noisy), and the same for a per-cell Python loop that ranks like the
  published Geneformer tokenizer (the reference, measured in this run);
- the peak memory of tokenizing a backed .h5ad to disk for two file sizes: it should not
  grow with the number of cells (beyond the few tens of MiB that reading the backed file
  in blocks grows by, without tokenizing too).
"""

from __future__ import annotations

import sys

# This file is named like the standard library's tokenize module, which numpy's imports
# load: take the script's own folder off the path before importing anything else.
sys.path = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["SCLCM_PROGRESS"] = "0"
os.environ["SCLCM_VERBOSITY"] = "warning"

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
from scipy import sparse  # noqa: E402

import sclcm  # noqa: E402
from sclcm.genes import GeneVocab  # noqa: E402
from sclcm.tokenizers import (  # noqa: E402
    GeneformerTokenizer,
    ScBERTTokenizer,
    ScFoundationTokenizer,
    ScGPTTokenizer,
)

PBMC3K = "sctypegsea_10x_pbmc3k_raw_2700.h5ad"
BLOCK = 2048  # cells per block, pp.tokenize's default


def pin_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def reference_geneformer_loop(adata, tok: GeneformerTokenizer, n_cells: int) -> float:
    """Cells/s of a per-cell loop in the published tool's style: normalize, rank, cut."""
    ids = tok.vocab.lookup(adata)
    inv = tok._inverse_medians()
    keep = np.flatnonzero((ids >= 0) & (inv[np.maximum(ids, 0)] > 0))
    tokens, norm = ids[keep], inv[ids[keep]]
    X = adata.X[:n_cells]
    totals = np.asarray(X.sum(axis=1)).ravel()
    X = X[:, keep]
    start = time.perf_counter()
    out = []
    for i in range(n_cells):
        row = X[i].toarray().ravel() / totals[i] * 10_000 * norm
        nz = np.nonzero(row)[0]
        order = nz[np.argsort(-row[nz])]
        out.append(np.concatenate([[2], tokens[order][:4094], [3]]))
    return n_cells / (time.perf_counter() - start)


def time_family(adata, tok, report, n_cells, repeats) -> tuple[float, float, int]:
    """Cells/s of the first and the best of ``repeats`` runs, and the tokens made.

    A call on 100 cells before them compiles (or loads) the kernels. The first run also
    pays the system for fresh memory (page faults), which later runs reuse.
    """
    sub = adata if n_cells >= adata.n_obs else adata[:n_cells]
    sclcm.pp.tokenize(adata[:100], tok, report=report)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        batch = sclcm.pp.tokenize(sub, tok, report=report)
        times.append(time.perf_counter() - start)
        n_cells, n_tokens = batch.n_cells, batch.n_tokens
        del batch  # before the next run, which can then reuse its memory
    return n_cells / times[0], n_cells / min(times), n_tokens


def first_calls(path: Path, tokenizer_dirs: list[Path], cache: Path) -> dict[str, float]:
    """Seconds of each tokenizer's first ``encode`` (100 cells) in a fresh process.

    numba's cache is ``cache``: the first process with an empty one compiles the kernels,
    a later one loads them.
    """
    code = f"""
import time, anndata as ad, sclcm
from sclcm.tokenizers import load_tokenizer
adata = ad.read_h5ad({str(path)!r})[:100]
report = sclcm.genes.resolve(adata, count_coverage=False)
for d in {[str(d) for d in tokenizer_dirs]!r}:
    tok = load_tokenizer(d)
    cmap = tok.column_map(adata, report=report)
    start = time.perf_counter()
    tok.encode(adata.X, cmap)
    print(tok.name, time.perf_counter() - start)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "NUMBA_CACHE_DIR": str(cache)})
    return {name: float(t) for name, t in (line.split() for line in res.stdout.splitlines())}


def peak_memory_to_disk(path: Path, tokenizer_dir: Path, out: Path,
                        block_size: int) -> tuple[float, float]:
    """(RSS after opening, peak RSS while tokenizing) in MiB, in a fresh process.

    The peak is the kernel's high-water mark (VmHWM), reset after the file is opened and
    the tokenizer's compiled kernels are loaded (by tokenizing the first 10 cells).
    """
    code = f"""
import anndata as ad, sclcm
from sclcm.tokenizers import load_tokenizer
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
tok = load_tokenizer({str(tokenizer_dir)!r})
adata = ad.read_h5ad({str(path)!r}, backed="r")
sclcm.pp.tokenize(adata[:10], tok)
opened = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
sclcm.pp.tokenize(adata, tok, out={str(out)!r}, block_size={block_size})
print(opened, status("VmHWM"))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ})
    opened, peak = map(float, res.stdout.split())
    return opened, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=38, help="pbmc3k copies (38: 102,600)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per family")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "SCLCM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")))
    args = parser.parse_args()
    pin_one_core()

    base = ad.read_h5ad(args.data / PBMC3K)
    report = sclcm.genes.resolve(base)
    vocab = GeneVocab.from_reference("human")
    gf = GeneformerTokenizer(vocab).fit(base, report=report)
    big = ad.AnnData(sparse.vstack([base.X] * args.copies, format="csr"), var=base.var)
    big.obs_names = [f"c{i}" for i in range(big.n_obs)]
    big_report = sclcm.genes.resolve(big, count_coverage=False)
    print(f"pbmc3k x {args.copies} = {big.n_obs:,} cells, {big.X.nnz:,} non-zeros "
          f"({big.X.nnz / big.n_obs:.0f} per cell); one core; numpy {np.__version__}\n")

    panel = GeneVocab.from_reference("human", biotypes=["protein_coding"])
    families = [(gf, big.n_obs), (ScGPTTokenizer(vocab), big.n_obs),
                (ScFoundationTokenizer(vocab), big.n_obs),
                # every panel gene in every cell: 20k tokens a cell, so fewer cells
                (ScBERTTokenizer(panel), 10_000)]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [Path(tmp) / tok.name for tok, _ in families]
        for (tok, _), d in zip(families, dirs, strict=True):
            tok.save(d)
        compiled = first_calls(args.data / PBMC3K, dirs, Path(tmp) / "numba")
        cached = first_calls(args.data / PBMC3K, dirs, Path(tmp) / "numba")
    print("first call in a fresh process (100 cells; not in the rates below):")
    for tok, _ in families:
        print(f"  {tok.name:<14}{compiled[tok.name]:6.1f} s compiling the kernels, "
              f"{cached[tok.name]:5.2f} s with them cached")
    print()

    rates = {}
    print(f"{'':<39}{'cells/s':>12}")
    print(f"{'family':<14}{'cells':>10}{'tokens':>15}{'best of ' + str(args.repeats):>12}"
          f"{'first run':>12}")
    for tok, n in families:
        first, rate, n_tokens = time_family(big, tok, big_report, n, args.repeats)
        rates[tok.name] = rate
        print(f"{tok.name:<14}{min(n, big.n_obs):>10,}{n_tokens:>15,}{rate:>12,.0f}"
              f"{first:>12,.0f}")
    ref = reference_geneformer_loop(big, gf, 2_000)
    print(f"{'reference loop':<14}{2_000:>10,}{'':>15}{ref:>12,.0f}   (per-cell Python loop, "
          "geneformer ranking)")
    print(f"\ngeneformer vs reference loop: {rates['geneformer'] / ref:.1f}x")
    for name in ("geneformer", "scgpt"):
        verdict = "met" if rates[name] >= 50_000 else "MISSED"
        print(f"target >= 50,000 cells/s on one core, {name}: {rates[name]:,.0f} ({verdict})")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gf.save(tmp / "tok")
        print(f"\npeak RSS tokenizing a backed .h5ad to disk (geneformer, "
              f"{BLOCK:,}-cell blocks):")
        for n in (20_000, big.n_obs):
            path = tmp / f"cells_{n}.h5ad"
            big[:n].copy().write_h5ad(path)
            opened, peak = peak_memory_to_disk(path, tmp / "tok", tmp / f"corpus_{n}", BLOCK)
            print(f"  {n:>8,} cells: {opened:6.0f} MiB after opening, {peak:6.0f} MiB peak "
                  "while tokenizing")
            path.unlink()


if __name__ == "__main__":
    main()
