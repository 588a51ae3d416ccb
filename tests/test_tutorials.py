"""The documentation site builds, and every tutorial runs in it from start to end on the real
data, with its figures on its page.

The site is built once (``sphinx-build -n -W``, as ``make docs``): myst-nb executes each
``tutorials/*.py`` during the build, so a failing cell, a broken cross-reference or a
docstring that does not render fails the build, and with it every test here. The tutorials
are not run a second time: the tests read what the build executed and wrote.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CHAI_MOUSE, DATA, PBMC3K, data_path

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built with the tutorials executed: (html folder, figures folder)."""
    data_path(PBMC3K), data_path(CHAI_MOUSE)  # skip cleanly without the data
    tmp = tmp_path_factory.mktemp("site")
    out, figures = tmp / "html", tmp / "tutorial_output"
    env = {**os.environ, "SCLCM_DATA": str(DATA), "TUTORIAL_OUT": str(figures),
           "SCLCM_PROGRESS": "0", "SCLCM_DOCS_EXECUTE": "force"}
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-n", "-W",
                          "--keep-going", "-j", "2", str(ROOT / "docs"), str(out)],
                         capture_output=True, text=True, env=env, cwd=tmp)
    # the build time and each tutorial's (myst-nb's log), for the CI log (pytest -s)
    print(f"\nsite built in {time.perf_counter() - start:.0f} s, tutorials included:")
    for name, seconds in re.findall(r"tutorials/(\w+)\.py: Executed notebook in ([\d.]+) s",
                                    res.stdout + res.stderr):
        print(f"  {name}: {float(seconds):.0f} s")
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    return out, figures


def _executed(site_dir: Path, stem: str) -> dict:
    path = site_dir.parent / "jupyter_execute" / "tutorials" / f"{stem}.ipynb"
    assert path.is_file(), f"{stem} was not executed in the build"
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_ran_and_shows_its_figures(site, path):
    out, figures = site
    nb = _executed(out, path.stem)
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    text = "".join("".join(o["text"]) for o in outputs if o["output_type"] == "stream"
                   and o["name"] == "stdout")
    # it says what it wrote, and wrote it: PNG files in TUTORIAL_OUT
    written = re.findall(r"(\S+\.png)", text.split("wrote", 1)[-1]) if "wrote" in text else []
    assert written, f"{path.stem} did not print 'wrote <figure>.png'"
    for name in written:
        png = Path(name.rstrip(",")) if Path(name.rstrip(",")).is_absolute() \
            else figures / Path(name.rstrip(",")).name
        assert png.is_file(), png
        assert png.stat().st_size > 1000, png
        assert png.parent == figures
    # the figures are on the page: drawn inline (not only saved), as images in the HTML
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.stem} drew no figure into the notebook (a non-inline backend?)"
    page = (out / "tutorials" / f"{path.stem}.html").read_text()
    assert page.count("<img") >= len(images)


def test_api_pages_have_signatures_and_parameter_tables(site):
    out, _ = site
    page = (out / "generated" / "sclcm.tl.embed.html").read_text()
    assert 'class="sig-name descname"' in page
    assert "key_added" in page
    assert re.search(r"Parameters.*?adata", page, flags=re.DOTALL)
    assert 'href="generated/sclcm.tl.embed.html"' in (out / "api.html").read_text()
    # a class page lists its documented methods
    model = (out / "generated" / "sclcm.models.CellModel.html").read_text()
    assert 'id="sclcm.models.CellModel.embed"' in model


def test_every_tutorial_is_in_the_site(site):
    out, _ = site
    index = (out / "tutorials.html").read_text()
    for path in TUTORIALS:
        assert f'href="tutorials/{path.stem}.html"' in index, path.stem
