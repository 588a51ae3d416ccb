"""sclcm.pl.gene_coverage."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from conftest import CHAI_MOUSE, PBMC3K

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
