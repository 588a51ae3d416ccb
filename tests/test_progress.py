"""Progress bars: counted in cells, and silent where they cannot be redrawn (logs, CI)."""

from __future__ import annotations

import io
import sys

import pytest
from conftest import PBMC3K, _load
from test_tl_embed import tiny_model
from test_tl_perturb import _gene_names, family, pbmc
from tqdm.std import tqdm

import sclcm
from sclcm import _progress

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _TTY(io.StringIO):
    """A stream that says it is a terminal, as a console's stderr does."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def bars(monkeypatch):
    """The tqdm bars that sclcm opens, in order (as they were when closed)."""
    made = []

    class Recorder(tqdm):
        def close(self):
            if not getattr(self, "_recorded", False):
                self._recorded = True
                # a disabled bar keeps only some attributes
                made.append({k: getattr(self, k, None) for k in (
                    "desc", "total", "n", "unit", "leave", "pos", "disable")})
            super().close()

    monkeypatch.setattr(_progress, "tqdm", Recorder)
    sclcm.settings.progress = True  # the test session turns them off
    return made


def test_helper_counts_sizes_and_lengths(bars, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _TTY())
    assert list(_progress.progress([1, 2, 3], desc="items")) == [1, 2, 3]
    blocks = [(0, None, [0] * 5), (5, None, [0] * 2)]
    assert len(list(_progress.progress(blocks, total=7, unit="cells",
                                       size=lambda item: len(item[2])))) == 2
    assert [(b["total"], b["n"], b["unit"]) for b in bars] == [(3, 3, "it"), (7, 7, "cells")]
    sclcm.settings.progress = False
    assert list(_progress.progress(range(2))) == [0, 1]
    assert bars[-1]["disable"]


def test_embed_bar_counts_cells_not_blocks(bars, monkeypatch):
    """1,500 cells fit in one 2,048-cell block: a bar of blocks sat at 0/1 all run."""
    monkeypatch.setattr(sys, "stderr", _TTY())
    adata = _load(PBMC3K)[:1500].copy()
    sclcm.tl.embed(adata, tiny_model("scbert"))
    (bar,) = [b for b in bars if b["desc"] == "embedding"]
    assert (bar["total"], bar["n"], bar["unit"]) == (1500, 1500, "cells")
    assert not bar["disable"]


def test_tokenize_and_median_bars_count_cells(bars, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _TTY())
    adata = _load(PBMC3K)[:1500].copy()
    vocab = sclcm.genes.GeneVocab.from_reference("human")
    tok = sclcm.tokenizers.GeneformerTokenizer(vocab).fit(adata)
    sclcm.pp.tokenize(adata, tok)
    by_desc = {bar["desc"]: bar for bar in bars}
    for desc in ("gene medians", "tokenizing"):
        assert (by_desc[desc]["total"], by_desc[desc]["n"], by_desc[desc]["unit"]) == \
            (1500, 1500, "cells")


def test_perturb_bars_count_cells_and_nest(bars, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _TTY())
    _, model = family("geneformer")
    adata = pbmc()[0].copy()
    (a, b), _ = _gene_names("geneformer")
    sclcm.tl.perturb(adata, [a, b], model=model, n_null=2)
    by_desc = {bar["desc"]: bar for bar in bars}
    for desc in ("expression", "perturbing"):
        assert (by_desc[desc]["total"], by_desc[desc]["n"], by_desc[desc]["unit"]) == \
            (adata.n_obs, adata.n_obs, "cells")
    # the passes of a block are drawn on the line below the cells' bar, and cleared
    assert abs(by_desc["forward passes"]["pos"]) == abs(by_desc["perturbing"]["pos"]) + 1
    assert not any(bar["leave"] for bar in bars)


def test_no_bar_is_written_to_a_log(monkeypatch):
    """Progress on, stderr a file (a log, CI): nested bars once wrote every redraw and
    their cursor moves there as escape codes."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    sclcm.settings.progress = True
    _, model = family("geneformer")
    adata = pbmc()[0].copy()
    (a, b), _ = _gene_names("geneformer")
    sclcm.tl.perturb(adata, [a, b], model=model, n_null=2)
    assert adata.obsm["sclcm_perturb"].shape == (adata.n_obs, 2)
    text = log.getvalue()
    assert "\r" not in text
    assert "\x1b[" not in text
    assert "it/s" not in text
    assert "cells/s" not in text
