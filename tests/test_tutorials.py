"""The tutorials run from start to end on the real data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHAI_MOUSE, DATA, PBMC3K, data_path

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path):
    data_path(PBMC3K), data_path(CHAI_MOUSE)  # skip cleanly without the data
    env = {**os.environ, "SCLCM_DATA": str(DATA), "TUTORIAL_OUT": str(tmp_path),
           "SCLCM_PROGRESS": "0", "MPLBACKEND": "Agg"}
    res = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "wrote" in res.stdout
    assert list(tmp_path.glob("*.png"))
