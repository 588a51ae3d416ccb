"""The sclcm command line: the genes report and the demo on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
from conftest import CHAI_MOUSE, KANG_IFNB, data_path

from sclcm.cli import main


def test_genes_command(tmp_path, capsys):
    out = tmp_path / "genes.json"
    main(["genes", str(data_path(CHAI_MOUSE)), "--to-species", "human", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "chai_baron_mouse1_822.h5ad" in printed
    summary = json.loads(out.read_text())["chai_baron_mouse1_822.h5ad"]
    assert summary["source_species"] == "mus_musculus"
    assert 0.75 < summary["ortholog_coverage"] <= 1


def test_demo(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in (CHAI_MOUSE, KANG_IFNB):
        (data / f"{name}.h5ad").symlink_to(data_path(name))
    out = tmp_path / "out"
    env = {**os.environ, "SCLCM_PROGRESS": "0"}
    res = subprocess.run([sys.executable, "-m", "sclcm", "demo", "--data", str(data), "--out",
                          str(out)], capture_output=True, text=True, env=env, check=True)
    assert "What this did" in res.stdout
    table = pd.read_csv(out / "gene_coverage.csv", index_col=0)
    assert len(table) == 2
    assert (table["count_coverage"] >= 0.97).all()
    assert table.loc[f"{CHAI_MOUSE}.h5ad", "species"] == "mus_musculus"
    assert (out / "gene_coverage.png").stat().st_size > 10_000
    assert json.loads((out / "vocab.json").read_text())["species"] == "homo_sapiens"
    tokens = pd.read_csv(out / "tokenization.csv")
    assert set(tokens["family"]) == {"geneformer", "scgpt", "scbert", "scfoundation"}
    assert len(tokens) == 8
    assert (tokens["cells"] > 0).all()
    assert "streamed a tokenized epoch" in res.stdout
    assert (out / "census").is_dir()


def test_demo_without_data(tmp_path):
    res = subprocess.run([sys.executable, "-m", "sclcm", "demo", "--data", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "set SCLCM_DATA" in res.stderr
