"""Real-data inputs shared by the data tests, built once per session (no tests here).

The local Census holds three small real datasets: two human (Kang 2018 IFN-beta PBMC,
Baron 2016 pancreas; 1,556 + 328 = 1,884 cells, an even number, so two ranks read all of
them) and the first 300 cells of a mouse one (Baron 2016 mouse1), given in memory.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

from conftest import CHAI_MOUSE, CIDER, KANG_IFNB, _load, data_path

from sclcm.data import write_local_census

CENSUS_SOURCES = (KANG_IFNB, CIDER, CHAI_MOUSE)
N_HUMAN = 1556 + 328
N_MOUSE = 300


@cache
def _census_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="sclcm_test_census_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@cache
def local_census() -> str:
    """URI of a local Census of :data:`CENSUS_SOURCES` (written once; do not modify)."""
    return write_local_census([data_path(KANG_IFNB), data_path(CIDER), mouse_cells()],
                              _census_dir() / "census", names=CENSUS_SOURCES)


@cache
def mouse_cells():
    """The mouse dataset's first cells (shared: do not modify)."""
    return _load(CHAI_MOUSE)[:N_MOUSE].copy()


def scratch(name: str) -> Path:
    """A fresh folder under the session's temporary directory."""
    path = _census_dir() / name
    path.mkdir()
    return path
