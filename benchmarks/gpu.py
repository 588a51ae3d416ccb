"""Every GPU figure in one call: the ``gpu`` tests and the GPU benchmarks, each under a time cap.

    python3 benchmarks/gpu.py --out $OUT --wheels .gpu --data .gpu/data   # on the GPU machine
    python benchmarks/gpu.py --dry-run --out /tmp/gpu-dry                 # anywhere, on CPU
    python benchmarks/gpu.py --prepare .gpu                               # here, beforehand

Runs, in this order and each in its own process under its own cap (all within ``--budget``,
480 s by default):

- ``tests``: ``pytest -m gpu`` over the test files that mark GPU cases;
- ``forward``: ``benchmarks/model_forward.py``'s comparisons (sclcm on packed cells in bf16
  against transformers' padded ``BertModel`` with SDPA on the same weights and cells, small
  and base shapes; scGPT's shape against torch's padded encoder where the script has it),
  once per attention backend: flash-attn's varlen kernel where flash-attn imports, torch
  SDPA per length bucket, and torch's own ``varlen_attn`` where torch has it;
- ``perturb``: ``benchmarks/perturb_speed.py --device cuda`` (against one forward pass per
  perturbed copy);
- ``pretrain``: ``benchmarks/pretrain.py --device cuda``: the local Census and ``.h5ad``
  streams, training steps of the Geneformer base shape (tokens/s, cells/s, MFU), and the
  streams' cells/s over what training consumes; if the run fails with torch's
  ``varlen_attn``, once more with SDPA;
- ``embed``: ``benchmarks/embed_scale.py`` on CUDA (cells/s, peak GPU memory, peak RSS).

Nothing is fetched from the network. flash-attn is optional: where it does not import, the
summary says "flash-attn not installed, SDPA used". ``--wheels DIR`` installs what the GPU
machine lacks before anything runs: every ``*.whl`` in DIR with ``pip install --no-index
--no-deps --target``, and every ``site-*.tar.xz`` (made by ``--prepare``: the same wheels
installed and packed with xz, which is what fits in a 64 MiB upload) unpacked there; the
children find them through ``PYTHONPATH``.

Writes ``summary.md`` (one Markdown table), ``results.json`` (every figure, each step's
command, status and the tail of its errors) and ``log.txt`` (the children's output) to
``--out`` (default ``$OUT``), and prints the table last. A step that fails or runs out of
time is a row saying so; the others still run.

``--dry-run`` takes the same path on the CPU with tiny shapes, a few cells and steps, so
that every benchmark runs and the summary is written (``tests/test_gpu_script.py``).
``--prepare DIR`` (on a machine with pip's index) downloads the wheels for CPython 3.12 on
x86-64 Linux of what sclcm's benchmarks import and the GPU image lacks, packs them, and
copies the data the benchmarks read into ``DIR/data``; see ``docs/performance.md``.
"""

from __future__ import annotations

import sys

# benchmarks/tokenize.py would shadow the standard library's tokenize module: keep this
# script's folder off the import path (siblings are loaded by file).
sys.path = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PBMC3K = "sctypegsea_10x_pbmc3k_raw_2700.h5ad"
#: A small human file for the local Census streams (pbmc3k is the other).
STREAM_FILE = "muscat_kang2018_ifnb_pbmc_1556.h5ad"
#: Dry-run stand-in for both forward shapes: layers, hidden, heads, ffn, positions.
TINY_SHAPE = (2, 64, 2, 128, 2048)
#: Dense bf16 peak TFLOP/s by device name, for MFU (SXM parts; PCIe H100 is 756).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
#: Seconds each step may take on the GPU (the dry run's are for a loaded 2-core CPU).
CAPS = {"setup": 50, "tests": 40, "forward": 55, "perturb": 60, "pretrain": 105, "embed": 60}
DRY_CAPS = {"setup": 60, "tests": 60, "forward": 60, "perturb": 60, "pretrain": 90,
            "embed": 60}


# --- running children under caps -------------------------------------------------------
@dataclass
class Result:
    """What one child process did."""

    status: str  # "ok", "failed", "timed out", "skipped"
    seconds: float = 0.0
    rc: int | None = None
    command: list[str] = field(default_factory=list)
    error: str = ""
    figures: dict | None = None


def run_child(cmd: list[str], *, cap: float, env: dict, log: Path, title: str,
              json_path: Path | None = None) -> Result:
    """Run ``cmd`` with its output appended to ``log``, killed with its whole process group
    after ``cap`` seconds (embed_scale and pytest start processes of their own)."""
    if cap < 5:
        return Result("skipped", command=cmd, error="out of the time budget")
    with log.open("a") as fh:
        fh.write(f"\n===== {title}: {' '.join(cmd)} (cap {cap:.0f} s)\n")
        fh.flush()
        offset = fh.tell()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            rc = None
        # also after a normal exit: a process left behind (a DataLoader worker) would hold
        # GPU memory and CPU time that the next step measures
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        seconds = time.perf_counter() - start
        fh.write(f"===== {title}: rc {rc}, {seconds:.1f} s\n")
    figures = None
    if json_path is not None and json_path.exists():
        with contextlib.suppress(ValueError):
            figures = json.loads(json_path.read_text())
    if rc is None:
        return Result("timed out", seconds, None, cmd, f"killed after {cap:.0f} s", figures)
    if rc != 0:
        return Result("failed", seconds, rc, cmd, last_error(log, offset), figures)
    return Result("ok", seconds, 0, cmd, "", figures)


def last_error(log: Path, offset: int = 0) -> str:
    """The last line from ``offset`` on in ``log`` that looks like an error (else the last
    line)."""
    with log.open("rb") as fh:
        fh.seek(offset)
        text = fh.read().decode(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("=====")]
    for line in reversed(lines):
        if re.search(r"(Error|Exception|error:|FAILED|Killed|SystemExit)", line):
            return line[:300]
    return lines[-1][:300] if lines else ""


# --- installing what the GPU image lacks -----------------------------------------------
def install(wheels: Path, site: Path, log: Path, cap: float) -> Result:
    """Unpack ``site-*.tar.xz`` and pip-install ``*.whl`` from ``wheels`` into ``site``."""
    start = time.perf_counter()
    site.mkdir(parents=True, exist_ok=True)
    archives = sorted(wheels.glob("site-*.tar.xz"))
    for archive in archives:
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(site, filter="data")
    whl = sorted(str(p) for p in wheels.glob("*.whl"))
    if not archives and not whl:
        return Result("failed", error=f"no *.whl or site-*.tar.xz in {wheels}")
    if whl:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), *whl]
        res = run_child(cmd, cap=cap - (time.perf_counter() - start), env=dict(os.environ),
                        log=log, title="install wheels")
        if res.status != "ok":
            return res
    installed = sorted(x.name for x in site.iterdir() if x.name.endswith(".dist-info"))
    return Result("ok", time.perf_counter() - start, 0, [*map(str, archives), *whl],
                  figures={"installed": [x.removesuffix(".dist-info") for x in installed]})


PROBE = """
import importlib, importlib.metadata as md, json, sys
out = {"python": sys.version.split()[0]}
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
for name in ("numpy", "pandas", "scipy", "anndata", "tiledbsoma", "tiledbsoma-ml",
             "cellxgene-census", "transformers", "lightning", "numba", "pytest"):
    out[name] = version(name)
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda"] = torch.cuda.is_available()
    if out["cuda"]:
        out["device"] = torch.cuda.get_device_name()
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        out["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        out["cuda_version"] = torch.version.cuda
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        out["torch_varlen"] = True
    except ImportError:
        out["torch_varlen"] = False
except Exception as e:
    out["torch"] = f"import failed: {e!r}"
try:
    from flash_attn import flash_attn_varlen_func  # noqa: F401
    out["flash_attn"] = version("flash-attn") or "imported"
except Exception as e:
    out["flash_attn"] = None
    out["flash_attn_error"] = repr(e)[:200]
for module in ("sclcm", "anndata", "tiledbsoma_ml", "cellxgene_census"):
    try:
        importlib.import_module(module)
    except Exception as e:
        out.setdefault("import_errors", {})[module] = repr(e)[:200]
print("PROBE " + json.dumps(out))
"""


def probe(env: dict, log: Path, cap: float) -> dict:
    """What the children will find: versions, the GPU, flash-attn, torch's varlen kernel."""
    cmd = [sys.executable, "-c", PROBE]
    res = run_child(cmd, cap=cap, env=env, log=log, title="probe")
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {"error": res.error or res.status}


# --- the forward benchmark's child -----------------------------------------------------
def sibling(name: str):
    """A benchmark script of this folder, imported by file (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROW = re.compile(r"^\s+(?P<name>\S.*?)\s+(?P<tokens>[\d,]+) tokens/s\s+(?P<cells>[\d.,]+) "
                 r"cells/s\s+(?P<seconds>[\d.]+) s$")


def parse_forward(text: str) -> dict:
    """model_forward.run's printout -> tokens/s of sclcm, the padded and sorted peers."""
    out: dict = {}
    for line in text.splitlines():
        if m := ROW.match(line):
            name = m["name"]
            key = ("sclcm" if name.startswith("sclcm") else
                   "peer_sorted" if "sorted" in name else "peer")
            out[key] = {"label": name, "tokens_per_s": float(m["tokens"].replace(",", "")),
                        "cells_per_s": float(m["cells"].replace(",", "")),
                        "seconds": float(m["seconds"])}
        elif m := re.search(r"difference\| sclcm vs [^:]+: (\S+)", line):
            out["max_abs_diff"] = float(m[1])
        elif m := re.search(r"^\s+(\d+) cells, (\d+) tokens", line):
            out["cells"], out["tokens"] = int(m[1]), int(m[2])
    if "sclcm" in out and "peer" in out:
        out["ratio"] = out["sclcm"]["tokens_per_s"] / out["peer"]["tokens_per_s"]
    return out


def forward_child(argv: list[str]) -> None:
    """Run model_forward's comparisons with one attention backend; write JSON per shape.

    The Geneformer shapes (small, base) against transformers' padded ``BertModel``, and
    scGPT's against torch's padded ``nn.TransformerEncoder`` where model_forward has it.
    """
    p = argparse.ArgumentParser(prog="gpu.py _forward")
    p.add_argument("--variant", choices=("flash", "sdpa", "torch_varlen"), required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cells-small", type=int, default=1024)
    p.add_argument("--cells-base", type=int, default=512)
    p.add_argument("--cells-scgpt", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (dry run)")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    import sclcm.models._attention as attention

    if args.variant == "sdpa":
        # 'auto' picks flash where flash-attn imports; without it, auto is sdpa, and
        # model_forward (which reads this name at import) labels its row so
        attention.flash_attn_varlen_func = None
    elif args.variant == "flash" and attention.flash_attn_varlen_func is None:
        raise SystemExit("flash-attn does not import here.")
    forward = sibling("model_forward")
    scgpt = hasattr(forward, "run_scgpt")
    if args.tiny:
        forward.SHAPES.update(small=TINY_SHAPE, base=TINY_SHAPE)
        if scgpt:
            forward.SCGPT = (*TINY_SHAPE[:4], 1200)
    if args.variant == "torch_varlen":
        from sclcm.models import register_attention

        register_attention("torch_varlen", sibling("pretrain").torch_varlen_attention)
        resolve = attention.resolve_backend

        def forced(name, q_thd, packing):
            # ModelConfig admits only built-in names, so 'auto' stands for torch's kernel
            # here, wherever no mask is needed (varlen_attn has none)
            if name == "auto" and packing.query is None:
                return "torch_varlen"
            return resolve(name, q_thd, packing)

        attention.resolve_backend = forced
    import anndata as ad
    import numpy as np
    import torch

    import sclcm
    from sclcm.genes import GeneVocab, resolve
    from sclcm.tokenizers import GeneformerTokenizer

    sclcm.settings.verbosity, sclcm.settings.progress = "warning", False
    adata = ad.read_h5ad(Path(os.environ["SCLCM_DATA"]) / PBMC3K)
    report = resolve(adata, count_coverage=False)
    vocab = GeneVocab.from_report(report)
    medians = GeneformerTokenizer(vocab).fit(adata, report=report).medians
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {"variant": args.variant, "device": device.type,
           "dtype": str(dtype).removeprefix("torch."), "shapes": {}}
    shapes = [("small", args.cells_small), ("base", args.cells_base)]
    for shape, n in shapes + ([("scgpt", args.cells_scgpt)] if scgpt else []):
        text = io.StringIO()
        kw = {"batch_size": args.batch_size, "device": device, "dtype": dtype,
              "rng": np.random.default_rng(0)}
        try:
            with contextlib.redirect_stdout(text):
                if shape == "scgpt":
                    forward.run_scgpt(n, adata, **kw)
                else:
                    forward.run(shape, n, (vocab, medians, adata, report), **kw)
            figures = parse_forward(text.getvalue())
        except Exception as e:  # the other shapes still run
            traceback.print_exc()
            figures = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(text.getvalue(), flush=True)
        figures["shape"] = list(forward.SCGPT if shape == "scgpt" else forward.SHAPES[shape])
        if device.type == "cuda":
            figures["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        out["shapes"][shape] = figures
        args.json.write_text(json.dumps(out, indent=1))  # kept if the next shape times out
    if any("error" in f for f in out["shapes"].values()):
        raise SystemExit("a shape failed: " + "; ".join(
            f"{s}: {f['error']}" for s, f in out["shapes"].items() if "error" in f))


# --- the steps -------------------------------------------------------------------------
def gpu_test_files() -> list[str]:
    """The test files that mark GPU cases."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def junit_counts(path: Path) -> dict:
    """Passed, failed, skipped and the failing tests' names from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    if not path.exists():
        return counts
    for case in ET.parse(path).iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            counts["failures"].append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


@dataclass
class Step:
    """One child process of the run."""

    step: str  # the cap it runs under (a key of CAPS)
    title: str
    command: list[str]
    json: Path | None = None
    env: dict = field(default_factory=dict)
    retry: list[str] | None = None  # arguments added for a second try after a failure


def steps(args, env_info: dict, tmp: Path) -> list[Step]:
    """The children to run, in order; on CPU (``--dry-run``) with tiny sizes."""
    py, dry = sys.executable, args.dry_run
    dev = "cpu" if dry else "cuda"
    out = [Step("tests", "pytest -m gpu", [
        py, "-m", "pytest", "-m", "gpu", *gpu_test_files(), "-q", "-p", "no:cacheprovider",
        f"--junitxml={tmp / 'junit.xml'}"])]
    if dry:
        variants = ["sdpa"]
    else:
        variants = (["flash"] if env_info.get("flash_attn") else []) + ["sdpa"] + (
            ["torch_varlen"] if env_info.get("torch_varlen") else [])
    size = (["--tiny", "--cells-small", "4", "--cells-base", "2", "--cells-scgpt", "2",
             "--batch-size", "2"] if dry else
            ["--cells-small", "1024", "--cells-base", "512", "--cells-scgpt", "512",
             "--batch-size", "64"])
    for v in variants:
        out.append(Step("forward", f"forward ({v})", [
            py, str(HERE / "gpu.py"), "_forward", "--variant", v, "--device", dev, *size,
            "--json", str(tmp / f"forward_{v}.json")], tmp / f"forward_{v}.json"))
    size = (["--cells", "3", "--max-len", "12", "--ref-copies", "10", "--repeats", "1"]
            if dry else ["--cells", "200", "--max-len", "64", "--ref-copies", "600",
                         "--repeats", "2"])
    out.append(Step("perturb", "perturb_speed", [
        py, str(HERE / "perturb_speed.py"), "--device", dev, *size,
        "--json", str(tmp / "perturb.json")], tmp / "perturb.json"))
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in env_info.get("device", "")), 989.0)
    size = (["--size", "tiny", "--train-cells", "12", "--max-tokens", "4096",
             "--stream-files", STREAM_FILE] if dry else
            ["--train-cells", "2048", "--max-tokens", "32768",
             "--stream-files", PBMC3K, STREAM_FILE])
    # torch's varlen kernel (the default without flash-attn) is the newest part of this
    # path: should it fail, measure with SDPA rather than not at all
    varlen = not dry and not env_info.get("flash_attn") and env_info.get("torch_varlen")
    out.append(Step("pretrain", "pretrain", [
        py, str(HERE / "pretrain.py"), "--device", dev, "--data", str(args.data),
        "--peak-tflops", str(peak), *size, "--json", str(tmp / "pretrain.json")],
        tmp / "pretrain.json", retry=["--backend", "sdpa"] if varlen else None))
    size = (["--preset", "geneformer", "--size", "tiny", "--max-len", "32", "--copies", "2",
             "--subset", "300"] if dry else ["--copies", "20", "--subset", "5000"])
    out.append(Step("embed", "embed_scale", [
        py, str(HERE / "embed_scale.py"), "--data", str(args.data), *size,
        "--tmpdir", str(tmp), "--json", str(tmp / "embed.json")], tmp / "embed.json",
        {"SCLCM_DEVICE": dev}))
    return out


# --- the summary -----------------------------------------------------------------------
def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return ""
    return (f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}") + (f" {unit}" if unit else "")


def status_cell(res: Result) -> str:
    if res.status == "ok":
        return f"ok ({res.seconds:.0f} s)"
    if res.status == "skipped":
        return f"skipped: {res.error}"
    what = "TIMED OUT" if res.status == "timed out" else f"FAILED (rc {res.rc})"
    return f"{what} after {res.seconds:.0f} s: {res.error}"


def rows_for(step: str, title: str, res: Result) -> list[list[str]]:
    """Summary rows ``[benchmark, sclcm, reference, ratio, notes, status]`` of one step."""
    f, status = res.figures or {}, status_cell(res)
    if step == "tests":
        c = f
        text = f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, " \
               f"{c.get('skipped', 0)} skipped"
        return [[title, text, "", "", ", ".join(c.get("failures", []))[:200], status]]
    if step == "forward":
        rows = []
        shapes = f.get("shapes") or {"small": None, "base": None}
        for shape, s in shapes.items():
            if not s:
                rows.append([f"{title}, {shape}", "", "", "", "", status])
                continue
            ours, peer = s.get("sclcm", {}), s.get("peer", {})
            dims = "x".join(map(str, s["shape"][:2]))
            note = (f"{s.get('cells', '?')} cells, {s.get('tokens', '?')} tokens, "
                    f"{f.get('dtype')}; max abs diff {fmt(s.get('max_abs_diff'))}")
            if "gpu_peak_mib" in s:
                note += f"; peak GPU {fmt(s['gpu_peak_mib'], 'MiB')}"
            rows.append([f"{title}, {shape} ({dims})",
                         fmt(ours.get("tokens_per_s"), "tokens/s"),
                         f"{peer['label']}: " + fmt(peer["tokens_per_s"], "tokens/s")
                         if peer else "",
                         f"{s['ratio']:.2f}x" if "ratio" in s else "",
                         s.get("error", note), status])
        return rows
    if step == "perturb":
        if not f:
            return [[title, "", "", "", "", status]]
        ref = next((r for r in f["references"] if r["transformers"]), f["references"][0])
        rows = []
        for precision, rate in f["sclcm"].items():
            # packing alone: against sclcm's own encoder, one copy per pass, same precision
            own = next((r for r in f["references"] if not r["transformers"]
                        and r["precision"] == precision), None)
            note = (f"{f['copies']:,} copies of {f['cells']} cells cut to {f['max_len']} "
                    "tokens" + (f"; packing alone: {rate / own['copies_per_s']:.1f}x"
                                if own else ""))
            rows.append([f"{title} ({f['device']}), tl.perturb {precision}",
                         fmt(rate, "copies/s"),
                         f"one copy per pass, {ref['name']}: "
                         + fmt(ref["copies_per_s"], "copies/s"),
                         f"{rate / ref['copies_per_s']:.1f}x", note, status])
        return rows
    if step == "pretrain":
        t = f.get("training")
        if not t:
            return [[title, "", "", "", "", status]]
        (pname, packed), (_, padded) = list(t["variants"].items())[:2]
        mfu = (f"MFU {packed['mfu']:.1%} of {t['peak_tflops']:g} TFLOP/s"
               if packed.get("mfu") is not None else "MFU: CUDA only")
        rows = [[f"{title}: geneformer {t['size']} ({t['device']} {t['dtype']}), {pname}",
                 f"{fmt(packed['tokens_per_s'], 'tokens/s')}, "
                 f"{fmt(packed['cells_per_s'], 'cells/s')}",
                 "padded: " + fmt(padded["tokens_per_s"], "tokens/s"),
                 f"{t['packed_over_padded']:.2f}x", mfu, status]]
        for name, ratio in f.get("stream_over_training", {}).items():
            rate = f["streams"][name].get("tokenized_epoch1")
            rows.append([f"{title}: loader, {name} + tokenizer", fmt(rate, "cells/s"),
                         "training consumes " + fmt(rate / ratio, "cells/s"),
                         f"{ratio:,.0f}x", "stream cells/s over training cells/s (>= 5 "
                         "keeps up)", status])
        return rows
    if step == "embed":
        if not f:
            return [[title, "", "", "", "", status]]
        b, m = f["rows"]["backed"], f["rows"]["in memory"]
        gpu = (f"; peak GPU {fmt(b['gpu_peak_mib'], 'MiB')}"
               if b.get("gpu_peak_mib") is not None else "")
        return [[f"{title} ({b['device']}), backed .h5ad", fmt(b["cells"] / b["seconds"],
                                                                "cells/s"),
                 f"in memory ({m['cells']:,} cells): " + fmt(m["cells"] / m["seconds"],
                                                            "cells/s"),
                 f"{(b['cells'] / b['seconds']) / (m['cells'] / m['seconds']):.2f}x",
                 f"{b['cells']:,} cells; peak RSS {fmt(b['peak'], 'MiB')}{gpu}", status]]
    return [[title, "", "", "", "", status]]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_line(info: dict, *, dry: bool) -> str:
    if "error" in info:
        return f"environment probe failed: {info['error']}"
    gpu = (f"{info['device']} (sm {info['capability']}, {info['gpu_memory_gib']:.0f} GiB, "
           f"CUDA {info['cuda_version']})" if info.get("cuda") else "no CUDA device")
    flash = (f"flash-attn {info['flash_attn']}" if info.get("flash_attn")
             else "flash-attn not installed, SDPA used")
    varlen = "; torch varlen_attn available" if info.get("torch_varlen") else ""
    broken = "".join(f"; {m} does not import: {e}"
                     for m, e in info.get("import_errors", {}).items())
    mode = "DRY RUN on CPU, tiny shapes (figures mean nothing); " if dry else ""
    return (f"{mode}{gpu}; torch {info.get('torch')}, Python {info.get('python')}; {flash}"
            f"{varlen}{broken}")


# --- preparing the carried folder (on a machine with pip's index) -----------------------
#: Distributions of the GPU image (KINDS.md, read 2026-11-17) that sclcm's benchmarks use
#: as they are; everything else they import is carried.
_IMAGE = (
    "absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs "
    "botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy "
    "coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython "
    "diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic "
    "frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize "
    "hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin "
    "jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities "
    "linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl "
    "meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind "
    "narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir "
    "onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix "
    "orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker "
    "prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments "
    "pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock "
    "pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich "
    "sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn "
    "sentencepiece sentence-transformers setuptools shellingham simplejson six "
    "sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server "
    "tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio "
    "torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton "
    "typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt "
    "xarray xxhash yarl zipp")
IMAGE = frozenset(_IMAGE.split())
#: What the benchmarks import beyond the image, and image packages carried anyway: the
#: image's pandas is 3.x (it lacks pytz, which pandas 2 needs), and anndata and tiledbsoma
#: need pandas < 3; s3fs pins its fsspec.
ROOTS = ("anndata", "tiledbsoma-ml", "cellxgene-census", "pandas", "fsspec")
#: Declared by tiledbsoma but imported only by its ingestion helpers, which nothing here runs.
SKIP = {"scanpy", "umap-learn", "pynndescent"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def carried_distributions() -> dict[str, str]:
    """``{name: version}`` to carry: the installed dependency closure of :data:`ROOTS`,
    without what the image has (except the roots) and :data:`SKIP`."""
    import importlib.metadata as md

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
           "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
    found, todo = {}, list(ROOTS)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found or name in SKIP:
            continue
        found[name] = md.version(name)
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return {n: v for n, v in sorted(found.items()) if n in ROOTS or n not in IMAGE}


def prepare(target: Path) -> None:
    """Fill ``target`` with the wheels (packed) and the data that the GPU run needs."""
    target.mkdir(parents=True, exist_ok=True)
    dists = carried_distributions()
    print(f"carrying {len(dists)} distributions: "
          + ", ".join(f"{n}=={v}" for n, v in dists.items()))
    pip = [sys.executable, "-m", "pip"]
    tags = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *[x for p in PLATFORMS for x in ("--platform", p)]]
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        subprocess.run([*pip, "download", "-q", "--no-deps", *tags, "-d", str(wheels),
                        *(f"{n}=={v}" for n, v in dists.items())], check=True)
        subprocess.run([*pip, "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *tags, *map(str, sorted(wheels.glob("*.whl")))],
                       check=True)
        # test suites and console scripts are never imported: leaving them out keeps the
        # archive, the working tree and the data within the 64 MiB that a call carries
        for junk in [*site.glob("*/tests"), site / "bin"]:
            shutil.rmtree(junk, ignore_errors=True)
        archive = target / "site-cp312-x86_64.tar.xz"
        if shutil.which("xz"):
            tar = subprocess.Popen(["tar", "-cf", "-", "-C", str(site), "."],
                                   stdout=subprocess.PIPE)
            with archive.open("wb") as fh:
                subprocess.run(["xz", "-9e", "-T0"], stdin=tar.stdout, stdout=fh, check=True)
            tar.wait()
        else:
            with tarfile.open(archive, "w:xz", preset=9) as t:
                t.add(site, arcname=".")
    data = target / "data"
    data.mkdir(exist_ok=True)
    source = Path(os.environ.get("SCLCM_DATA", ROOT.parent / "shared" / "data"))
    for name in (PBMC3K, STREAM_FILE):
        shutil.copyfile(source / name, data / name)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"{target}: {size / 2**20:.1f} MiB ({archive.name} "
          f"{archive.stat().st_size / 2**20:.1f} MiB, data {len(list(data.iterdir()))} files)")


# --- main ------------------------------------------------------------------------------
def main() -> None:
    if sys.argv[1:2] == ["_forward"]:
        forward_child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=os.environ.get("OUT"),
                   help="output folder (default $OUT)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same path on CPU with tiny shapes and a few steps")
    p.add_argument("--wheels", type=Path, help="folder of *.whl / site-*.tar.xz to install "
                   "offline before anything runs")
    p.add_argument("--data", type=Path, default=Path(os.environ.get(
        "SCLCM_DATA", ROOT.parent / "shared" / "data")),
        help="folder with the shared .h5ad (default $SCLCM_DATA)")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds for everything (default 480)")
    p.add_argument("--only", nargs="+", choices=list(CAPS)[1:], help="run only these steps")
    p.add_argument("--cap", action="append", default=[], metavar="STEP=SECONDS",
                   help="change one step's cap (forward: per backend)")
    p.add_argument("--prepare", type=Path, metavar="DIR",
                   help="download and pack what to carry to the GPU machine into DIR; exit")
    args = p.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    if args.out is None:
        p.error("--out is required where $OUT is not set")
    deadline = time.monotonic() + args.budget
    caps = dict(DRY_CAPS if args.dry_run else CAPS)
    for item in args.cap:
        name, _, seconds = item.partition("=")
        caps[name] = float(seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    log.write_text("")
    args.data = args.data.resolve()
    results: dict = {"dry_run": args.dry_run, "budget_s": args.budget, "steps": []}
    rows: list[list[str]] = []
    started = time.monotonic()

    def left(step: str) -> float:
        return min(caps[step], deadline - time.monotonic())

    with tempfile.TemporaryDirectory(prefix="sclcm_gpu_") as tmp_name:
        tmp = Path(tmp_name)
        site = tmp / "site"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SCLCM_PROGRESS": "0",
               "SCLCM_DATA": str(args.data),
               "PYTHONPATH": os.pathsep.join(
                   [str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               "TOKENIZERS_PARALLELISM": "false"}
        setup_start = time.monotonic()
        if args.wheels:
            res = install(args.wheels.resolve(), site, log, left("setup"))
            print(f"[setup] install from {args.wheels}: {status_cell(res)}", flush=True)
            results["install"] = res.__dict__
            if res.status != "ok":
                rows.append(["install " + str(args.wheels), "", "", "", "", status_cell(res)])
        info = probe(env, log, max(5.0, left("setup") - (time.monotonic() - setup_start)))
        results["environment"] = info
        print("[setup] " + environment_line(info, dry=args.dry_run), flush=True)
        if not args.dry_run and not info.get("cuda"):
            rows.append(["CUDA", "", "", "", "no CUDA device: the GPU steps will fail; "
                         "use --dry-run on a CPU", "FAILED"])
        for s in steps(args, info, tmp):
            if args.only and s.step not in args.only:
                continue
            res = run_child(s.command, cap=left(s.step), env={**env, **s.env}, log=log,
                            title=s.title, json_path=s.json)
            if s.retry and res.status == "failed":
                first = res
                res = run_child([*s.command, *s.retry], cap=left(s.step) - first.seconds,
                                env={**env, **s.env}, log=log,
                                title=f"{s.title} {' '.join(s.retry)}", json_path=s.json)
                res.error = "; ".join(filter(None, [
                    res.error, f"first try failed ({first.error}); retried with "
                    f"{' '.join(s.retry)}"]))
                res.seconds += first.seconds
            if s.step == "tests":
                res.figures = junit_counts(tmp / "junit.xml")
                if res.status == "failed" and not res.figures["failed"]:
                    res.error = res.error or "pytest failed before running tests"
            print(f"[{s.step}] {s.title}: {status_cell(res)}", flush=True)
            results["steps"].append({"step": s.step, "title": s.title, **res.__dict__})
            rows.extend(rows_for(s.step, s.title, res))
    results["wall_s"] = time.monotonic() - started
    header = ["benchmark", "sclcm", "reference", "ratio", "notes", "status"]
    table = markdown(header, rows)
    env_line = environment_line(info, dry=args.dry_run)
    if results.get("install", {}).get("status") == "ok":
        names = results["install"]["figures"]["installed"]
        env_line += f"; installed from {args.wheels}: {len(names)} packages"
    summary = (f"# sclcm GPU run\n\n{env_line}\n\n{table}\n\nwall time {results['wall_s']:.0f} s "
               f"of a {args.budget:.0f} s budget; raw figures in results.json, output of each "
               "step in log.txt\n")
    results["rows"] = [dict(zip(header, r, strict=True)) for r in rows]
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "summary.md").write_text(summary)
    print("\n" + summary, flush=True)


if __name__ == "__main__":
    main()
