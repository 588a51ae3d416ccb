"""benchmarks/gpu.py: the one-call GPU run keeps working on CPU (``--dry-run``), installs
carried wheels offline, and turns a failing or overrunning benchmark into a row."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from conftest import DATA, PBMC3K

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
#: Every row the dry run must write: (start of the benchmark column, figures expected).
ROWS = ["pytest -m gpu", "forward (sdpa), small", "forward (sdpa), base",
        "perturb_speed (cpu), tl.perturb float32",
        "pretrain: geneformer tiny (cpu float32), packed",
        "pretrain: loader, CensusStream", "pretrain: loader, AnnDataStream",
        "embed_scale (cpu), backed .h5ad"]


def _gpu_module():
    """benchmarks/gpu.py imported by file (it edits sys.path on import: undone here)."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def _run(*args: str, timeout: float = 170) -> subprocess.CompletedProcess:
    if not (DATA / f"{PBMC3K}.h5ad").exists():
        pytest.skip(f"real dataset {PBMC3K} not found in {DATA}: set SCLCM_DATA")
    # one thread per child: on a busy machine OpenMP's spinning threads slow tiny models
    env = {**os.environ, "SCLCM_DATA": str(DATA), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def _carried(folder: Path) -> Path:
    """A wheel and a site archive as --prepare makes them, each of one tiny package."""
    folder.mkdir()
    dist = "sclcm_gpu_dummy-0.1.dist-info"
    with zipfile.ZipFile(folder / "sclcm_gpu_dummy-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("sclcm_gpu_dummy/__init__.py", "")
        whl.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: sclcm-gpu-dummy\n"
                     "Version: 0.1\n")
        whl.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                     "Root-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist}/RECORD", "")
    package = folder / "src" / "sclcm_gpu_packed-0.1.dist-info"
    package.mkdir(parents=True)
    (package / "METADATA").write_text("Name: sclcm-gpu-packed\nVersion: 0.1\n")
    with tarfile.open(folder / "site-test.tar.xz", "w:xz") as tar:
        tar.add(folder / "src", arcname=".")
    return folder


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    wheels = _carried(tmp / "wheels")
    start = time.perf_counter()
    res = _run("--dry-run", "--out", str(tmp / "out"), "--wheels", str(wheels))
    assert res.returncode == 0, res.stdout + res.stderr
    return res, tmp / "out", time.perf_counter() - start


@pytest.mark.slow
def test_dry_run_writes_every_row(dry_run):
    res, out, seconds = dry_run
    summary = (out / "summary.md").read_text()
    assert res.stdout.rstrip().endswith(summary.rstrip())  # the table is printed last
    assert "DRY RUN" in summary
    assert "flash-attn not installed, SDPA used" in summary or "flash-attn " in summary
    lines = [ln for ln in summary.splitlines() if ln.startswith("| ")][1:]
    for start in ROWS:
        row = [ln for ln in lines if ln.startswith(f"| {start}")]
        assert len(row) == 1, (start, summary)
        cells = [c.strip() for c in row[0].strip("|").split(" | ")]
        assert cells[-1].startswith("ok ("), row
        assert cells[1], row  # a figure
        if start != "pytest -m gpu":
            assert cells[3].endswith("x"), row  # a ratio
    assert seconds < 150


@pytest.mark.slow
def test_dry_run_json_holds_the_figures(dry_run):
    _, out, _ = dry_run
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True
    assert results["environment"]["torch"]
    assert set(results["install"]["figures"]["installed"]) == {"sclcm_gpu_dummy-0.1",
                                                               "sclcm_gpu_packed-0.1"}
    steps = {s["title"]: s for s in results["steps"]}
    assert {s["status"] for s in steps.values()} == {"ok"}
    assert steps["pytest -m gpu"]["figures"]["failed"] == 0
    forward = steps["forward (sdpa)"]["figures"]["shapes"]
    assert {"small", "base"} <= set(forward)
    for shape in forward:
        assert forward[shape]["sclcm"]["tokens_per_s"] > 0
        assert forward[shape]["ratio"] > 0
        assert forward[shape]["max_abs_diff"] < 1e-3  # the same weights on both sides
    perturb = steps["perturb_speed"]["figures"]
    assert perturb["sclcm"]["float32"] > 0
    assert any(r["transformers"] for r in perturb["references"])
    pretrain = steps["pretrain"]["figures"]
    assert len(pretrain["training"]["variants"]) == 2
    assert set(pretrain["stream_over_training"]) == set(pretrain["streams"])
    embed = steps["embed_scale"]["figures"]["rows"]
    assert embed["backed"]["cells"] == 5400
    assert embed["backed"]["nan_rows"] == 0
    # a bf16 row where the CPU computes bf16 natively; scGPT's shape where model_forward has it
    assert len(results["rows"]) == (len(ROWS) + ("bfloat16" in perturb["sclcm"])
                                    + ("scgpt" in forward))
    assert (out / "log.txt").stat().st_size > 0


@pytest.mark.slow
def test_failing_benchmark_is_a_row_and_the_rest_runs(tmp_path):
    empty = tmp_path / "no_data"
    empty.mkdir()
    res = _run("--dry-run", "--out", str(tmp_path / "out"), "--data", str(empty),
               "--only", "forward", "perturb")
    assert res.returncode == 0, res.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [s["status"] for s in results["steps"]] == ["failed", "failed"]
    assert all(s["error"] for s in results["steps"])
    assert all(r["status"].startswith("FAILED") for r in results["rows"])
    assert "FAILED" in (tmp_path / "out" / "summary.md").read_text()


def test_overrunning_child_is_killed_with_its_children(tmp_path):
    gpu = _gpu_module()
    marker = tmp_path / "grandchild_alive"
    # the child starts a grandchild that would write the marker after 8 s
    grandchild = "import sys, time; time.sleep(8); open(sys.argv[1], 'w')"
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            f"{grandchild!r}, sys.argv[1]]); time.sleep(60)")
    start = time.perf_counter()
    res = gpu.run_child([sys.executable, "-c", code, str(marker)], cap=5,
                        env=dict(os.environ), log=tmp_path / "log.txt", title="sleeper")
    assert res.status == "timed out"
    assert time.perf_counter() - start < 15
    assert gpu.status_cell(res).startswith("TIMED OUT")
    time.sleep(4)
    assert not marker.exists()


def test_forward_printout_is_parsed():
    gpu = _gpu_module()
    text = """
[small] 6 layers x 256 hidden, 4 heads, 10.6M parameters | cuda bfloat16
  1024 cells, 912345 tokens (length 301..3000, mean 891); batches of 64 cells; padding
  max |cell embedding difference| sclcm vs transformers: 1.25e-02
  sclcm, packed (flash-attn varlen)              2,345,678 tokens/s 2630.12 cells/s    0.39 s
  transformers BertModel, padded (sdpa)            987,654 tokens/s 1107.40 cells/s    0.92 s
  transformers, padded, cells sorted by length   1,234,567 tokens/s 1384.25 cells/s    0.74 s
  sclcm speed-up: 2.37x vs the padded peer, 1.90x vs the length-sorted peer
"""
    out = gpu.parse_forward(text)
    assert out["sclcm"]["tokens_per_s"] == 2_345_678
    assert out["peer"]["tokens_per_s"] == 987_654
    assert out["peer_sorted"]["cells_per_s"] == pytest.approx(1384.25)
    assert out["ratio"] == pytest.approx(2_345_678 / 987_654)
    assert out["max_abs_diff"] == pytest.approx(1.25e-2)
    assert (out["cells"], out["tokens"]) == (1024, 912_345)


def test_unknown_model_forward_output_gives_no_ratio():
    assert "ratio" not in _gpu_module().parse_forward("nothing to see\n")
