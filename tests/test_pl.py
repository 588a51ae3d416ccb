"""sclcm.pl: gene coverage, pretraining curves, perturbation screens."""

from __future__ import annotations

from functools import cache

import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import CHAI_MOUSE, KANG_IFNB, PBMC3K, _load

import sclcm
from sclcm.pl._genes import coverage_by_method


def test_gene_coverage_plot(load, tmp_path):
    reports = {n: sclcm.genes.resolve(load(n)) for n in (PBMC3K, CHAI_MOUSE)}
    table = coverage_by_method(reports)
    assert table.sum(axis=1).round(6).eq(1).all()
    assert table.loc[PBMC3K, "previous"] > 0
    path = tmp_path / "cov.png"
    ax = sclcm.pl.gene_coverage(reports, save=str(path), show=False)
    assert path.stat().st_size > 10_000
    assert len(ax.patches) == len(reports) * table.shape[1]
    plt.close("all")


def test_needs_counts(load):
    r = sclcm.genes.resolve(load(CHAI_MOUSE), count_coverage=False)
    with pytest.raises(ValueError, match="count_coverage=True"):
        coverage_by_method({"x": r})


def test_pretraining_curves_of_a_run(tmp_path):
    import json

    import pandas as pd

    from sclcm.pl._train import training_log

    run = tmp_path / "run"
    for version, steps in ((0, range(0, 60, 10)), (1, range(50, 100, 10))):  # resumed at 50
        (run / "logs" / f"version_{version}").mkdir(parents=True)
        rows = [{"step": s, "train/loss": 9 - s / 20 + version, "train/objective": 8 - s / 50,
                 "train/reconstruction": 0.3 - s / 1000} for s in steps]
        rows.append({"step": steps[-1], "val/objective": 7.5, "val/reconstruction": 0.25})
        pd.DataFrame(rows).to_csv(run / "logs" / f"version_{version}" / "metrics.csv",
                                  index=False)
    (run / "metrics.json").write_text(json.dumps({"baseline": 8.2,
                                                   "reconstruction_baseline": 0.28}))
    log = training_log(run)
    assert log.index.is_unique
    assert log.loc[50, "train/loss"] == 9 - 50 / 20 + 1  # the resumed run's row wins
    path = tmp_path / "curves.png"
    fig = sclcm.pl.pretraining(run, save=str(path), show=False)
    assert [ax.get_title() for ax in fig.axes] == ["token objective", "reconstruction (MSE)",
                                                    "weighted loss"]
    assert path.stat().st_size > 10_000
    plt.close("all")
    with pytest.raises(FileNotFoundError, match="out_dir of a `sclcm pretrain` run"):
        sclcm.pl.pretraining(tmp_path)


# --- perturbation screens ------------------------------------------------------------------
@cache
def _goal_screen():
    """A real screen with a goal: 40 control -> 40 IFN-beta stimulated Kang cells, 24 genes
    (most with no clear effect, so goal shifts of both signs), a tiny random Geneformer."""
    import torch

    from sclcm.genes import GeneVocab, resolve
    from sclcm.models import CellModel, ModelConfig
    from sclcm.tokenizers import GeneformerTokenizer

    adata = _load(KANG_IFNB)
    state = adata.obs["condition"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(state == s), 40, replace=False)
                                   for s in ("ctrl", "stim")]))
    adata = adata[rows].copy()
    report = resolve(adata, count_coverage=False)
    tok = GeneformerTokenizer(GeneVocab.from_report(report), max_len=64).fit(adata,
                                                                             report=report)
    torch.manual_seed(0)
    model = CellModel(ModelConfig.preset("geneformer", "tiny", vocab=tok.vocab,
                                         initializer_range=0.2), tokenizer=tok).eval()
    expressed = np.asarray((adata.X > 0).sum(0)).ravel()
    genes = list(adata.var_names[np.argsort(-expressed, kind="stable")[:24]])
    sclcm.tl.perturb(adata, genes, model=model, n_null=3,
                     goal={"key": "condition", "start": "ctrl", "goal": "stim"})
    return adata


def _drawn_texts(ax) -> list:
    """The non-empty texts drawn on ``ax``: title, axis labels, tick labels in view,
    annotations, the legend's."""
    texts = [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
    if ax.get_legend() is not None:
        texts += ax.get_legend().get_texts()
    for axis, lim, i in ((ax.xaxis, ax.get_xlim(), 0), (ax.yaxis, ax.get_ylim(), 1)):
        lo, hi = sorted(lim)
        texts += [t for t in axis.get_ticklabels() if lo <= t.get_position()[i] <= hi]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _overlaps(a, b, tol: float = 0.5) -> bool:
    """Whether two display boxes share more than a sliver (``tol`` pixels)."""
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > tol) and (min(a.y1, b.y1) - max(a.y0, b.y0)
                                                          > tol)


def assert_no_overlap(ax) -> None:
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _drawn_texts(ax)]
    clash = [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:]
             if _overlaps(ba, bb)]
    assert not clash, clash
    bars = [p.get_window_extent(renderer) for p in ax.patches if p.get_width()]
    on_bars = [t for t, box in boxes if any(_overlaps(box, bar) for bar in bars)]
    assert not on_bars, on_bars
    legend = ax.get_legend()
    if legend is not None:
        frame = legend.get_window_extent(renderer)
        assert not any(_overlaps(frame, bar) for bar in bars)


def test_perturbation_goal_plot_labels_do_not_overlap():
    """The FDR labels sat at the bar ends: with negative goal shifts they ran into the
    gene names and each other."""
    adata = _goal_screen()
    table = adata.uns["sclcm_perturb"]["table"]
    assert (table["mean_goal_shift"] < 0).any()  # bars both sides of 0
    assert (table["mean_goal_shift"] > 0).any()
    ax = sclcm.pl.perturbation(adata, show=False)
    assert_no_overlap(ax)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(table["gene"][:20])
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == 20
    assert all(t.startswith("FDR ") and ", n=" in t for t in labels)
    # a small axes of someone else's figure: the row texts shrink to fit
    _, axes = plt.subplots(1, 2, figsize=(8, 3))
    ax = sclcm.pl.perturbation(adata, ax=axes[1], show=False)
    assert_no_overlap(ax)
    plt.close("all")
