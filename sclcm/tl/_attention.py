"""sclcm.tl.attention: gene x gene attention of a model, aggregated over cells per group."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from .. import logging as logg
from .._checks import InputError
from ._cells import CellTokens, check_tool_input, output_object
from ._embed import _model_id
from ._forward import Budget, autocast, plan_batches, precision_for
from ._model_ref import get_model

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import torch
    from anndata import AnnData

    from ..models import CellModel

#: Most genes a network is built over: its accumulators are ``n_groups x genes²`` float64.
MAX_GENES = 3000
#: Cells per block read from the AnnData and tokenized at once.
BLOCK_CELLS = 1024
#: Name of the only group when no ``groupby`` is given.
ALL = "all"


@dataclass
class Groups:
    """Which group each cell belongs to: ``codes`` (-1 = left out) into ``names``."""

    codes: np.ndarray
    names: list[str]
    groupby: str | None

    @classmethod
    def of(cls, adata: AnnData, groupby: str | None,
           groups: Sequence[str] | None = None) -> Groups:
        """Groups of ``obs[groupby]`` (all cells when ``None``), restricted to ``groups``.

        Categories without cells are left out unless ``groups`` asks for them, which raises:
        a network of no cells is no network.
        """
        if groupby is None:
            if groups is not None:
                msg = "groups= selects groups of obs[groupby]: pass groupby= too."
                raise InputError(msg)
            return cls(np.zeros(adata.n_obs, np.int64), [ALL], None)
        if groupby not in adata.obs:
            msg = f"groupby {groupby!r} is not a column of adata.obs ({list(adata.obs)})."
            raise InputError(msg)
        labels = adata.obs[groupby]
        present = pd.Index(pd.unique(labels.dropna())).astype(str)
        if groups is None:
            cats = labels.cat.categories if isinstance(labels.dtype, pd.CategoricalDtype) \
                else sorted(present)
            names = [str(c) for c in cats if str(c) in set(present)]
        else:
            names = [str(g) for g in ([groups] if isinstance(groups, str) else groups)]
            empty = [g for g in names if g not in set(present)]
            if empty:
                msg = (f"No cell has obs[{groupby!r}] in {empty}; groups with cells: "
                       f"{sorted(present)[:20]}.")
                raise InputError(msg)
        bad = [g for g in names if "/" in g]
        if bad:  # h5ad keys cannot hold "/"
            msg = (f"Group names cannot contain '/' (they become h5ad keys): {bad}. Rename "
                   f"the categories of obs[{groupby!r}].")
            raise InputError(msg)
        codes = pd.Categorical(labels.astype(str).where(labels.notna()),
                               categories=names).codes.astype(np.int64)
        return cls(codes, names, groupby)


def kept_genes(adata: AnnData, genes: Sequence[str] | None,
               cells: CellTokens | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The network's genes: ``(names, columns)``; with ``cells``, only genes of the model's
    vocabulary (one column per token)."""
    names = adata.var_names
    if genes is None:
        cols = np.arange(adata.n_vars)
        if cells is not None:
            slot = cells.column_map.slot
            # one column per token: the first column of a gene named twice
            _, first = np.unique(np.where(slot >= 0, slot, -1 - cols), return_index=True)
            cols = np.sort(first[slot[first] >= 0])
        if len(cols) > MAX_GENES:
            msg = (f"{len(cols)} genes qualify; networks are built over at most {MAX_GENES}: "
                   "pass genes= a list, e.g. the highly variable ones (sc.pp.highly_variable_"
                   "genes(adata, flavor='seurat_v3', n_top_genes=2000); genes=adata.var_names"
                   "[adata.var.highly_variable]).")
            raise InputError(msg)
        return np.asarray(names[cols], dtype=str), cols
    genes = [genes] if isinstance(genes, str) else list(genes)
    if len(set(genes)) < len(genes):
        msg = "genes= names a gene twice."
        raise InputError(msg)
    if not 2 <= len(genes) <= MAX_GENES:
        msg = f"genes= must name 2 to {MAX_GENES} genes, got {len(genes)}."
        raise InputError(msg)
    missing = [g for g in genes if g not in names]
    if missing:
        msg = f"{len(missing)} genes of genes= are not in adata.var_names: {missing[:10]}."
        raise InputError(msg)
    cols = names.get_indexer(genes)
    if cells is not None:
        slot = cells.column_map.slot[cols]
        outside = [g for g, s in zip(genes, slot, strict=True) if s < 0]
        if outside:
            msg = (f"{len(outside)} genes of genes= are not in the model's vocabulary: "
                   f"{outside[:10]}. Leave them out (sclcm.genes.resolve(adata) shows which "
                   "genes the model knows).")
            raise InputError(msg)
        if len(np.unique(slot)) < len(slot):
            msg = "Two genes of genes= are one gene of the vocabulary (the same token)."
            raise InputError(msg)
    return np.asarray(genes, dtype=str), cols


def token_index(cells: CellTokens, cols: np.ndarray, vocab_size: int) -> np.ndarray:
    """Vocabulary id -> position among the network's genes (-1 elsewhere)."""
    out = np.full(vocab_size, -1, np.int64)
    cmap = cells.column_map
    out[cmap.token_ids[cmap.slot[cols]]] = np.arange(len(cols))
    return out


def cell_passes(model: CellModel, cells: CellTokens, groups: Groups, *,
                batch_size: int | None, device: torch.device, precision: str,
                desc: str) -> Iterator[tuple[dict, torch.Tensor]]:
    """Forward inputs of the cells in a group, pass by pass, with each cell's group code.

    The caller runs the model on each; inference mode, autocast and eval mode hold while it
    does. Cells of no group and cells without gene tokens are skipped.
    """
    import torch

    budget = Budget.for_device(device)
    max_len = cells.tokenizer.max_len or 0
    block = max(1, min(BLOCK_CELLS, 8_388_608 // max(max_len, 1)))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, precision):
            for first, batch, empty in cells.batches(block_size=block, desc=desc):
                code = groups.codes[first:first + batch.n_cells]
                keep = np.flatnonzero(~empty & (code >= 0))
                for part in plan_batches(batch.lengths[keep], n_heads=model.config.n_heads,
                                         batch_size=batch_size, budget=budget):
                    rows = keep[part]
                    yield (model.inputs(batch.select(rows), device=device),
                           torch.from_numpy(code[rows]).to(device))
    finally:
        model.train(was_training)


def encoder_genes(inputs: dict, index: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Position among the network's genes of every encoder token (-1: none), where the
    encoder puts ``n_prefix`` read-depth tokens before each cell."""
    import torch

    ids, off = inputs["gene_ids"], inputs["offsets"]
    if not n_prefix:
        return index[ids]
    n = len(off) - 1
    out = torch.full((len(ids) + n_prefix * n,), -1, dtype=torch.long, device=ids.device)
    cell = torch.repeat_interleave(torch.arange(n, device=ids.device), off.diff())
    out[torch.arange(len(ids), device=ids.device) + n_prefix * (cell + 1)] = index[ids]
    return out


def check_layers_heads(model: CellModel, layers: Sequence[int] | int | None,
                       heads: Sequence[int] | int | None) -> tuple[list[int], list[int]]:
    """Layer (block) and head indices, non-negative; ``None`` = the last layer, all heads."""
    n_layers, n_heads = model.config.n_layers, model.config.n_heads
    out = []
    for what, given, n, default in (("layers", layers, n_layers, [n_layers - 1]),
                                    ("heads", heads, n_heads, list(range(n_heads)))):
        vals = default if given is None else [given] if isinstance(given, int) else list(given)
        bad = [v for v in vals if not isinstance(v, int | np.integer) or not -n <= v < n]
        if bad or not vals:
            msg = (f"{what}={given!r}: the model has {n} {what} (0..{n - 1}, or negative from "
                   f"the end); pass {what}=None for "
                   f"{'the last one' if what == 'layers' else 'all of them'}.")
            raise InputError(msg)
        out.append(sorted({int(v) % n for v in vals}))
    return out[0], out[1]


def attention(adata: AnnData, model: str | Path | CellModel | None = None, *,
              layers: Sequence[int] | int | None = None,
              heads: Sequence[int] | int | None = None, groupby: str | None = None,
              groups: Sequence[str] | None = None, genes: Sequence[str] | None = None,
              top_k: int | None = 50, min_cells: int = 5, layer: str | None = None,
              key_added: str = "sclcm_attention", batch_size: int | None = None,
              device: str | torch.device | None = None, precision: str | None = None,
              copy: bool = False) -> AnnData | None:
    """Gene x gene attention of a model, averaged over cells (per group of ``obs[groupby]``).

    The cells run through the model in packed forward passes, block by block. The chosen
    layers compute attention on the ``math`` backend and hand each cell's probabilities,
    ``softmax(q k^T / sqrt(d_head))`` over the cell's own tokens, to an accumulator of
    ``genes x genes`` sums per group; the other layers keep their fast backend (flash,
    SDPA), and layers after the last chosen one are not run. Memory holds one block of cells
    and the accumulators (``n_groups x n_genes²`` float64 sums and counts), whatever the
    number of cells, so ``backed="r"`` data streams.

    Parameters
    ----------
    adata
        Cells x genes, as :func:`sclcm.tl.embed` reads them.
    model
        As in :func:`sclcm.tl.embed`.
    layers
        Encoder blocks to read (0 = the first, negative from the end); their attention is
        averaged. Default: the last block.
    heads
        Heads to average; default all.
    groupby, groups
        A column of ``obs``: one network per group (``groups``: only these). Default: one
        group, ``"all"``, of every cell.
    genes
        The genes of the network (names in ``var_names``, all in the model's vocabulary).
        Default: every gene of the vocabulary, if at most 3,000.
    top_k
        Edges kept per gene (row) in the written matrices; ``None`` keeps all.
    min_cells
        Edges between genes that are tokens together in fewer cells are dropped.
    layer, batch_size, device, precision, copy
        As in :func:`sclcm.tl.embed`.
    key_added
        ``uns[key_added]`` receives the result.

    Returns
    -------
    ``None``, or the new AnnData when ``copy=True``. Sets ``uns[key_added]`` with:

    ``genes``
        The network's genes (rows and columns of every matrix).
    ``groups``
        The groups' names.
    ``directed``
        ``{group: csr matrix}``: entry ``(i, j)`` is the mean, over the group's cells in
        which genes ``i`` and ``j`` are both tokens, of the attention that gene ``i``'s
        token (the query) pays to gene ``j``'s (the key), averaged over ``layers`` and
        ``heads``. Each entry is averaged over its own cells, so a row may sum to more
        than 1; attention to special tokens and to genes outside ``genes`` is not
        kept. The ``top_k`` largest entries of each row are kept; the
        diagonal (a gene's attention to itself) is left out.
    ``symmetric``
        ``{group: csr matrix}``: ``(A + A^T) / 2`` of the full directed matrix, an edge
        kept where it is among the ``top_k`` of either gene's row (so the matrix stays
        symmetric).
    ``n_cells``
        ``{group: int}``: cells that contributed (those with a token of ``genes``).
    ``n_pairs``
        ``{group: csr matrix}`` of int32: cells in which both genes of each kept edge of
        ``symmetric`` are tokens.
    ``model``, ``params``
        The model's name and ``layers``, ``heads``, ``groupby``, ``top_k``, ``min_cells``,
        ``layer``, ``precision``.

    Raises
    ------
    sclcm.InputError
        A layer or head out of range, ``groupby`` not in ``obs``, a group in ``groups``
        with no cells, genes not in ``var_names`` or not in the model's vocabulary, more
        than 3,000 genes by default; and the input errors of :func:`sclcm.tl.embed`.

    Notes
    -----
    Attention is the model's, not a regulatory network: independent evaluations found
    attention-derived gene networks of published models close to random on known
    regulation (see ``benchmarks/gene_networks.py`` for sclcm's numbers). Compare with
    ``sclcm.tl.gene_network(method="coexpression")`` on the same genes and cells.

    Examples
    --------
    >>> import sclcm
    >>> sclcm.tl.attention(adata, groupby="condition")          # doctest: +SKIP
    >>> adata.uns["sclcm_attention"]["symmetric"]["stim"]        # doctest: +SKIP
    """
    check_tool_input(adata, layer, copy=copy)
    _check_counts(top_k=top_k, min_cells=min_cells)
    grouping = Groups.of(adata, groupby, groups)
    net = get_model(model, device=device)
    lay, hds = check_layers_heads(net, layers, heads)
    dev = next(net.parameters()).device
    precision = precision_for(precision, dev)
    cells = CellTokens.prepare(adata, net.tokenizer, layer=layer)
    names, cols = kept_genes(adata, genes, cells)
    start = logg.info(f"attention of {len(names)} genes in {len(grouping.names)} groups, "
                      f"layers {lay}, heads {hds}")
    sums, counts, n_cells = _accumulate(net, cells, grouping, cols, lay, hds,
                                        batch_size=batch_size, device=dev,
                                        precision=precision)
    record: dict[str, Any] = {"genes": names, "groups": np.asarray(grouping.names, dtype=str),
                              "directed": {}, "symmetric": {}, "n_pairs": {}, "n_cells": {}}
    for g, name in enumerate(grouping.names):
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(counts[g] >= min_cells, sums[g] / counts[g], np.nan)
        np.fill_diagonal(mean, np.nan)
        record["directed"][name] = top_edges(mean, top_k)
        sym = top_edges((mean + mean.T) / 2, top_k, symmetric=True)
        record["symmetric"][name] = sym
        rows = np.repeat(np.arange(sym.shape[0]), np.diff(sym.indptr))  # of stored entries
        record["n_pairs"][name] = sparse.csr_matrix(
            (counts[g][rows, sym.indices].astype(np.int32), sym.indices, sym.indptr),
            shape=sym.shape)
        record["n_cells"][name] = int(n_cells[g])
    record["model"] = _model_id(model)
    params = {"layers": lay, "heads": hds, "groupby": groupby, "top_k": top_k,
              "min_cells": min_cells, "layer": layer, "precision": precision,
              "key_added": key_added}
    record["params"] = {k: v for k, v in params.items() if v is not None}
    adata = output_object(adata, copy=copy)  # everything is computed: only now touch it
    adata.uns[key_added] = record
    logg.info("    finished", time=start)
    logg.hint(f"added uns[{key_added!r}]")
    return adata if copy else None


def _check_counts(**kw: int | None) -> None:
    for name, v in kw.items():
        if v is not None and (not isinstance(v, int) or v < 1):
            msg = f"{name} must be a positive integer{' or None' * (name == 'top_k')}, not {v!r}."
            raise InputError(msg)


def _accumulate(model: CellModel, cells: CellTokens, groups: Groups, cols: np.ndarray,
                layers: list[int], heads: list[int], *, batch_size: int | None,
                device: torch.device, precision: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: sums of attention between the genes, pair counts, cells seen."""
    import torch

    G, n_groups = len(cols), len(groups.names)
    index = torch.from_numpy(token_index(cells, cols, model.config.vocab_size)).to(device)
    sums = torch.zeros(n_groups * G * G, dtype=torch.float64, device=device)
    counts = torch.zeros(n_groups * G * G, dtype=torch.float64, device=device)
    n_cells = torch.zeros(n_groups, dtype=torch.long, device=device)
    n_prefix = 2 if model.config.depth_tokens else 0
    heads_t = torch.tensor(heads, device=device)
    state: dict[str, Any] = {}

    def add(layer: int, cell: int, p_hll: torch.Tensor) -> None:
        off = state["offsets"]
        gene = state["genes"][off[cell]:off[cell + 1]]
        sel = (gene >= 0).nonzero()[:, 0]
        if len(sel) == 0:
            return
        g = gene[sel] + state["group"][cell] * G
        flat = (g[:, None] * G + gene[sel][None, :]).flatten()
        p = p_hll.index_select(0, heads_t).mean(0)[sel][:, sel]
        sums.index_add_(0, flat, p.flatten().double())
        if layer == layers[0]:  # a pair counts once per cell, whatever the layers
            counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
            n_cells[state["group"][cell]] += 1

    for inputs, group in cell_passes(model, cells, groups, batch_size=batch_size,
                                     device=device, precision=precision, desc="attention"):
        genes = encoder_genes(inputs, index, n_prefix)
        lengths = inputs["offsets"].diff() + n_prefix
        state.update(genes=genes, group=group,
                     offsets=torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).tolist())
        with model.record_attention(layers, add):
            model(**inputs, heads=False, upto=layers[-1] + 1)
    shape = (n_groups, G, G)
    return (sums.view(shape).cpu().numpy() / len(layers), counts.view(shape).cpu().numpy(),
            n_cells.cpu().numpy())


def top_edges(w: np.ndarray, top_k: int | None, *, symmetric: bool = False
              ) -> sparse.csr_matrix:
    """The ``top_k`` largest finite entries of each row of ``w`` as a float32 CSR matrix
    (NaN = no edge); ``symmetric``: an edge stays where either of its rows keeps it.

    >>> w = np.array([[np.nan, 3, 1], [3, np.nan, 2], [1, 2, np.nan]])
    >>> top_edges(w, 1).toarray()
    array([[0., 3., 0.],
           [3., 0., 0.],
           [0., 2., 0.]], dtype=float32)
    >>> top_edges(w, 1, symmetric=True).toarray()
    array([[0., 3., 0.],
           [3., 0., 2.],
           [0., 2., 0.]], dtype=float32)
    """
    n = w.shape[0]
    finite = np.isfinite(w)
    filled = np.where(finite, w, -np.inf)
    k = n if top_k is None else min(top_k, n)
    order = np.argpartition(-filled, k - 1, axis=1)[:, :k] if k < n else \
        np.broadcast_to(np.arange(n), (n, n))
    keep = np.zeros_like(finite)
    np.put_along_axis(keep, order, values=True, axis=1)
    keep &= finite
    if symmetric:
        keep |= keep.T
    rows, cols = np.nonzero(keep)
    return sparse.csr_matrix((w[rows, cols].astype(np.float32), (rows, cols)), shape=(n, n))
