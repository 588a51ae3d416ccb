"""sclcm.tl.embed: cell (and gene) embeddings of a model, written into the AnnData."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from .. import logging as logg
from ._cells import CellTokens, check_tool_input, output_object
from ._forward import Budget, autocast, input_rows, plan_batches, precision_for
from ._keys import EmbeddingKeys
from ._model_ref import DEFAULT_MODEL, get_model

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from ..models import CellModel

#: Cells per block read from the AnnData and tokenized at once.
BLOCK_CELLS = 2048
#: Most tokens per block (scBERT's panel puts ~17k tokens in every cell).
BLOCK_TOKENS = 8_388_608


def embed(adata: AnnData, model: str | Path | CellModel | None = None, *,
          layer: str | None = None, batch_size: int | None = None,
          key_added: str = "X_sclcm", gene_embeddings: bool = False,
          orthologs: str = "one2one", device: str | torch.device | None = None,
          precision: str | None = None, copy: bool = False) -> AnnData | None:
    """Embed every cell of ``adata`` with a single-cell foundation model.

    The cells are read in blocks (``backed="r"`` works, in memory that does not grow with
    the number of cells), tokenized with the model's own tokenizer, and run through the
    model in inference mode (bf16 autocast on CUDA, float32 elsewhere). Within a block,
    cells are sorted by length and grouped into forward passes by a token budget, so that
    long cells do not exhaust memory; the output keeps the order of ``adata``.

    Parameters
    ----------
    adata
        Cells x genes, in memory or ``backed="r"``; genes as symbols or Ensembl IDs (see
        :func:`sclcm.genes.resolve`), human or mouse (mapped through orthologs onto the
        model's species, as ``orthologs`` says).
    model
        ``None`` for the default shipped model (:data:`sclcm.tl.DEFAULT_MODEL`), a shipped
        model's name (:func:`sclcm.tl.shipped_models`), a directory written by
        :meth:`~sclcm.models.CellModel.save_pretrained`, or a
        :class:`~sclcm.models.CellModel` with its tokenizer attached.
    layer
        Read ``adata.layers[layer]`` instead of ``adata.X``. What it must hold depends on
        the model's family (see Notes).
    batch_size
        Cells per forward pass; ``None`` sizes passes by tokens (16,384 padded tokens and
        2^26 attention scores per pass on CPU, 131,072 and 2^30 on CUDA).
    key_added
        ``obsm[key_added]`` receives the cell embeddings; ``uns[base]`` the record and
        ``varm[f"{base}_gene_embedding"]`` the gene embeddings, ``base`` being
        ``key_added`` without a leading ``"X_"``. The default writes ``obsm["X_sclcm"]``,
        ``uns["sclcm"]`` and ``varm["sclcm_gene_embedding"]``.
    gene_embeddings
        Also write each gene's contextual embedding: the mean of its token's last hidden
        state over the cells whose input holds the token (summed block by block, so
        memory does not grow with the cells).
    orthologs
        For data of another species than the model's vocabulary: ``"one2one"`` maps only
        genes with a one-to-one ortholog; ``"all"`` also one-to-many and many-to-many
        orthologs, each gene's count copied onto every ortholog and several genes summed
        onto a shared one (why: ``docs/cross_species.md``). Ignored for data of the
        model's species.
    device
        ``"cpu"``, ``"cuda"``, ...; default :attr:`sclcm.settings.device`. A
        ``CellModel`` given without ``device`` runs where it is.
    precision
        ``"float32"`` or ``"bfloat16"`` (autocast: matrix products in bf16); default bf16
        on CUDA, float32 elsewhere. On a CPU with native bf16 (AVX512-BF16, AMX),
        ``"bfloat16"`` is faster at a small cost in agreement with float32.
    copy
        Return a new AnnData with the results instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the new AnnData when ``copy=True``. Sets:

    ``obsm[key_added]``
        float32, ``n_obs x d_model``: the model's cell embedding (its pooling: ``<cls>``
        or the mean over gene tokens). Cells with no count on any of the model's genes
        get a row of NaN (a warning gives their number).
    ``varm[f"{base}_gene_embedding"]``
        With ``gene_embeddings=True``: float32, ``n_vars x d_model``; NaN for genes outside
        the vocabulary and genes no cell expressed (columns naming one gene share its row).
    ``uns[base]``
        ``model`` (shipped name or directory), ``tokenizer`` (family and options),
        ``config`` (shape, pooling, parameters), ``gene_coverage`` (share of genes that
        reach a token), ``count_coverage`` (share of counts on those genes),
        ``n_genes_in_vocab``, ``n_empty_cells``, ``sclcm_version``, ``params``
        (``layer``, ``batch_size``, ``gene_embeddings``, ``key_added``, ``orthologs``,
        ``device``, ``dtype``), and for data of another species ``orthologs``: the rule
        and how many of the data's genes and counts reach the vocabulary under it
        (:meth:`sclcm.genes.SpeciesMap.coverage`; also logged).

    Raises
    ------
    sclcm.InputError
        An empty AnnData, a missing layer, no gene of the model's vocabulary, NaN or
        negative values, or normalized data for a model that reads counts.
    ValueError
        An unknown model name; ``copy=True`` on a backed AnnData (it would load ``X``
        into memory: use ``copy=False``, or ``adata.to_memory()`` first).

    Notes
    -----
    **Counts or normalized data.** Only an encoding that is the same for any strictly
    increasing transform of each cell's values (``normalize_total``, ``log1p``, both)
    accepts normalized data. Of the four families, that is scGPT's per-cell quantile bins
    alone. Geneformer's ranks (count / total / corpus median) and scBERT's levels
    (log2 of counts per 10,000) are unchanged by ``normalize_total`` but not by ``log1p``,
    and the values cannot tell the two apart; scFoundation reads each cell's total counts
    as its read-depth tokens, and continuous scGPT computes log1p itself. Those four refuse
    non-integer values with an :class:`~sclcm.InputError` that says why.

    **Backed AnnData.** On ``backed="r"``, ``copy=False`` writes ``obsm``, ``varm`` and
    ``uns`` to the object in memory, as anndata allows; the file is not changed (it is
    open read-only). Keep them with e.g. ``adata.obsm["X_sclcm"]`` or
    ``adata.to_memory().write_h5ad(...)``. Memory holds one block of cells plus the output,
    ``n_obs x d_model`` float32.

    **Failure.** Nothing is written to ``adata`` until every cell is embedded, so an error
    leaves it as it was. A view of a backed AnnData is refused before any work (results
    cannot be written to it without loading its ``X``): load the subset with
    ``.to_memory()``, or embed the whole backed object and subset ``obsm``.

    **Determinism.** A cell's embedding does not depend on the other cells: not on their
    order, on which cells share its forward pass, on ``batch_size`` or on the block size.
    Within float32 arithmetic it agrees to 1e-4 (absolute and relative): a differently
    shaped pass may sum its matrix products in another order. Sparse input of any format
    (CSC, ``csr_array``, unsorted or duplicated entries, which are summed) and any integer
    or float dtype give the same result.

    Examples
    --------
    >>> import scanpy as sc, sclcm
    >>> adata = sc.read_h5ad("pbmc3k_raw.h5ad")                 # doctest: +SKIP
    >>> sclcm.tl.embed(adata)                                    # doctest: +SKIP
    >>> sc.pp.neighbors(adata, use_rep="X_sclcm")                # doctest: +SKIP
    >>> sc.tl.umap(adata)                                        # doctest: +SKIP
    """
    keys = EmbeddingKeys.of(key_added)
    _check_adata(adata, layer, batch_size=batch_size, copy=copy)
    net = get_model(model, device=device)
    dev = next(net.parameters()).device
    precision = precision_for(precision, dev)
    cells = CellTokens.prepare(adata, net.tokenizer, layer=layer, orthologs=orthologs)
    model_id = _model_id(model)
    start = logg.info(f"embedding {adata.n_obs} cells with {model_id} "
                      f"({net.config.tokenizer}, {net.config.n_layers} layers x "
                      f"{net.config.d_model}) on {dev}")
    result = _run(net, cells, batch_size=batch_size, gene_embeddings=gene_embeddings,
                  device=dev, precision=precision)
    n_empty = result.n_empty
    cells.warn_low_coverage()
    if n_empty:
        # NaN rows stop sc.pp.neighbors (scikit-learn refuses NaN): say how to drop them
        logg.warning(
            f"{n_empty} of {adata.n_obs} cells have no count on any gene of the model's "
            f"vocabulary: their rows of obsm[{keys.obsm!r}] are NaN, which sc.pp.neighbors "
            f"refuses. Drop them before neighbors: adata = adata[~np.isnan(adata.obsm["
            f"{keys.obsm!r}]).any(axis=1)].copy() (or sc.pp.filter_cells(adata, "
            "min_counts=1) first, where they have no counts at all).")

    record = _record(net, cells, model_id=model_id, n_empty=n_empty, layer=layer,
                     batch_size=batch_size, gene_embeddings=gene_embeddings,
                     key_added=key_added, device=dev, precision=precision,
                     orthologs=orthologs)
    genes = _per_column(result, cells) if gene_embeddings else None
    adata = output_object(adata, copy=copy)  # everything is computed: only now touch it
    adata.obsm[keys.obsm] = result.cells
    if genes is not None:
        adata.varm[keys.varm] = genes
    adata.uns[keys.uns] = record
    written = [f"obsm[{keys.obsm!r}]", f"uns[{keys.uns!r}]"]
    if genes is not None:
        written.insert(1, f"varm[{keys.varm!r}]")
    logg.info("    finished", time=start)
    logg.hint("added " + ", ".join(written))
    return adata if copy else None


@dataclass
class _Result:
    cells: np.ndarray  # n_obs x d, float32, NaN rows for empty cells
    n_empty: int
    gene_sums: np.ndarray | None = None  # vocab x d, float64
    gene_counts: np.ndarray | None = None  # vocab, int64


def _check_adata(adata: AnnData, layer: str | None, *, batch_size: int | None,
                 copy: bool) -> None:
    """What can be told before loading a model."""
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        msg = f"batch_size must be a positive number of cells or None, not {batch_size!r}."
        raise ValueError(msg)
    check_tool_input(adata, layer, copy=copy)


def _run(model: CellModel, cells: CellTokens, *, batch_size: int | None,
         gene_embeddings: bool, device: torch.device, precision: str) -> _Result:
    """Cell embeddings of every cell (and the per-token sums for gene embeddings)."""
    import torch

    cfg = model.config
    out = np.full((cells.adata.n_obs, cfg.d_model), np.nan, dtype=np.float32)
    budget = Budget.for_device(device)
    n_prefix = 2 if cfg.depth_tokens else 0
    sums = counts = None
    n_empty = 0
    if gene_embeddings:
        # float32 on the device within a block, float64 across blocks (many cells)
        sums = np.zeros((cfg.vocab_size, cfg.d_model), dtype=np.float64)
        counts = np.zeros(cfg.vocab_size, dtype=np.int64)
        block_sums = torch.zeros(cfg.vocab_size, cfg.d_model, device=device)
        block_counts = torch.zeros(cfg.vocab_size, dtype=torch.long, device=device)
    max_len = cells.tokenizer.max_len or 0
    block = max(1, min(BLOCK_CELLS, BLOCK_TOKENS // max(max_len, 1)))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, precision):
            for first, batch, empty in cells.batches(block_size=block, desc="embedding"):
                keep = np.flatnonzero(~empty)
                n_empty += len(empty) - len(keep)
                for part in plan_batches(batch.lengths[keep], n_heads=cfg.n_heads,
                                         batch_size=batch_size, budget=budget):
                    rows = keep[part]
                    sub = batch.select(rows)
                    inputs = model.inputs(sub, device=device)
                    res = model(**inputs, heads=False)
                    out[first + rows] = res["cell_embedding"].float().cpu().numpy()
                    if gene_embeddings:
                        _add_tokens(res, inputs, cfg.n_special_tokens, n_prefix,
                                    block_sums, block_counts)
                if gene_embeddings:
                    sums += block_sums.double().cpu().numpy()
                    counts += block_counts.cpu().numpy()
                    block_sums.zero_()
                    block_counts.zero_()
    finally:
        model.train(was_training)
    return _Result(out, n_empty, sums, counts)


def _add_tokens(res: dict, inputs: dict, n_special: int, n_prefix: int,
                sums: torch.Tensor, counts: torch.Tensor) -> None:
    """Add each gene token's last hidden state to its gene's sum."""
    ids = inputs["gene_ids"]
    is_gene = ids >= n_special
    rows = input_rows(res["offsets"], inputs["offsets"], n_prefix)[is_gene]
    ids = ids[is_gene]
    sums.index_add_(0, ids, res["last_hidden_state"][rows].float())
    counts.index_add_(0, ids, ids.new_ones(ids.shape))


def _per_column(result: _Result, cells: CellTokens) -> np.ndarray:
    """Gene embedding per AnnData column (NaN where the gene has no token or was unseen)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (result.gene_sums / result.gene_counts[:, None]).astype(np.float32)
    cmap = cells.column_map
    out = np.full((len(cmap.slot), means.shape[1]), np.nan, dtype=np.float32)
    mapped = cmap.slot >= 0
    out[mapped] = means[cmap.token_ids[cmap.slot[mapped]]]
    if cells.expand is None:
        return out
    # orthologs="all": a column's genes are its orthologs; it gets the mean of those seen
    seen = ~np.isnan(out).any(axis=1)
    reach = cells.expand @ sparse.diags(seen.astype(np.float32))
    n = np.asarray(reach.sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        per_column = (reach @ np.nan_to_num(out)) / n[:, None]
    return np.where(n[:, None] > 0, per_column, np.nan).astype(np.float32)


def _model_id(model: Any) -> str:
    """The name or directory a model came from, for the record."""
    if model is None:
        return DEFAULT_MODEL
    if isinstance(model, str | Path):
        path = Path(model).expanduser()
        # a directory is recorded in full; a shipped model by its name
        return str(path.resolve()) if (path / "config.json").is_file() else str(model)
    return f"{type(model).__name__} object (not from a directory)"


def _record(model: CellModel, cells: CellTokens, *, model_id: str, n_empty: int,
            layer: str | None, batch_size: int | None, gene_embeddings: bool,
            key_added: str, device: torch.device, precision: str,
            orthologs: str = "one2one") -> dict[str, Any]:
    from .. import __version__

    cfg, tok = model.config, cells.tokenizer
    options = {k: v for k, v in tok.to_dict()["options"].items() if v is not None}
    params = {"layer": layer, "batch_size": batch_size, "gene_embeddings": gene_embeddings,
              "key_added": key_added, "orthologs": orthologs, "device": str(device),
              "dtype": precision if precision == "bfloat16" else str(
                  next(model.parameters()).dtype).removeprefix("torch.")}
    record = {
        "model": model_id,
        "tokenizer": {"name": tok.name, **options},
        "config": {"tokenizer": cfg.tokenizer, "n_layers": cfg.n_layers,
                   "d_model": cfg.d_model, "n_heads": cfg.n_heads, "pooling": cfg.pooling,
                   "vocab_size": cfg.vocab_size, "n_params": model.get_num_params()},
        "gene_coverage": cells.gene_coverage,
        "count_coverage": cells.count_coverage,
        "n_genes_in_vocab": int(cells.in_vocab.sum()),
        "n_empty_cells": n_empty,
        "sclcm_version": __version__,
        # None is left out: older anndata cannot write it to h5ad
        "params": {k: v for k, v in params.items() if v is not None},
    }
    species = cells.species_record()
    if species is not None:
        record["orthologs"] = species
    return record
