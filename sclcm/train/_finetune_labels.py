"""The labels of a fine-tuning reference: codes, checks before any work, and the
validation split (stratified by label, or whole groups such as donors)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .. import logging as logg
from .._checks import InputError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["MIN_CELLS_PER_CLASS", "_check_labels", "_split", "missing_labels"]

#: Fewest cells of a class that a stratified split can both train on and validate.
MIN_CELLS_PER_CLASS = 5


def _check_labels(adata: AnnData, label_key: str, groupby: str | None, layer: str | None
                  ) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """Label codes per cell (-1 for NaN), class names, and group codes; every check that
    can fail before any work."""
    import pandas as pd

    for key, what in ((label_key, "label_key"), (groupby, "groupby")):
        if key is not None and key not in adata.obs:
            msg = (f"{what} {key!r} is not a column of adata.obs; its columns are "
                   f"{list(adata.obs.columns)}.")
            raise InputError(msg)
    labels = adata.obs[label_key]
    missing = missing_labels(adata, label_key)
    text = labels.astype(str).to_numpy()
    classes = sorted(pd.unique(text[~missing]))
    if len(classes) < 2:
        msg = (f"adata.obs[{label_key!r}] has a single class ({classes[0]!r}): a classifier "
               "needs at least two.")
        raise InputError(msg)
    codes = np.where(missing, -1, np.searchsorted(classes, text))
    counts = np.bincount(codes[codes >= 0], minlength=len(classes))
    small = [f"{c!r} ({n})" for c, n in zip(classes, counts, strict=True)
             if n < MIN_CELLS_PER_CLASS]
    if small:
        msg = (f"{', '.join(small)} of obs[{label_key!r}] {'has' if len(small) == 1 else 'have'}"
               f" fewer than {MIN_CELLS_PER_CLASS} cells, too few to train on and validate. "
               "Drop them (adata = adata[~adata.obs[label_key].isin([...])].copy()), merge "
               "them into a broader type, or set them to NaN to leave them out.")
        raise InputError(msg)
    group_codes = None
    if groupby is not None:
        g = adata.obs[groupby]
        if g.isna().to_numpy()[~missing].any():
            msg = f"adata.obs[{groupby!r}] has NaN for labelled cells: fill it in first."
            raise InputError(msg)
        group_codes = pd.factorize(g.astype(str))[0]
        if len(np.unique(group_codes[~missing])) < 2:
            msg = (f"groupby {groupby!r} has a single group among the labelled cells: whole "
                   "groups cannot be held out. Use groupby=None (a stratified split).")
            raise InputError(msg)
    return codes, classes, group_codes


def missing_labels(adata: AnnData, label_key: str, *, name: str = "adata",
                   cells: str = "cells", use: str = "fine-tuning") -> np.ndarray:
    """Which cells have no label (NaN): an error when none has one, a warning that counts
    them otherwise (they are left out of ``use``)."""
    missing = adata.obs[label_key].isna().to_numpy()
    if missing.all():
        msg = (f"Every label in {name}.obs[{label_key!r}] is NaN: fill in the labels of the "
               "reference cells (or pick another label_key).")
        raise InputError(msg)
    if missing.any():
        logg.warning(f"{int(missing.sum())} of {adata.n_obs} {cells} have no label (NaN in "
                     f"obs[{label_key!r}]): left out of {use}.")
    return missing


def _split(codes: np.ndarray, classes: list[str], groups: np.ndarray | None,
           val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation rows: stratified by label, or whole groups held out."""
    rows = np.flatnonzero(codes >= 0)
    rng = np.random.default_rng(seed)
    if groups is None:
        val = []
        for c in range(len(classes)):  # each class split alike: stratified
            r = rng.permutation(rows[codes[rows] == c])
            val.append(r[:max(1, math.floor(len(r) * val_fraction))])
        val_rows = np.sort(np.concatenate(val))
    else:
        ids = rng.permutation(np.unique(groups[rows]))
        sizes = np.array([(groups[rows] == g).sum() for g in ids])
        # the fewest groups, in random order, that hold val_fraction; one stays for training
        n_val = min(int(np.searchsorted(np.cumsum(sizes), val_fraction * len(rows))) + 1,
                    len(ids) - 1)
        val_rows = rows[np.isin(groups[rows], ids[:n_val])]
    train_rows = np.setdiff1d(rows, val_rows)
    absent = [classes[c] for c in range(len(classes)) if not (codes[train_rows] == c).any()]
    if absent:
        msg = (f"The validation groups hold every cell of {absent}: no cell of "
               f"{'that class' if len(absent) == 1 else 'those classes'} is left to train "
               "on. Use another seed, a smaller val_fraction, or groupby=None.")
        raise InputError(msg)
    return train_rows, val_rows
