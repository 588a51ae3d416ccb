"""Plots of a pretraining run: each objective's loss against the step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._figure import finish

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Logged terms, in panel order, with their titles.
TERMS = {"objective": "token objective", "reconstruction": "reconstruction (MSE)",
         "contrastive": "contrastive (InfoNCE)", "mvc": "MVC (MSE)", "loss": "weighted loss"}


def training_log(run_dir: str | Path) -> pd.DataFrame:
    """The run's logged metrics (``logs/version_*/metrics.csv``, versions in order, a resumed
    run's later rows winning), one row per step.

    Raises
    ------
    FileNotFoundError
        When ``run_dir`` holds no Lightning CSV log.
    """
    run_dir = Path(run_dir)
    files = sorted((run_dir / "logs").glob("version_*/metrics.csv"),
                   key=lambda p: int(p.parent.name.split("_")[-1]))
    if not files:
        msg = (f"{run_dir} has no logs/version_*/metrics.csv: pass the out_dir of a "
               "`sclcm pretrain` run.")
        raise FileNotFoundError(msg)
    log = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    return log.groupby("step").last().sort_index()


def pretraining(run_dir: str | Path, *, smooth: int = 10, show: bool | None = None,
                save: str | None = None) -> Figure | None:
    """Loss curves of a pretraining run: one panel per objective, training (smoothed over
    ``smooth`` logged points) and held-out (``val/``) losses, with the run's baselines from
    ``metrics.json`` as dashed lines when it has finished.

    Parameters
    ----------
    run_dir
        The ``out_dir`` of a ``sclcm pretrain`` run (finished or not).
    smooth
        Rolling mean over this many logged training points (1: raw).
    show, save
        Show the figure (default: when not saving), or write it to this path.

    Returns
    -------
    The figure, unless it was shown.
    """
    import matplotlib.pyplot as plt

    log = training_log(run_dir)
    single = "train/objective" not in log and "train/reconstruction" not in log \
        and "train/contrastive" not in log  # one objective: train/loss is its loss
    terms = ["objective"] if single else [t for t in TERMS if f"train/{t}" in log]
    metrics_file = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    baselines = {"objective": metrics.get("baseline"),
                 "reconstruction": metrics.get("reconstruction_baseline")}
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2), squeeze=False)
    for ax, term in zip(axes[0], terms, strict=True):
        key = "loss" if single else term
        train = log[f"train/{key}"].dropna()
        ax.plot(train.index, train.rolling(max(smooth, 1), min_periods=1).mean(),
                label="training", lw=1.2)
        val = log.get(f"val/{key}", pd.Series(dtype=float)).dropna()
        if len(val):
            ax.plot(val.index, val, "o-", label="held-out", ms=3)
        base = baselines.get(term)
        if base is not None and np.isfinite(base):
            ax.axhline(base, ls="--", c="grey", lw=1, label="baseline")
        ax.set_title(TERMS[term] if not single else "loss")
        ax.set_xlabel("step")
        ax.legend(frameon=False, fontsize=8)
    return None if finish(fig, show=show, save=save, dpi=120) else fig
