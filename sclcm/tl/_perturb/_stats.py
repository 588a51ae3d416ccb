"""Statistics of a perturbation screen: expression-matched null genes, tests, the table.

A gene's effect is compared with the effects of random genes expressed about as often:
genes are split into ten groups (deciles) by the share of cells that express them, a few
random genes of the group are perturbed the same way, and their per-cell scores pooled
form the null. The test is Wilcoxon's rank-sum (Mann-Whitney U, two-sided) of the gene's
per-cell scores against that pool; p-values are adjusted by Benjamini-Hochberg.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd

N_GROUPS = 10


def expression_groups(freq: np.ndarray, rng: np.random.Generator,
                      n_groups: int = N_GROUPS) -> np.ndarray:
    """Group (0 = rarest ... ``n_groups - 1``) of each gene by its expression frequency.

    Genes are ranked by ``freq`` (ties in random order, so that the many genes with the
    same low frequency spread evenly) and cut into ``n_groups`` groups of equal size.

    >>> expression_groups(np.array([0.1, 0.9, 0.5, 0.3]), np.random.default_rng(0), 2)
    array([0, 1, 1, 0])
    """
    n = len(freq)
    order = np.lexsort((rng.permutation(n), freq))
    groups = np.empty(n, dtype=np.int64)
    groups[order] = np.arange(n) * n_groups // max(n, 1)
    return groups


def sample_null(universe: np.ndarray, groups: np.ndarray, wanted: np.ndarray, n_null: int,
                rng: np.random.Generator, exclude: np.ndarray) -> dict[int, np.ndarray]:
    """Up to ``n_null`` random genes of ``universe`` for each group in ``wanted``.

    ``exclude`` are left out (the genes under test).
    """
    ok = ~np.isin(universe, exclude)
    out = {}
    for g in np.unique(wanted):
        pool = universe[ok & (groups == g)]
        out[int(g)] = rng.choice(pool, min(n_null, len(pool)), replace=False) if len(pool) \
            else pool
    return out


def rank_sum(x: np.ndarray, null: np.ndarray) -> tuple[float, float]:
    """Mann-Whitney U of ``x`` against ``null`` and its two-sided p-value (NaN if too few)."""
    x, null = x[np.isfinite(x)], null[np.isfinite(null)]
    if len(x) < 2 or len(null) < 2:
        return np.nan, np.nan
    from scipy import stats

    res = stats.mannwhitneyu(x, null, alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def fdr(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values; NaN stays NaN."""
    out = np.full(len(pvalues), np.nan)
    ok = np.isfinite(pvalues)
    if ok.any():
        from scipy import stats

        out[ok] = stats.false_discovery_control(pvalues[ok], method="bh")
    return out


def perturbation_table(names: list[str], scores: np.ndarray, goal: np.ndarray | None,
                       null_of: Callable[[int], np.ndarray], n_expressed: np.ndarray,
                       groups: np.ndarray) -> pd.DataFrame:
    """One row per perturbation, sorted by effect (strongest first).

    Parameters
    ----------
    names
        Perturbation names.
    scores, goal
        Cells x perturbations: cosine shifts, and goal shifts (or ``None``); NaN where a
        cell was not perturbed. The test runs on the goal shift when given.
    null_of
        Perturbation index -> the pooled null scores (of the same measure as the test);
        called once per perturbation, so that only one pool is in memory.
    n_expressed
        Per perturbation, the cells that expressed the gene(s).
    groups
        Per perturbation, its expression group (-1 for combinations).
    """
    effect = scores if goal is None else goal
    n_perturbed = np.isfinite(scores).sum(axis=0)
    with warnings.catch_warnings():  # a never-perturbed column has an empty mean
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_shift = np.nanmean(scores, axis=0)
        mean_goal = None if goal is None else np.nanmean(goal, axis=0)
    tests, null_mean = [], []
    for k in range(len(names)):
        null = null_of(k)
        tests.append(rank_sum(effect[:, k], null))
        null_mean.append(float(np.nanmean(null)) if np.isfinite(null).any() else np.nan)
    table = pd.DataFrame({
        "gene": pd.Series(names, dtype=str),
        "mean_shift": mean_shift.astype(np.float64),
        **({} if mean_goal is None else {"mean_goal_shift": mean_goal.astype(np.float64)}),
        "null_mean": np.asarray(null_mean, dtype=np.float64),
        "n_expressed": np.asarray(n_expressed, dtype=np.int64),
        "n_perturbed": n_perturbed.astype(np.int64),
        "expression_group": np.asarray(groups, dtype=np.int64),
        "statistic": np.array([t[0] for t in tests], dtype=np.float64),
        "pvalue": np.array([t[1] for t in tests], dtype=np.float64),
    })
    table["fdr"] = fdr(table["pvalue"].to_numpy())
    by = "mean_shift" if goal is None else "mean_goal_shift"
    return table.sort_values(by, ascending=False, na_position="last", kind="stable"
                             ).reset_index(drop=True)
