"""Real-data inputs shared by the model tests, built once per session (no tests here).

Cells are taken from pbmc3k so that sequence lengths differ a lot: the shortest and longest
cells plus a random draw.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from conftest import PBMC3K, _load

from sclcm.genes import GeneVocab, resolve
from sclcm.tokenizers import (
    GeneformerTokenizer,
    ScBERTTokenizer,
    ScFoundationTokenizer,
    ScGPTTokenizer,
)

N_EXTREME, N_RANDOM = 4, 16


@cache
def pbmc():
    """``(adata, report, vocab, medians)`` of pbmc3k; ``adata`` is shared: never modify it."""
    adata = _load(PBMC3K)
    report = resolve(adata, count_coverage=False)
    vocab = GeneVocab.from_report(report)
    medians = GeneformerTokenizer(vocab).fit(adata, report=report).medians
    return adata, report, vocab, medians


@cache
def cell_rows() -> np.ndarray:
    """Rows of the shortest and longest cells and a random draw, in a mixed order."""
    adata = pbmc()[0]
    n_genes = np.diff(adata.X.indptr)
    order = np.argsort(n_genes)
    rng = np.random.default_rng(0)
    middle = rng.choice(order[N_EXTREME:-N_EXTREME], N_RANDOM, replace=False)
    rows = np.concatenate([order[:N_EXTREME], order[-N_EXTREME:], middle])
    return rng.permutation(rows)


@cache
def panel_vocab() -> GeneVocab:
    """The 200 genes with most counts: scBERT puts every panel gene in every cell."""
    adata, report, vocab, _ = pbmc()
    ids = vocab.lookup(adata, report=report)
    counts = np.bincount(ids[ids >= 0], weights=np.asarray(adata.X.sum(0)).ravel()[ids >= 0],
                         minlength=len(vocab))
    top = np.sort(np.argsort(-counts)[:200])
    return GeneVocab(vocab.decode(top), species=vocab.species)


def tokenizer(name: str, **kwargs):
    """A tokenizer of family ``name`` over the pbmc3k vocabulary."""
    _, _, vocab, medians = pbmc()
    if name == "geneformer":
        return GeneformerTokenizer(vocab, medians, **kwargs)
    if name == "scgpt":
        return ScGPTTokenizer(vocab, **kwargs)
    if name == "scbert":
        return ScBERTTokenizer(panel_vocab(), **kwargs)
    return ScFoundationTokenizer(vocab, **kwargs)


@cache
def _tokens(name: str, n_cells: int, items: tuple):
    adata, report, _, _ = pbmc()
    tok = tokenizer(name, **dict(items))
    sub = adata[cell_rows()[:n_cells]]
    return tok, tok.tokenize(sub, report=report)


def tokens(name: str, n_cells: int = N_EXTREME * 2 + N_RANDOM, **kwargs):
    """``(tokenizer, TokenBatch)`` of the test cells (cached; do not modify)."""
    return _tokens(name, n_cells, tuple(sorted(kwargs.items())))


def random_mask(batch, fraction: float, seed: int = 0) -> torch.Tensor:
    """Mask ``fraction`` of the gene tokens (never a cell's first token)."""
    g = torch.Generator().manual_seed(seed)
    masked = torch.rand(batch.n_tokens, generator=g) < fraction
    masked[torch.from_numpy(batch.offsets[:-1])] = False
    return masked
