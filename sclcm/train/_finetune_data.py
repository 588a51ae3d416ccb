"""The fine-tuning loaders: labelled cells in memory -> resumable micro-batches.

The reference's tokens are held in memory (a reference is thousands to a few hundred
thousand cells). Each epoch shuffles the training cells by ``(seed, epoch)`` and, with
several ranks (DDP), gives rank ``r`` every ``world``-th of them; blocks are cut into
micro-batches by :class:`~sclcm.train.MicroBatchLoader`, whose position is saved in every
checkpoint, so a killed run resumes on the very batches it would have trained on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import numpy as np

from ..tokenizers import TokenBatch
from ._datamodule import PretrainDataModule
from ._resume import MicroBatchLoader

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: Cells per block handed to the micro-batcher.
BLOCK = 1024


class _Blocks:
    """Blocks of ``tokens``: the cells shuffled per epoch (``shuffle``) or in order, this
    rank's share of them."""

    def __init__(self, tokens: TokenBatch, *, seed: int, shuffle: bool,
                 rank: int = 0, world: int = 1) -> None:
        self.tokens, self.seed, self.shuffle = tokens, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch: Callable[[], int] = lambda: 0

    def __iter__(self) -> Iterator[TokenBatch]:
        n = self.tokens.n_cells
        order = (np.random.default_rng([self.seed, int(self.epoch())]).permutation(n)
                 if self.shuffle else np.arange(n))
        order = order[self.rank::self.world]
        for i in range(0, len(order), BLOCK):
            yield self.tokens.select(order[i:i + BLOCK])


class FinetuneData(L.LightningDataModule):
    """Training and validation micro-batches of in-memory tokens.

    The training loader is resumable; validation reads every validation cell on every
    rank, in order, so that each rank computes the same macro-F1 and keeps the same best
    step.
    """

    def __init__(self, train: TokenBatch, val: TokenBatch, *, max_tokens: int,
                 seed: int) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.max_tokens, self.seed = int(max_tokens), int(seed)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    # the same data position and DDP step counts as pretraining's (they read self.trainer)
    _consumed = PretrainDataModule._consumed
    _sync_max = PretrainDataModule._sync_max

    def train_dataloader(self) -> MicroBatchLoader:
        t = self.trainer
        world, rank = (t.world_size, t.global_rank) if t is not None else (1, 0)
        blocks = _Blocks(self.train, seed=self.seed, shuffle=True, rank=rank, world=world)
        loader = MicroBatchLoader(
            blocks, max_tokens=self.max_tokens, seed=self.seed, epoch=self._epoch,
            consumed=self._consumed if t is not None else None,
            sync_max=self._sync_max if world > 1 else None, world_size=world)
        blocks.epoch = loader.data_epoch  # a resumed loader may read ahead of the trainer
        return loader

    def val_dataloader(self) -> MicroBatchLoader:
        return val_batches(self.val, self.max_tokens)


def drop_genes(tokens: TokenBatch, rate: float, rng: np.random.Generator, *,
               n_special: int) -> TokenBatch:
    """``tokens`` with each gene token of each cell left out with probability ``rate``.

    Special tokens (ids below ``n_special``: ``<cls>``, ``<eos>``) stay, and so does each
    cell's first gene, so that no cell is left without one. The remaining tokens keep their
    order: a rank tokenizer's cell then reads as that cell would with those genes
    unmeasured, which is how a query of another technology or species (through orthologs)
    differs from the reference.
    """
    ids = tokens.gene_ids
    gene = ids >= n_special
    first_gene = np.zeros(len(ids), dtype=bool)
    n = tokens.n_cells
    cell = np.repeat(np.arange(n), tokens.lengths)
    gene_pos = np.flatnonzero(gene)
    # the first gene token of every cell that has one
    _, first = np.unique(cell[gene_pos], return_index=True)
    first_gene[gene_pos[first]] = True
    keep = ~gene | first_gene | (rng.random(len(ids)) >= rate)
    lengths = np.bincount(cell[keep], minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenBatch(ids[keep], tokens.values[keep], offsets, tokens.cell_index,
                      dict(tokens.extras))


def val_batches(tokens: TokenBatch, max_tokens: int) -> MicroBatchLoader:
    """Micro-batches of every cell of ``tokens``, in a fixed order."""
    return MicroBatchLoader(_Blocks(tokens, seed=0, shuffle=False), max_tokens=max_tokens)
