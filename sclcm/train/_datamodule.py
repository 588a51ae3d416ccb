"""The pretraining DataModule: tokenized streams -> resumable micro-batches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..data._module import CellDataModule
from ._resume import MicroBatchLoader

if TYPE_CHECKING:
    from ..data._module import Stream


class PretrainDataModule(CellDataModule):
    """:class:`~sclcm.data.CellDataModule` whose loaders yield micro-batches.

    The streams' blocks (tokenized in the DataLoader workers) are cut into micro-batches
    of at most ``max_tokens`` padded tokens, cells grouped by length
    (:class:`MicroBatchLoader`). The training loader's position is saved in checkpoints and
    restored on resume; with several ranks, each block is cut into as many micro-batches on
    every rank (the ranks read the same number of cells, but not of tokens).

    Parameters
    ----------
    train, val
        Tokenized streams (``stream.tokenize(tokenizer)``); ``val`` is read in order.
    max_tokens
        Token budget of a micro-batch.
    seed
        Seeds the order of micro-batches within a block.
    val_max_cells
        Read at most this many cells of ``val`` per validation.
    **kwargs
        :class:`~sclcm.data.CellDataModule` options (``num_workers``, ...).
    """

    def __init__(self, train: Stream, val: Stream | None = None, *, max_tokens: int,
                 seed: int = 0, val_max_cells: int | None = None, **kwargs: Any) -> None:
        super().__init__(train, val, **kwargs)
        self.max_tokens, self.seed, self.val_max_cells = int(max_tokens), int(seed), val_max_cells

    def _consumed(self) -> int:
        # Lightning's own count of this epoch's training batches, restored on resume
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _sync_max(self, n: int) -> int:
        strategy = self.trainer.strategy
        return int(strategy.reduce(torch.tensor(n, device=strategy.root_device),
                                   reduce_op="max"))

    def train_dataloader(self) -> MicroBatchLoader:  # type: ignore[override]
        world = self.trainer.world_size if self.trainer is not None else 1
        blocks = super().train_dataloader()
        loader = MicroBatchLoader(
            blocks, max_tokens=self.max_tokens, seed=self.seed, epoch=self._epoch,
            consumed=self._consumed if self.trainer is not None else None,
            sync_max=self._sync_max if world > 1 else None, world_size=world)
        blocks.epoch = loader.data_epoch  # a resumed loader may read ahead of the trainer
        return loader

    def val_dataloader(self) -> MicroBatchLoader | list:  # type: ignore[override]
        if self.val is None:
            return []
        return MicroBatchLoader(self._loader(self.val), max_tokens=self.max_tokens,
                                seed=self.seed, max_cells=self.val_max_cells)
