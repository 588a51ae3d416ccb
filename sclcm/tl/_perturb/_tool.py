"""sclcm.tl.perturb: in-silico perturbation screens (Geneformer's deletion, and more)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ... import logging as logg
from ..._checks import InputError
from ..._progress import progress
from .._cells import CellTokens
from .._forward import precision_for
from .._model_ref import get_model
from ._edit import CellIndex, Encoding, build, plan_all, plan_listed
from ._stats import expression_groups, perturbation_table, sample_null
from ._targets import (
    Targets,
    check_args,
    draw_null,
    is_all,
    perturbable,
    resolve_genes,
    select_cells,
)

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from anndata import AnnData

    from ...models import CellModel
    from ._score import Scorer

#: Cells per block read and tokenized at once (the copies of a block are planned together).
BLOCK_CELLS = 256


def perturb(adata: AnnData, genes: str | Sequence[str] = "all", *,
            mode: str = "delete", model: str | Path | CellModel | None = None,
            goal: Mapping[str, Any] | None = None, combine: bool = False,
            shift: float = 0.25, gene_shifts: bool = False, n_cells: int | None = None,
            n_null: int = 20, layer: str | None = None, key_added: str = "sclcm_perturb",
            batch_size: int | None = None, device: str | torch.device | None = None,
            precision: str | None = None, random_state: int = 0,
            copy: bool = False) -> AnnData | None:
    """Perturb genes in the tokenized cells and measure how the model's embedding moves.

    Every perturbed copy of every cell runs through the model packed with many others
    (one forward pass for many copies, built by vectorized token edits), and the
    originals once. Cells are read in blocks of 256.

    Parameters
    ----------
    adata
        Cells x genes, counts in ``X`` or ``layer`` (as the model's tokenizer reads them).
    genes
        ``"all"``: each expressed gene of each cell, one at a time (not with
        ``combine``). Or gene names (``var_names``, or Ensembl IDs of the model's
        vocabulary), each perturbed on its own, or together with ``combine=True``.
    mode
        What is done to a gene of a cell, with ``n`` the cell's number of expressed genes
        ranked from highest (rank 0) to lowest:

        ``"delete"``
            Its token is removed (scBERT's panel, and scGPT with ``include_zero_genes``,
            write unexpressed genes as value 0: there the value becomes 0).
        ``"overexpress"``
            It becomes the cell's top gene: Geneformer puts it right after ``<cls>``;
            scGPT gives it the top bin (``n_bins - 1``), scBERT the top level
            (``max_level``), scFoundation the cell's highest value. A gene the cell does
            not express is inserted (Geneformer: a full cell loses its last gene; value
            families: in vocabulary order).
        ``"inhibit"`` / ``"activate"``
            It moves ``round(shift * n)`` places down / up the cell's ranking (not past
            the lowest / highest expressed gene): Geneformer moves the token there; the
            value families give it the value of the gene that held that rank.

        Genes a cell does not express are skipped by ``delete``, ``inhibit`` and
        ``activate`` (NaN in the scores; ``n_expressed`` in the table).
    model
        ``None`` (the default shipped model), a shipped model's name, a directory written
        by ``save_pretrained``, or a ``CellModel`` with its tokenizer.
    goal
        ``{"key": obs column, "start": value, "goal": value}``: perturb the ``start``
        cells only and also score the shift toward the mean embedding of the ``goal``
        cells, as Geneformer does.
    combine
        Perturb the listed genes together: one copy per cell (made where at least one of
        them can be perturbed), named ``"A+B+..."``.
    shift
        Fraction of the cell's ranking that ``inhibit`` / ``activate`` move a gene.
    gene_shifts
        Also record which other genes' contextual embeddings (last hidden states) move
        most under each perturbation.
    n_cells
        Perturb a random sample of this many cells (of the ``start`` cells with ``goal``);
        default all.
    n_null
        Random genes per expression group (decile of the share of cells expressing a
        gene) that make the null of the test; perturbed like the listed genes (with
        ``genes="all"``, sampled among the genes already perturbed). With ``combine``,
        ``n_null`` random sets of matched genes.
    layer
        Read ``adata.layers[layer]`` instead of ``X``.
    key_added
        Where the results go (see Returns).
    batch_size
        Copies per forward pass; ``None`` packs passes by a token budget (16,384 tokens on
        CPU, 131,072 on CUDA).
    device
        ``"cpu"``, ``"cuda"``, ...; default :attr:`sclcm.settings.device`.
    precision
        ``"float32"`` or ``"bfloat16"`` (autocast: matrix products in bf16; shifts and
        cosines are computed in float64 either way); default bf16 on CUDA, float32
        elsewhere. On a CPU with native bf16 (AVX512-BF16, AMX) ``"bfloat16"`` is faster;
        ``benchmarks/perturb_speed.py`` prints its speed and agreement with float32.
    random_state
        Seeds the cell sample and the null genes.
    copy
        Return a new AnnData instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the new AnnData when ``copy=True``. Sets:

    ``obsm[key_added]``
        float32 ``n_obs x n_perturbations``: ``shift = 1 - cos(original, perturbed)`` of
        each cell's embedding (the model's pooling, as :meth:`CellModel.embed`); NaN where
        a cell was not perturbed. Geneformer's "cosine similarity" is ``1 - shift``.
    ``obsm[f"{key_added}_goal"]``
        With ``goal``: ``cos(perturbed, goal mean) - cos(original, goal mean)``.
    ``uns[key_added]``
        ``names`` (the columns), ``table`` (a DataFrame, one row per perturbation, strongest
        first: ``gene``, ``mean_shift``, ``mean_goal_shift``, ``null_mean``,
        ``n_expressed``, ``n_perturbed``, ``expression_group``, ``statistic``, ``pvalue``,
        ``fdr``: Wilcoxon rank-sum of the per-cell effect, the goal shift with ``goal``
        and else the shift, against the pooled effects of the null genes of the same
        expression group; Benjamini-Hochberg FDR), ``embedding_shift`` (``n_perturbations
        x d_model``: the mean of perturbed minus original embedding), ``null_genes``,
        ``not_in_vocab``, ``n_cells``, ``params``, and with ``gene_shifts`` a DataFrame
        ``gene_shifts`` (``perturbation``, ``gene``, ``mean_shift``, ``n_cells``).

    Raises
    ------
    ValueError
        An unknown ``mode``, a malformed ``genes`` or ``goal``, ``combine`` with
        ``"all"``, ``shift`` outside (0, 1], ``copy=True`` on a backed AnnData.
    sclcm.InputError
        An empty AnnData, a missing layer, genes neither in ``var_names`` nor in the
        vocabulary, no listed gene with a token, a ``goal`` column or state missing from
        ``obs``, values the model's tokenizer cannot read. ``adata`` is left as it was.

    Examples
    --------
    >>> import sclcm
    >>> sclcm.tl.perturb(adata, ["STAT1", "IRF1"], mode="delete")       # doctest: +SKIP
    >>> adata.uns["sclcm_perturb"]["table"].head()                      # doctest: +SKIP
    >>> sclcm.pl.perturbation(adata)                                    # doctest: +SKIP
    """
    check_args(adata, genes, mode=mode, goal=goal, combine=combine, shift=shift,
               n_cells=n_cells, n_null=n_null, layer=layer, copy=copy)
    net = get_model(model, device=device)
    dev = next(net.parameters()).device
    precision = precision_for(precision, dev)
    tok = net.tokenizer
    cells = CellTokens.prepare(adata, tok, layer=layer)  # values: checked as blocks are read
    rng = np.random.default_rng(random_state)
    targets = None if is_all(genes) else resolve_genes(list(genes), adata, cells, combine=combine)
    rows, goal_rows = select_cells(adata, goal, n_cells, rng)
    sub = CellTokens(adata[rows] if len(rows) < adata.n_obs else adata, tok, cells.report,
                     cells.column_map, layer)
    enc = Encoding.of(tok, max_position=net.config.max_position)
    V = len(tok.vocab)
    what = "every expressed gene" if targets is None else f"{targets.n} perturbation(s)"
    start = logg.info(f"perturbing {len(rows)} cells ({mode}, {what}) with a "
                      f"{net.config.tokenizer} model on {dev}")

    freq, n_ok = _expression(sub, enc, V)
    sub.warn_low_coverage()  # the counts of the cells perturbed were just read
    universe = perturbable(cells, freq, mode)
    groups = expression_groups(freq[universe] / max(n_ok, 1), rng)
    group_of = np.full(V, -1, dtype=np.int64)
    group_of[universe] = groups
    if targets is None:
        pert_ids, pert_offsets, null = universe, np.arange(len(universe) + 1), None
    else:
        null = draw_null(targets, universe, groups, group_of, n_null, rng)
        pert_ids, pert_offsets = targets.with_null(null)

    was_training = net.training
    net.eval()
    try:
        goal_mean = _goal_mean(net, adata, goal_rows, cells, layer, dev, precision) \
            if goal else None
        result = _screen(net, sub, enc, V, mode, shift, pert_ids, pert_offsets,
                         all_genes=targets is None, goal=goal_mean, gene_shifts=gene_shifts,
                         batch_size=batch_size, device=dev, precision=precision)
    finally:
        net.train(was_training)

    names, table, cols, null_names = _summarize(result, targets, null, pert_ids, group_of,
                                                cells, adata, n_null, rng)
    record = {
        "names": np.asarray(names, dtype=object), "table": table,
        "embedding_shift": result.embedding_shift(cols),
        "null_genes": np.asarray(null_names, dtype=object),
        "not_in_vocab": np.asarray([] if targets is None else targets.not_in_vocab, object),
        "n_cells": len(rows),
        "params": {k: v for k, v in {
            "mode": mode, "genes": "all" if targets is None else np.asarray(targets.asked,
                                                                             object),
            "combine": combine, "shift": shift if mode in ("inhibit", "activate") else None,
            "goal": None if goal is None else {k: str(v) for k, v in goal.items()},
            "gene_shifts": gene_shifts, "n_cells": n_cells, "n_null": n_null,
            "layer": layer, "batch_size": batch_size, "random_state": random_state,
            "model": _model_id(model), "tokenizer": tok.name, "device": str(dev),
            "dtype": precision,
        }.items() if v is not None},
    }
    if gene_shifts:
        record["gene_shifts"] = _gene_shift_table(result.scorer, names, cols, cells, adata)
    obsm = {key_added: _full(result.shift[:, cols], rows, adata.n_obs)}
    if goal is not None:
        obsm[f"{key_added}_goal"] = _full(result.goal[:, cols], rows, adata.n_obs)

    # everything is computed: only now touch the user's object
    if copy:
        adata = adata.copy()
    elif adata.is_view:
        adata._init_as_actual(adata.copy())
    adata.obsm.update(obsm)
    adata.uns[key_added] = record
    logg.info("    finished", time=start)
    logg.hint(f"added {', '.join(f'obsm[{k!r}]' for k in obsm)}, uns[{key_added!r}]")
    return adata if copy else None


# --- passes over the cells ---------------------------------------------------------------
def _expression(cells: CellTokens, enc: Encoding, V: int) -> tuple[np.ndarray, int]:
    """Cells that express each token id, and the cells with any expressed gene."""
    freq, n = np.zeros(V, dtype=np.int64), 0
    for _, batch, empty in cells.batches(block_size=BLOCK_CELLS, desc="expression"):
        index = CellIndex(batch, enc, V)
        ok = ~empty[index.cell[index.by_rank]]
        freq += np.bincount(batch.gene_ids[index.by_rank[ok]], minlength=V)
        n += int((~empty & (index.n_expressed > 0)).sum())
    return freq, n


def _goal_mean(net: CellModel, adata: AnnData, rows: np.ndarray, cells: CellTokens,
               layer: str | None, device: torch.device, precision: str) -> np.ndarray:
    """Mean embedding of the goal-state cells."""
    import torch

    from .._forward import autocast
    from ._score import Scorer

    scorer = Scorer(net, device, n_perts=0, batch_size=None, goal=None, gene_shifts=False)
    goal = CellTokens(adata[rows], cells.tokenizer, cells.report, cells.column_map, layer)
    total, n = np.zeros(net.config.d_model), 0
    with torch.inference_mode(), autocast(device, precision):
        for _, batch, empty in goal.batches(block_size=BLOCK_CELLS, desc="goal cells"):
            keep = np.flatnonzero(~empty)
            if len(keep):
                emb, _ = scorer.originals(batch, keep)
                total += emb[torch.from_numpy(keep).to(device)].double().sum(0).cpu().numpy()
                n += len(keep)
    if n == 0:
        msg = "No goal cell has a gene of the model's vocabulary."
        raise InputError(msg)
    return total / n


class _Result:
    def __init__(self, n_cells: int, n_perts: int, scorer: Scorer, *, goal: bool) -> None:
        self.shift = np.full((n_cells, n_perts), np.nan, dtype=np.float32)
        self.goal = np.full((n_cells, n_perts), np.nan, dtype=np.float32) if goal else None
        self.n_expressed = np.zeros(n_perts, dtype=np.int64)
        self.scorer = scorer

    def embedding_shift(self, cols: np.ndarray) -> np.ndarray:
        n = np.isfinite(self.shift[:, cols]).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.scorer.delta_sum[cols] / n[:, None]).astype(np.float32)


def _screen(net: CellModel, cells: CellTokens, enc: Encoding, V: int, mode: str, shift: float,
            pert_ids: np.ndarray, pert_offsets: np.ndarray, *, all_genes: bool,
            goal: np.ndarray | None, gene_shifts: bool, batch_size: int | None,
            device: torch.device, precision: str) -> _Result:
    """The main pass: per block, the originals, then all perturbed copies, packed."""
    import torch

    from .._forward import autocast
    from ._score import Scorer

    n_perts = len(pert_offsets) - 1
    scorer = Scorer(net, device, n_perts=n_perts, batch_size=batch_size, goal=goal,
                    gene_shifts=gene_shifts)
    result = _Result(cells.adata.n_obs, n_perts, scorer, goal=goal is not None)
    pert_of_token = np.full(V, -1, dtype=np.int64)
    if all_genes:
        pert_of_token[pert_ids] = np.arange(n_perts)
    block = 64 if gene_shifts else BLOCK_CELLS  # the originals' token states stay in memory
    with torch.inference_mode(), autocast(device, precision):
        for first, batch, empty in cells.batches(block_size=block, desc="perturbing"):
            index = CellIndex(batch, enc, V)
            ok = np.flatnonzero(~empty & (index.n_expressed > 0))
            if not len(ok):
                continue
            if all_genes:
                edits = plan_all(index, pert_of_token, ok)
                result.n_expressed += np.bincount(edits.copy_pert, minlength=n_perts)
            else:
                edits, expressed = plan_listed(index, pert_ids, pert_offsets, mode, ok)
                result.n_expressed += np.logical_and.reduceat(
                    expressed, pert_offsets[:-1], axis=1).sum(0)
            if not edits.n_copies:
                continue
            orig, states = scorer.originals(batch, ok)
            passes = scorer.passes(edits.lengths(index, mode))
            for part in progress(passes, desc="forward passes", unit="pass"):
                copies, origin, edited = build(index, edits, part, mode, shift)
                s, g = scorer.score(index, edits, part, copies, origin, edited, orig, states)
                rows, cols = first + edits.copy_cell[part], edits.copy_pert[part]
                result.shift[rows, cols] = s
                if g is not None:
                    result.goal[rows, cols] = g
    return result


# --- results -----------------------------------------------------------------------------
def _summarize(result: _Result, targets: Targets | None, null: list | None,
               pert_ids: np.ndarray, group_of: np.ndarray, cells: CellTokens, adata: AnnData,
               n_null: int, rng: np.random.Generator
               ) -> tuple[list[str], pd.DataFrame, np.ndarray, list[str]]:
    """Names, table, output columns and the null genes' names."""
    effect = result.shift if result.goal is None else result.goal
    name_of = _token_names(cells, adata)
    if targets is None:  # every gene: the null is drawn from the perturbed genes
        cols = np.flatnonzero(np.isfinite(result.shift).any(0))
        names = [name_of[t] for t in pert_ids[cols]]
        groups = group_of[pert_ids[cols]]
        drawn = sample_null(cols, groups, np.unique(groups), n_null, rng,
                            np.zeros(0, dtype=np.int64))
        pools = {g: effect[:, d].ravel() for g, d in drawn.items()}

        def null_of(k: int) -> np.ndarray:
            c, d = cols[k], drawn[int(groups[k])]
            return effect[:, d[d != c]].ravel() if c in d else pools[int(groups[k])]

        null_names = [name_of[pert_ids[c]] for g in sorted(drawn) for c in drawn[g]]
    else:
        cols = np.arange(targets.n)
        names = targets.names
        groups = np.full(targets.n, -1) if targets.combine else group_of[targets.token_ids]
        if targets.combine:  # the null sets
            pools = {-1: effect[:, targets.n:].ravel()}
        else:  # a gene no cell expresses (outside the groups) is matched with the rarest
            null_group = group_of[pert_ids[targets.n:]]
            pools = {int(g): effect[:, targets.n + np.flatnonzero(null_group == max(g, 0))
                                    ].ravel() for g in np.unique(groups)}

        def null_of(k: int) -> np.ndarray:
            return pools[int(groups[k])]

        null_names = ["+".join(name_of[int(t)] for t in s) for s in null]
    table = perturbation_table(names, result.shift[:, cols],
                               None if result.goal is None else result.goal[:, cols],
                               null_of, result.n_expressed[cols], groups)
    return names, table, cols, null_names


def _token_names(cells: CellTokens, adata: AnnData) -> dict[int, str]:
    """Name of each token id: the first column that maps to it (else the vocab's ID)."""
    cmap = cells.column_map
    cols = np.flatnonzero(cmap.slot >= 0)
    tokens = cmap.token_ids[cmap.slot[cols]]
    _, first = np.unique(tokens, return_index=True)
    out = {int(tokens[f]): str(adata.var_names[cols[f]]) for f in first}
    return _NameMap(out, cells.tokenizer.vocab)


class _NameMap(dict):
    """Token id -> gene name; ids without a column fall back to the vocabulary's ID."""

    def __init__(self, names: dict[int, str], vocab) -> None:
        super().__init__(names)
        self.vocab = vocab

    def __missing__(self, token: int) -> str:
        return self.vocab.decode([token])[0]


def _gene_shift_table(scorer: Scorer, names: list[str], cols: np.ndarray, cells: CellTokens,
                      adata: AnnData) -> pd.DataFrame:
    """Per perturbation and other gene: the mean shift of its state, and in how many cells."""
    pert, ids, sums, counts = scorer.gene_shift_sums()
    col_of = np.full(max(int(cols.max(initial=-1)) + 1, int(pert.max(initial=-1)) + 1), -1)
    col_of[cols] = np.arange(len(cols))
    keep = np.flatnonzero(col_of[pert] >= 0) if len(pert) else np.zeros(0, dtype=np.int64)
    name_of = _token_names(cells, adata)
    df = pd.DataFrame({
        "perturbation": pd.Categorical([names[col_of[p]] for p in pert[keep]],
                                       categories=names),
        "gene": [name_of[int(t)] for t in ids[keep]],
        "mean_shift": sums[keep] / counts[keep],
        "n_cells": counts[keep].astype(np.int64),
    })
    return df.sort_values(["perturbation", "mean_shift"], ascending=[True, False]
                          ).reset_index(drop=True)


def _full(values: np.ndarray, rows: np.ndarray, n_obs: int) -> np.ndarray:
    """Rows of the perturbed cells placed among all cells (NaN elsewhere)."""
    if len(rows) == n_obs:
        return values
    out = np.full((n_obs, values.shape[1]), np.nan, dtype=np.float32)
    out[rows] = values
    return out


def _model_id(model: Any) -> str:
    from .._model_ref import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        return str(model)
    return f"{type(model).__name__} object (not from a directory)"
