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
