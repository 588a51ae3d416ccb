"""sclcm.tl.gene_network: gene networks from attention, gene embeddings or co-expression."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from .. import logging as logg
from .._checks import InputError
from .._matrix import iter_row_blocks, stored_values
from ._attention import (
    Groups,
    _check_counts,
    cell_passes,
    kept_genes,
    token_index,
    top_edges,
)
from ._cells import CellTokens, check_tool_input, output_object
from ._embed import _model_id
from ._forward import input_rows, precision_for
from ._model_ref import get_model

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from anndata import AnnData

    from ..models import CellModel

METHODS = ("attention", "embedding", "coexpression")
#: Counts per cell that co-expression normalizes to before log1p (scanpy's usual 10,000).
TARGET_SUM = 1e4


def gene_network(adata: AnnData, *, method: str = "attention",
                 model: str | Path | CellModel | None = None, groupby: str | None = None,
                 groups: Sequence[str] | None = None, genes: Sequence[str] | None = None,
                 attention_key: str = "sclcm_attention", form: str = "symmetric",
                 n_neighbors: int = 10, top_k: int | None = 50, resolution: float = 1.0,
                 compare: Sequence[str] | None = None, n_changed: int = 50,
                 layer: str | None = None, key_added: str | None = None,
                 batch_size: int | None = None, device: str | torch.device | None = None,
                 precision: str | None = None, random_state: int = 0,
                 copy: bool = False) -> AnnData | None:
    """A gene network per group of cells, its gene programmes and what changes between groups.

    Three ways to weigh an edge between two genes, on the same genes and cells:

    ``"attention"``
        The attention between them, as :func:`sclcm.tl.attention` wrote it to
        ``uns[attention_key]`` (its groups and genes; ``form`` ``"symmetric"`` or
        ``"directed"``, edges it did not keep weigh 0).
    ``"embedding"``
        The cosine of their contextual gene embeddings: the mean last hidden state of each
        gene's token over the group's cells in which it is a token (scGPT's gene
        programmes use the cosine of gene embeddings).
    ``"coexpression"``
        Pearson's correlation over the group's cells of ``log1p`` of the counts per 10,000
        (each cell's total over all genes), cells without counts left out: the baseline.

    Gene programmes are Leiden communities (igraph, via scanpy) of the graph that joins
    each gene to its ``n_neighbors`` strongest positive edges.

    Parameters
    ----------
    adata
        Cells x genes (counts; ``backed="r"`` streams in constant memory).
    method
        ``"attention"``, ``"embedding"`` or ``"coexpression"``.
    model
        The model for ``"embedding"`` (as in :func:`sclcm.tl.embed`).
    groupby, groups
        One network per group of ``obs[groupby]`` (``groups``: only these); default one
        group, ``"all"``. With ``"attention"``, those of the attention record.
    genes
        The network's genes; default: the attention record's, the vocabulary's genes
        (``"embedding"``), or every gene (``"coexpression"``), at most 3,000.
    attention_key, form
        Where :func:`sclcm.tl.attention` wrote, and which of its matrices to read.
    n_neighbors
        Strongest edges per gene that make the graph of the programmes and the table of
        neighbours.
    top_k
        Edges per gene kept in the written weights (``None``: all).
    resolution
        Leiden's resolution (larger: more, smaller programmes).
    compare
        Two group names ``(a, b)``: also tabulate the edges whose weight changes most from
        ``a`` to ``b``, over all pairs of genes.
    n_changed
        Rows of that table.
    layer, batch_size, device, precision, copy
        As in :func:`sclcm.tl.embed`.
    key_added
        ``uns[key_added]`` receives the result; default ``f"sclcm_network_{method}"``.
    random_state
        Leiden's seed.

    Returns
    -------
    ``None``, or the new AnnData when ``copy=True``. Sets ``uns[key_added]`` with:

    ``genes``, ``groups``
        The network's genes (rows and columns of every matrix) and groups.
    ``weights``
        ``{group: csr matrix}``, float32: each gene's ``top_k`` strongest edges, kept where
        either gene keeps it (symmetric but for ``form="directed"``).
    ``graph``
        ``{group: csr matrix}``: the ``n_neighbors`` graph the programmes come from.
    ``programmes``
        DataFrame, genes x groups: each gene's programme (``"0"`` the largest).
    ``neighbours``
        DataFrame: ``group``, ``gene``, ``rank`` (1 = strongest), ``neighbour``,
        ``weight``; ``n_neighbors`` rows per gene.
    ``hubs``
        DataFrame, genes x groups: how many genes count each gene among their
        ``n_neighbors`` strongest edges (with directed attention: the genes whose tokens
        attend most to it; Geneformer reads network hubs this way).
    ``difference``
        With ``compare``: DataFrame of the ``n_changed`` pairs with the largest
        ``|weight_b - weight_a|``: ``gene_1``, ``gene_2``, ``weight_<a>``, ``weight_<b>``,
        ``change``.
    ``params``
        ``method``, ``groupby``, ``form``, ``n_neighbors``, ``top_k``, ``resolution``,
        ``compare``, ``layer``, ``random_state`` (and ``model``).

    Raises
    ------
    sclcm.InputError
        An unknown method or form, no attention record (run :func:`sclcm.tl.attention`
        first), a group with no cells, ``compare`` naming groups not computed, genes not in
        ``var_names`` (or the vocabulary), negative or NaN counts.

    Examples
    --------
    >>> sclcm.tl.attention(adata, groupby="condition")          # doctest: +SKIP
    >>> sclcm.tl.gene_network(adata, compare=("ctrl", "stim"))  # doctest: +SKIP
    >>> adata.uns["sclcm_network_attention"]["difference"].head()  # doctest: +SKIP
    """
    if method not in METHODS:
        msg = f"method must be one of {METHODS}, not {method!r}."
        raise InputError(msg)
    check_tool_input(adata, layer, copy=copy)
    _check_counts(n_neighbors=n_neighbors, top_k=top_k, n_changed=n_changed)
    key_added = key_added or f"sclcm_network_{method}"
    params: dict[str, Any] = {"method": method, "groupby": groupby, "n_neighbors": n_neighbors,
                              "top_k": top_k, "resolution": resolution,
                              "layer": layer, "random_state": random_state}
    start = logg.info(f"gene network from {method}")
    if method == "attention":
        names, group_names, weights = _attention_weights(adata, attention_key, form, groupby,
                                                         groups, genes)
        params.update(form=form, attention_key=attention_key)
    else:
        grouping = Groups.of(adata, groupby, groups)
        group_names = grouping.names
        if method == "coexpression":
            names, cols = kept_genes(adata, genes)
            weights = coexpression(adata, grouping, cols, layer=layer)
        else:
            net = get_model(model, device=device)
            dev = next(net.parameters()).device
            precision = precision_for(precision, dev)
            cells = CellTokens.prepare(adata, net.tokenizer, layer=layer)
            names, cols = kept_genes(adata, genes, cells)
            weights = _embedding_weights(net, cells, grouping, cols, batch_size=batch_size,
                                         device=dev, precision=precision)
            params.update(model=_model_id(model), precision=precision)
    if compare is not None:
        compare = _check_compare(compare, group_names)
        params["compare"] = list(compare)
    record: dict[str, Any] = {"genes": names, "groups": np.asarray(group_names, dtype=str),
                              "weights": {}, "graph": {}}
    programmes, hubs, tables = {}, {}, []
    for name, w in zip(group_names, weights, strict=True):
        np.fill_diagonal(w, np.nan)
        record["weights"][name] = top_edges(w, top_k, symmetric=form == "symmetric")
        graph = top_edges(np.where(w > 0, w, np.nan), n_neighbors, symmetric=True)
        record["graph"][name] = graph
        programmes[name] = leiden_programmes(graph, resolution=resolution, seed=random_state)
        table = neighbour_table(w, names, n_neighbors)
        hubs[name] = table["neighbour"].value_counts().reindex(names, fill_value=0).to_numpy()
        tables.append(table.assign(group=name))
    index = pd.Index(names, name="gene")
    record["programmes"] = pd.DataFrame(programmes, index=index)
    record["hubs"] = pd.DataFrame(hubs, index=index)
    record["neighbours"] = pd.concat(tables, ignore_index=True)[
        ["group", "gene", "rank", "neighbour", "weight"]]
    if compare is not None:
        a, b = (group_names.index(g) for g in compare)
        record["difference"] = difference(weights[a], weights[b], names, compare, n_changed)
    record["params"] = {k: v for k, v in params.items() if v is not None}
    adata = output_object(adata, copy=copy)
    adata.uns[key_added] = record
    logg.info("    finished", time=start)
    logg.hint(f"added uns[{key_added!r}]")
    return adata if copy else None


def _check_compare(compare: Sequence[str], groups: list[str]) -> tuple[str, str]:
    pair = tuple(str(g) for g in compare) if not isinstance(compare, str) else (compare,)
    if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(groups):
        msg = f"compare= must name two different groups among {groups}, not {compare!r}."
        raise InputError(msg)
    return pair  # type: ignore[return-value]


def _attention_weights(adata: AnnData, key: str, form: str, groupby: str | None,
                       groups: Sequence[str] | None, genes: Sequence[str] | None
                       ) -> tuple[np.ndarray, list[str], list[np.ndarray]]:
    """Dense attention matrices of the record (0 where an edge was not kept)."""
    if form not in ("symmetric", "directed"):
        msg = f"form must be 'symmetric' or 'directed', not {form!r}."
        raise InputError(msg)
    rec = adata.uns.get(key)
    if not isinstance(rec, dict) or form not in rec:
        msg = (f"adata.uns[{key!r}] holds no attention: run sclcm.tl.attention(adata, "
               f"key_added={key!r}) first.")
        raise InputError(msg)
    had = rec.get("params", {}).get("groupby")
    if groupby is not None and groupby != had:
        msg = (f"uns[{key!r}] was computed with groupby={had!r}, not {groupby!r}: run "
               f"sclcm.tl.attention(adata, groupby={groupby!r}) first.")
        raise InputError(msg)
    names = [str(g) for g in rec["groups"]]
    chosen = names if groups is None else [str(g) for g in groups]
    missing = [g for g in chosen if g not in names]
    if missing:
        msg = f"Groups {missing} are not in uns[{key!r}] (it has {names})."
        raise InputError(msg)
    all_genes = pd.Index(np.asarray(rec["genes"]).astype(str))
    cols = np.arange(len(all_genes))
    if genes is not None:
        cols = all_genes.get_indexer(list(genes))
        if (cols < 0).any():
            msg = (f"genes not in uns[{key!r}]['genes']: "
                   f"{[g for g, c in zip(genes, cols, strict=True) if c < 0][:10]}.")
            raise InputError(msg)
    dense = [rec[form][g][cols][:, cols].toarray().astype(np.float64) for g in chosen]
    return np.asarray(all_genes[cols]), chosen, dense


def coexpression(adata: AnnData, groups: Groups, cols: np.ndarray, *,
                 layer: str | None = None) -> list[np.ndarray]:
    """Pearson correlation of ``log1p(counts per 10,000)`` between the genes ``cols``, per
    group, streamed over row blocks (NaN for genes constant in a group).

    Cells' totals are over all genes, as ``sc.pp.normalize_total`` takes them; cells with
    no counts are left out.
    """
    G, n_groups = len(cols), len(groups.names)
    n = np.zeros(n_groups)
    s = np.zeros((n_groups, G))
    ss = np.zeros((n_groups, G, G))
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    for first, stop, block in iter_row_blocks(adata, layer, block_size=2048,
                                              desc="co-expression"):
        values = stored_values(block)
        if values.size and not (np.isfinite(values).all() and (values >= 0).all()):
            msg = (f"{where} has NaN, infinite or negative values (cells {first}..{stop - 1}): "
                   "co-expression reads counts; pass layer= the raw counts.")
            raise InputError(msg)
        total = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
        sub = block[:, cols]
        y = np.asarray(sub.toarray() if sparse.issparse(sub) else sub, dtype=np.float64)
        code = groups.codes[first:stop]
        ok = (total > 0) & (code >= 0)
        y = np.log1p(y[ok] * (TARGET_SUM / total[ok, None]))
        for g in np.unique(code[ok]):
            yg = y[code[ok] == g]
            n[g] += len(yg)
            s[g] += yg.sum(0)
            ss[g] += yg.T @ yg
    out = []
    for g, name in enumerate(groups.names):
        if n[g] < 2:
            msg = f"Group {name!r} has {int(n[g])} cells with counts; co-expression needs 2."
            raise InputError(msg)
        mean = s[g] / n[g]
        cov = ss[g] / n[g] - np.outer(mean, mean)
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = cov / np.outer(sd, sd)
        r[(sd == 0)[:, None] | (sd == 0)[None, :]] = np.nan
        out.append(np.clip(r, -1, 1))
    return out


def _embedding_weights(model: CellModel, cells: CellTokens, groups: Groups, cols: np.ndarray,
                       *, batch_size: int | None, device: torch.device,
                       precision: str) -> list[np.ndarray]:
    """Cosine of the genes' contextual embeddings per group (NaN for unseen genes)."""
    import torch

    G, d = len(cols), model.config.d_model
    index = torch.from_numpy(token_index(cells, cols, model.config.vocab_size)).to(device)
    sums = torch.zeros(len(groups.names) * G, d, dtype=torch.float64, device=device)
    counts = torch.zeros(len(groups.names) * G, dtype=torch.float64, device=device)
    n_prefix = 2 if model.config.depth_tokens else 0
    for inputs, group in cell_passes(model, cells, groups, batch_size=batch_size,
                                     device=device, precision=precision,
                                     desc="gene embeddings"):
        res = model(**inputs, heads=False)
        gene = index[inputs["gene_ids"]]
        rows = input_rows(res["offsets"], inputs["offsets"], n_prefix)
        sel = gene >= 0
        cell = torch.repeat_interleave(group, inputs["offsets"].diff())[sel]
        flat = cell * G + gene[sel]
        sums.index_add_(0, flat, res["last_hidden_state"][rows[sel]].double())
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    means = (sums / counts[:, None]).view(len(groups.names), G, d).cpu().numpy()
    unit = means / np.linalg.norm(means, axis=2, keepdims=True)
    return [u @ u.T for u in unit]


def leiden_programmes(graph: sparse.csr_matrix, *, resolution: float, seed: int
                      ) -> pd.Categorical:
    """Leiden communities of a gene graph, named ``"0"``, ``"1"``, ... by decreasing size."""
    import anndata as ad
    import scanpy as sc

    from ..metrics import _require_igraph

    _require_igraph()
    tmp = ad.AnnData(obs=pd.DataFrame(index=np.arange(graph.shape[0]).astype(str)))
    sc.tl.leiden(tmp, adjacency=graph, resolution=resolution, flavor="igraph",
                 n_iterations=-1, directed=False, random_state=seed, key_added="p",
                 use_weights=True)
    labels = tmp.obs["p"].astype(str).to_numpy()
    sizes = pd.Series(labels).value_counts(sort=False)
    order = sorted(sizes.index, key=lambda c: (-sizes[c], int(c)))
    rename = {c: str(i) for i, c in enumerate(order)}
    return pd.Categorical([rename[c] for c in labels], categories=[str(i) for i in
                                                                   range(len(order))])


def neighbour_table(w: np.ndarray, names: np.ndarray, k: int) -> pd.DataFrame:
    """Each gene's ``k`` strongest edges of ``w`` (NaN = none), strongest first."""
    filled = np.where(np.isfinite(w), w, -np.inf)
    k = min(k, w.shape[0] - 1)
    order = np.argsort(-filled, axis=1, kind="stable")[:, :k]
    weight = np.take_along_axis(filled, order, axis=1)
    ok = np.isfinite(weight)
    rows = np.nonzero(ok)[0]
    return pd.DataFrame({"gene": names[rows], "rank": np.nonzero(ok)[1] + 1,
                         "neighbour": names[order[ok]],
                         "weight": weight[ok].astype(np.float32)})


def difference(w_a: np.ndarray, w_b: np.ndarray, names: np.ndarray, groups: tuple[str, str],
               n: int) -> pd.DataFrame:
    """The ``n`` gene pairs whose weight changes most from group ``a`` to ``b``."""
    change = w_b - w_a
    i, j = np.triu_indices(len(names), k=1)
    c = change[i, j]
    ok = np.flatnonzero(np.isfinite(c))
    top = ok[np.argsort(-np.abs(c[ok]), kind="stable")[:n]]
    a, b = groups
    return pd.DataFrame({"gene_1": names[i[top]], "gene_2": names[j[top]],
                         f"weight_{a}": w_a[i[top], j[top]].astype(np.float32),
                         f"weight_{b}": w_b[i[top], j[top]].astype(np.float32),
                         "change": c[top].astype(np.float32)})
