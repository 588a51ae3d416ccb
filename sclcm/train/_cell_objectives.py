"""Cell-level pretraining objectives: what the pooled cell embedding itself must hold.

A token objective (masked gene identity, bins or values) trains each token's state; nothing
in it asks the pooled cell embedding to keep what separates cells. Two objectives do:

- **reconstruction** (a bottleneck): a linear head reads the cell embedding alone and
  predicts the cell's expression over a fixed panel of genes, zeros included. The panel is
  the ``panel_size`` most variable genes of the training cells (Seurat's rule: dispersion
  of counts per 10,000, z-scored within 20 bins of mean expression, among genes detected
  in ``vocab.min_cells`` cells). Target: ``log1p(10,000 * counts / total counts)``, the
  total over all of the cell's genes; loss: mean squared error over the panel genes the
  cell's dataset measures (a gene its file lacks is missing, not zero). The head's bias
  starts at the training cells' mean target: from a zero bias the fastest way down the
  loss is to make the embedding constant across cells and use its common part as the bias
  (measured: the embedding's spread over cells fell to 5e-5 and the loss stalled at the
  mean-panel baseline).
- **contrastive**: two random gene subsets of each cell (each gene token kept with
  probability ``view_keep``, special tokens always, at least one gene) are embedded; the
  InfoNCE loss (SimCLR's NT-Xent, cosine similarity over ``temperature``) makes each view
  pick its twin among the ``2 n - 1`` other views of the micro-batch.

They compose with the family's token objective by weights (``objectives`` in the YAML).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..data import CellBlock
    from ..tokenizers import TokenBatch, Tokenizer

#: Counts per cell the reconstruction target is normalized to.
TARGET_SUM = 1e4
#: Bins of mean expression within which dispersions are z-scored (Seurat, scanpy).
N_DISPERSION_BINS = 20


# --- the panel ----------------------------------------------------------------------
class ExpressionMoments:
    """Running sums of counts per 10,000 (their squares, their log1p) per token id, over the
    cells whose dataset measures the gene (``n``: their number per token)."""

    def __init__(self, n_tokens: int) -> None:
        self.sum = np.zeros(n_tokens)
        self.sum_sq = np.zeros(n_tokens)
        self.log1p_sum = np.zeros(n_tokens)
        self.n = np.zeros(n_tokens)
        self.n_cells = 0

    def add(self, X, token_ids: np.ndarray) -> None:
        """Add the cells of CSR counts ``X`` whose columns have token ``token_ids`` (-1:
        none); the total of each cell is over all its columns."""
        X = X.tocsr()
        total = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
        rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        tok = token_ids[X.indices]
        hit = tok >= 0
        # duplicate entries (one gene twice) add up before squaring
        key = rows[hit].astype(np.int64) * len(self.sum) + tok[hit]
        key, inverse = np.unique(key, return_inverse=True)
        x = np.bincount(inverse, weights=X.data[hit].astype(np.float64), minlength=len(key))
        x *= TARGET_SUM / np.maximum(total[key // len(self.sum)], 1.0)
        np.add.at(self.sum, key % len(self.sum), x)
        np.add.at(self.sum_sq, key % len(self.sum), x * x)
        np.add.at(self.log1p_sum, key % len(self.sum), np.log1p(x))
        self.n[np.unique(token_ids[token_ids >= 0])] += X.shape[0]
        self.n_cells += X.shape[0]

    def log1p_mean(self, tokens: np.ndarray) -> np.ndarray:
        """Mean reconstruction target of each token over the cells that measure it."""
        return self.log1p_sum[tokens] / np.maximum(self.n[tokens], 1)


def choose_panel(moments: ExpressionMoments, candidates: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` most variable candidate tokens (ascending ids), by Seurat's normalized
    dispersion of counts per 10,000.

    >>> m = ExpressionMoments(4)
    >>> m.sum, m.sum_sq, m.n = np.array([0, 4., 4, 4]), np.array([0, 4., 40, 16]), np.full(4, 4)
    >>> choose_panel(m, np.array([1, 2, 3]), 2).tolist()
    [2, 3]
    """
    n = np.maximum(moments.n, 1)
    mean = moments.sum / n
    var = np.maximum(moments.sum_sq / n - mean**2, 0) * n / np.maximum(n - 1, 1)
    cand = np.asarray(candidates)
    cand = cand[mean[cand] > 0]
    if len(cand) <= size:
        return np.sort(cand)
    disp = np.log(np.maximum(var[cand], 1e-12) / mean[cand])
    log_mean = np.log1p(mean[cand])
    edges = np.linspace(log_mean.min(), log_mean.max(), N_DISPERSION_BINS + 1)
    bins = np.clip(np.digitize(log_mean, edges[1:-1]), 0, N_DISPERSION_BINS - 1)
    z = np.zeros_like(disp)
    for b in np.unique(bins):
        sel = bins == b
        sd = disp[sel].std(ddof=1) if sel.sum() > 1 else 0.0
        # a bin of one gene (or of equal dispersions) keeps its raw rank: z = 1, as scanpy
        z[sel] = (disp[sel] - disp[sel].mean()) / sd if sd > 0 else 1.0
    order = np.lexsort((cand, -z))  # ties by token id: the same panel on every run
    return np.sort(cand[order[:size]])


class PanelTargets:
    """The reconstruction target of each tokenized cell, from its block's raw counts.

    Adds ``extras["panel"]``: ``n_cells x len(panel)`` float32, ``log1p(1e4 * counts /
    total)``, NaN for panel genes the cell's dataset does not measure.

    Parameters
    ----------
    panel
        Token ids of the panel genes (``ModelConfig.recon_panel``).
    tokenizer
        The tokenizer whose column map places the block's genes in the vocabulary.
    stream
        The stream the blocks come from. An :class:`~sclcm.data.AnnDataStream` over
        several files puts their cells in the union of their genes; it tells which genes
        each cell's file measures. Without it (or for a Census, whose datasets share one
        gene space), every gene of the block counts as measured.
    """

    def __init__(self, panel: np.ndarray, tokenizer: Tokenizer, stream=None) -> None:
        self.panel = np.asarray(panel, dtype=np.int64)
        self.tokenizer = tokenizer
        self.stream = stream
        vocab_size = len(tokenizer.vocab)
        self._pos = np.full(vocab_size, -1, dtype=np.int64)
        self._pos[self.panel] = np.arange(len(self.panel))

    def __call__(self, block: CellBlock, batch: TokenBatch) -> TokenBatch:
        import pandas as pd

        cmap = block.column_map(self.tokenizer)
        col_tok = cmap.column_token_ids
        col_pos = np.where(col_tok >= 0, self._pos[np.maximum(col_tok, 0)], -1)
        rows = pd.Index(block.cell_ids).get_indexer(batch.cell_index)
        X = block.X[rows].tocsr()
        total = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        target = np.zeros((X.shape[0], len(self.panel)), dtype=np.float64)
        r = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        pos = col_pos[X.indices]
        hit = pos >= 0
        np.add.at(target, (r[hit], pos[hit]), X.data[hit])  # duplicates add up
        target = np.log1p(target * (TARGET_SUM / np.maximum(total, 1.0))[:, None])
        target[~self._measured(col_pos, batch.cell_index)] = np.nan
        return dataclasses.replace(batch, extras={**batch.extras,
                                                  "panel": target.astype(np.float32)})


    def _measured(self, col_pos: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
        """``n_cells x len(panel)``: whether each cell's source measures each panel gene."""
        measured = getattr(self.stream, "measured", None)
        offsets = getattr(self.stream, "offsets", None)
        if measured is None or offsets is None:
            cols = [np.arange(len(col_pos))]
            which = np.zeros(len(cell_ids), dtype=np.int64)
        else:
            cols = [measured(i) for i in range(len(offsets) - 1)]
            which = np.searchsorted(offsets, cell_ids, side="right") - 1
        masks = np.zeros((len(cols), len(self.panel)), dtype=bool)
        for i, c in enumerate(cols):
            pos = col_pos[c]
            masks[i, pos[pos >= 0]] = True
        return masks[which]


# --- views --------------------------------------------------------------------------
def gene_subset_views(batch: TokenBatch, keep: float, rng: np.random.Generator, *,
                      n_special: int) -> TokenBatch:
    """Two random gene subsets of every cell: cells ``0..n-1`` are the first views, ``n..2n-1``
    the second ones (extras repeated). Each gene token stays with probability ``keep``,
    special tokens always, and every view keeps at least one gene of its cell."""
    from ..tokenizers import TokenBatch

    n, lengths = batch.n_cells, batch.lengths
    cell = np.repeat(np.arange(n), lengths)
    is_gene = batch.gene_ids >= n_special
    parts = []
    for _ in range(2):
        sel = ~is_gene | (rng.random(len(cell)) < keep)
        # a view left with no gene keeps its cell's first gene
        genes_kept = np.bincount(cell[sel & is_gene], minlength=n)
        first_gene = np.full(n, -1)
        gene_pos = np.flatnonzero(is_gene)
        first_gene[cell[gene_pos[::-1]]] = gene_pos[::-1]
        lost = (genes_kept == 0) & (first_gene >= 0)
        sel[first_gene[lost]] = True
        parts.append(sel)
    offsets = np.zeros(2 * n + 1, dtype=np.int64)
    np.cumsum(np.concatenate([np.bincount(cell[s], minlength=n) for s in parts]),
              out=offsets[1:])
    return TokenBatch(np.concatenate([batch.gene_ids[s] for s in parts]),
                      np.concatenate([batch.values[s] for s in parts]), offsets,
                      np.concatenate([batch.cell_index, batch.cell_index]),
                      {k: np.concatenate([v, v]) for k, v in batch.extras.items()})


# --- losses -------------------------------------------------------------------------
def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Summed squared error over the finite targets, and their number."""
    finite = torch.isfinite(target)
    err = (pred.float() - torch.nan_to_num(target.float())) ** 2
    return (err * finite).sum(), finite.sum()


def info_nce(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean NT-Xent loss of ``2 n`` embeddings whose halves are twin views.

    Every view's positive is its twin; the other ``2 n - 2`` views are negatives; cosine
    similarity divided by ``temperature``.
    """
    n = z.shape[0] // 2
    z = F.normalize(z.float(), dim=-1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    twin = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, twin)
