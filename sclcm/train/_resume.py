"""A resumable loader of micro-batches: the data position is part of every checkpoint.

The streams' order is a function of ``(seed, epoch)`` (and of the rank and the DataLoader
workers), and cutting a block into micro-batches is a function of the block and
``(seed, epoch, block number)``. So the position in the data is just
``(epoch, micro-batches consumed)``: a resumed run re-reads the epoch from its start and
skips what the killed run had trained on, and sees the very same remaining batches.

Lightning 2.x saves the ``state_dict()`` of training loaders that have one (the fit loop's
``CombinedLoader._state_dicts``, stored under ``loops.fit_loop.state_dict.combined_loader``)
and calls ``load_state_dict`` before it iterates them again on resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import logging as logg
from ._batching import MicroBatch, group_by_length, split_further

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from ..tokenizers import TokenBatch


class MicroBatchLoader:
    """Micro-batches of the blocks of a loader, resumable mid-epoch.

    Parameters
    ----------
    blocks
        An iterable of :class:`~sclcm.tokenizers.TokenBatch` blocks whose order depends
        only on the epoch (a DataLoader over a tokenized stream, or the stream itself); an
        ``sclcm.data._module.EpochLoader`` should read :meth:`data_epoch`.
    max_tokens
        Token budget of a micro-batch (see :func:`~sclcm.train.micro_batches`).
    seed
        Seeds the order of the micro-batches within each block.
    epoch
        Returns the epoch about to be iterated (the trainer's ``current_epoch``); a resumed
        loader reads the checkpoint's instead.
    consumed
        Returns how many micro-batches of the current epoch training has consumed (Lightning
        fetches one batch ahead, so the count of yielded batches would be one too many);
        ``None``: the yielded ones.
    sync_max
        Returns the largest of a number over all ranks (DDP): every rank cuts each block
        into as many micro-batches as the rank that needs most, so all ranks take the
        same number of steps.
    world_size
        Recorded in the state: a resumed run must have the same ranks.
    max_cells
        Stop after this many cells (e.g. for a held-out set).
    """

    def __init__(self, blocks: Iterable[TokenBatch], *, max_tokens: int, seed: int = 0,
                 epoch: Callable[[], int] | None = None,
                 consumed: Callable[[], int] | None = None,
                 sync_max: Callable[[int], int] | None = None, world_size: int = 1,
                 max_cells: int | None = None) -> None:
        if max_tokens < 1:
            msg = f"max_tokens must be positive, not {max_tokens}."
            raise ValueError(msg)
        self.blocks, self.max_tokens, self.seed = blocks, int(max_tokens), int(seed)
        self.epoch = epoch or (lambda: 0)
        self.consumed, self.sync_max = consumed, sync_max
        self.world_size, self.max_cells = int(world_size), max_cells
        self._resume: dict[str, Any] | None = None
        self._current_epoch: int | None = None
        self._yielded, self._finished = 0, False

    def data_epoch(self) -> int:
        """The epoch being read (which a resumed run may set ahead of the trainer's)."""
        return self._current_epoch if self._current_epoch is not None else int(self.epoch())

    def __iter__(self) -> Iterator[MicroBatch]:
        epoch, skip = self._start()
        self._current_epoch, self._yielded, self._finished = epoch, skip, False
        yield from self._micro_batches(epoch, skip)
        self._finished = True

    def _micro_batches(self, epoch: int, skip: int) -> Iterator[MicroBatch]:
        index, cells = 0, 0
        for b, block in enumerate(self.blocks):
            if self.max_cells is not None and cells + block.n_cells > self.max_cells:
                block = block.select(np.arange(self.max_cells - cells))
            groups = group_by_length(block.lengths, self.max_tokens)
            if self.sync_max is not None:
                groups = split_further(groups, int(self.sync_max(len(groups))))
            order = np.random.default_rng([self.seed, epoch, b]).permutation(len(groups))
            for i in order:
                if index >= skip:  # cells before are those the resumed run trained on
                    self._yielded += 1
                    yield MicroBatch(block.select(groups[i]), epoch, index)
                index += 1
            cells += block.n_cells
            if self.max_cells is not None and cells >= self.max_cells:
                return

    def _start(self) -> tuple[int, int]:
        """The epoch to read and how many of its micro-batches to skip."""
        epoch, state, self._resume = int(self.epoch()), self._resume, None
        if state is None:
            return epoch, 0
        mine = {"seed": self.seed, "max_tokens": self.max_tokens, "world_size": self.world_size}
        changed = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if changed:
            logg.warning(f"resuming with other data settings than the checkpoint's {changed} "
                         "(checkpoint, now): the data position cannot be restored, so epoch "
                         f"{epoch} starts over from its first batch.")
            return epoch, 0
        if state.get("finished"):
            # saved after the epoch's last batch: Lightning goes on with the next epoch, but
            # asks for its batches while its epoch counter still names the finished one
            return int(state["epoch"]) + 1, 0
        return int(state["epoch"]), int(state["batches"])

    # --- the Lightning stateful-loader protocol ----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``epoch``, ``batches`` consumed in it, whether it is ``finished``, and the settings
        that fix the order."""
        done = self._yielded if self.consumed is None else int(self.consumed())
        return {"epoch": self.data_epoch(), "batches": done,
                "finished": self._finished and done >= self._yielded, "seed": self.seed,
                "max_tokens": self.max_tokens, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration resumes ``state["epoch"]`` after ``state["batches"]``
        micro-batches (or starts the next epoch if that one was ``finished``)."""
        self._resume = dict(state)
