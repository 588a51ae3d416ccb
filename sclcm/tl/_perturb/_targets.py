"""Which genes and cells a perturbation screen edits: arguments checked, genes resolved to
tokens, cells selected, null genes drawn."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ... import logging as logg
from ..._checks import InputError
from .._cells import check_tool_input
from ._edit import MODES
from ._stats import sample_null

if TYPE_CHECKING:
    from anndata import AnnData

    from .._cells import CellTokens


def is_all(genes: Any) -> bool:
    return isinstance(genes, str) and genes == "all"


def check_args(adata: AnnData, genes: Any, *, mode: str, goal: Mapping | None,
               combine: bool, shift: float, n_cells: int | None, n_null: int,
               layer: str | None, copy: bool) -> None:
    """What can be told before loading a model."""
    if mode not in MODES:
        msg = f"mode must be one of {list(MODES)}, not {mode!r}."
        raise ValueError(msg)
    check_tool_input(adata, layer, copy=copy)
    if isinstance(genes, str) and not is_all(genes):
        msg = f"genes must be 'all' or a list of gene names, not the string {genes!r}."
        raise ValueError(msg)
    if not is_all(genes):
        genes = list(genes)
        if not genes:
            msg = "genes is empty: give gene names, or 'all'."
            raise ValueError(msg)
        dup = sorted(g for g, n in Counter(genes).items() if n > 1)
        if dup:
            msg = f"genes lists {dup} more than once."
            raise ValueError(msg)
    elif combine:
        msg = "combine=True needs a list of genes to perturb together, not 'all'."
        raise ValueError(msg)
    if not 0 < shift <= 1:
        msg = f"shift must be a fraction in (0, 1], not {shift}."
        raise ValueError(msg)
    if n_cells is not None and n_cells < 1:
        msg = f"n_cells must be a positive number of cells, not {n_cells}."
        raise ValueError(msg)
    if n_null < 1:
        msg = f"n_null must be at least 1, not {n_null}."
        raise ValueError(msg)
    if goal is not None:
        if not isinstance(goal, Mapping) or set(goal) != {"key", "start", "goal"}:
            msg = ("goal must be a dict {'key': obs column, 'start': value, 'goal': value}, "
                   f"not {goal!r}.")
            raise ValueError(msg)
        key = goal["key"]
        if key not in adata.obs:
            msg = f"goal key {key!r} is not a column of adata.obs ({list(adata.obs)})."
            raise InputError(msg)
        present = set(adata.obs[key].astype(str))
        # name the entries by their keys in the dict: "goal " + what read "goal goal"
        for what in ("start", "goal"):
            if str(goal[what]) not in present:
                msg = (f"goal[{what!r}] = {goal[what]!r} is not a value of "
                       f"adata.obs[{key!r}] (values: {sorted(present)[:10]}).")
                raise InputError(msg)
        if str(goal["start"]) == str(goal["goal"]):
            msg = (f"goal['start'] and goal['goal'] are the same state ({goal['goal']!r}): "
                   "give the state to move from and the one to move toward.")
            raise ValueError(msg)


class Targets:
    """Listed genes resolved to tokens: one perturbation per gene, or one for all."""

    def __init__(self, asked: list[str], names: list[str], token_ids: list[int],
                 not_in_vocab: list[str], *, combine: bool) -> None:
        self.asked, self.not_in_vocab, self.combine = asked, not_in_vocab, combine
        self.token_ids = np.asarray(token_ids, dtype=np.int64)
        self.names = ["+".join(names)] if combine else list(names)

    @property
    def n(self) -> int:
        return len(self.names)

    def with_null(self, null: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Flat token ids and offsets of the perturbations, then the null ones."""
        sets = [self.token_ids] if self.combine else [t[None] for t in self.token_ids]
        sets += null
        offsets = np.zeros(len(sets) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in sets], out=offsets[1:])
        return np.concatenate(sets).astype(np.int64), offsets


def resolve_genes(genes: list[str], adata: AnnData, cells: CellTokens, *,
                  combine: bool) -> Targets:
    """Token of each listed gene: by ``var_names``, else as a vocabulary gene ID."""
    cmap, tok = cells.column_map, cells.tokenizer
    col_token = cmap.column_token_ids
    by_id = pd.Index(cells.report.ensembl_id.astype(str))
    names, ids, missing, no_token = [], [], [], []
    for g in genes:
        if g in adata.var_names:  # the first column of that name
            t = col_token[np.flatnonzero(adata.var_names == g)[0]]
        elif g in tok.vocab and tok.vocab[g] >= len(tok.vocab.special_tokens):
            t = int(tok.token_ids_of_genes(np.array([tok.vocab[g]]))[0])
        elif g in by_id:
            t = col_token[np.flatnonzero(by_id == g)[0]]
        else:
            missing.append(g)
            continue
        (names if t >= 0 else no_token).append(g)
        if t >= 0:
            ids.append(int(t))
    if missing:
        msg = (f"{len(missing)} gene(s) are neither in adata.var_names nor in the model's "
               f"vocabulary: {missing[:10]}.")
        raise InputError(msg)
    if no_token:
        logg.warning(f"{len(no_token)} gene(s) have no token in the model's tokenizer (not "
                     f"in its vocabulary, or, for Geneformer, no gene median) and are "
                     f"skipped: {no_token[:10]}")
    if not ids:
        msg = (f"None of the genes has a token in the model's tokenizer: {no_token[:10]}. "
               "Check sclcm.genes.resolve(adata) and the model's vocabulary.")
        raise InputError(msg)
    if len(set(ids)) < len(ids):
        msg = "Several of the listed genes are one gene of the vocabulary; list it once."
        raise ValueError(msg)
    return Targets(genes, names, ids, no_token, combine=combine)


def select_cells(adata: AnnData, goal: Mapping | None, n_cells: int | None,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows to perturb (sorted) and rows of the goal state."""
    if goal is None:
        pool, goal_rows = np.arange(adata.n_obs), np.zeros(0, dtype=np.int64)
    else:
        state = adata.obs[goal["key"]].astype(str).to_numpy()
        pool = np.flatnonzero(state == str(goal["start"]))
        goal_rows = np.flatnonzero(state == str(goal["goal"]))
    if n_cells is not None and n_cells < len(pool):
        pool = np.sort(rng.choice(pool, n_cells, replace=False))
    return pool, goal_rows


def perturbable(cells: CellTokens, freq: np.ndarray, mode: str) -> np.ndarray:
    """Token ids that can be perturbed (and drawn for the null): the data's genes, only
    those some cell expresses unless overexpressing."""
    ids = np.unique(cells.tokenizer.token_ids_of_genes(
        cells.column_map.token_ids.astype(np.int64)))
    ids = ids[ids >= 0]
    return ids if mode == "overexpress" else ids[freq[ids] > 0]


def draw_null(targets: Targets, universe: np.ndarray, groups: np.ndarray,
              group_of: np.ndarray, n_null: int, rng: np.random.Generator
              ) -> list[np.ndarray]:
    """Null perturbations: single genes of the listed genes' groups, or matched sets."""
    # a listed gene outside the universe (overexpressing a gene no cell has) is rarest
    g = np.maximum(group_of[targets.token_ids], 0)
    if not targets.combine:
        drawn = sample_null(universe, groups, g, n_null, rng, targets.token_ids)
        return [np.array([t]) for grp in sorted(drawn) for t in drawn[grp]]
    out = []
    for _ in range(n_null):
        picks = []
        for grp, k in zip(*np.unique(g, return_counts=True), strict=True):
            pool = universe[(groups == grp) & ~np.isin(universe, targets.token_ids)]
            picks.append(rng.choice(pool, min(k, len(pool)), replace=False))
        out.append(np.concatenate(picks))
    return out
