"""A Lightning DataModule over cell streams: sharded by the trainer's ranks, reshuffled by epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
from torch.utils.data import DataLoader

from ._stream import identity

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from ._stream import CellStream, TokenizedStream

    Stream = CellStream | TokenizedStream


class EpochLoader(DataLoader):
    """A DataLoader that sets its stream's epoch each time an epoch starts.

    Lightning calls ``set_epoch`` only on samplers, which an ``IterableDataset`` has not;
    the epoch is set here, in the training process, before the workers (new or
    persistent) start the epoch.
    """

    def __init__(self, dataset: Stream, *, epoch: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        self.dataset.set_epoch(self.epoch())
        return super().__iter__()


class CellDataModule(L.LightningDataModule):
    """Cell streams for a Lightning ``Trainer``, one DataLoader per split.

    In ``setup`` each stream is told the trainer's ``global_rank`` and ``world_size``
    (nothing is read from environment variables, so any launcher and node count works);
    each epoch's DataLoader iteration sets the stream's epoch to ``trainer.current_epoch``.
    Streams are built lazily, so they can be made before the trainer starts processes.

    Parameters
    ----------
    train, val
        Streams (:class:`AnnDataStream`, :class:`CensusStream`, :class:`CorpusStream`, or
        their ``.tokenize(tokenizer)``).
    num_workers
        DataLoader worker processes per rank.
    collate_fn
        Applied to each block in the workers (default: none, blocks pass as they are).
    multiprocessing_context
        Start method of the workers; ``"spawn"`` by default when a stream reads SOMA
        (tiledbsoma-ml's numba kernels use GNU OpenMP, which aborts in a forked child).
    persistent_workers
        Keep the workers between epochs (the streams' epoch is shared with them), which
        saves restarting them and, for SOMA, recompiling tiledbsoma-ml's kernels.
    """

    def __init__(self, train: Stream, val: Stream | None = None, *, num_workers: int = 0,
                 collate_fn: Callable[[Any], Any] | None = None,
                 multiprocessing_context: str | None = None, persistent_workers: bool = True,
                 pin_memory: bool = False) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.num_workers, self.collate_fn = num_workers, collate_fn or identity
        self.multiprocessing_context, self.pin_memory = multiprocessing_context, pin_memory
        self.persistent_workers = persistent_workers

    def _streams(self) -> list[Stream]:
        return [s for s in (self.train, self.val) if s is not None]

    def setup(self, stage: str) -> None:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        for stream in self._streams():
            stream.set_shard(rank, world, num_workers=self.num_workers)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _loader(self, stream: Stream) -> EpochLoader:
        context = self.multiprocessing_context
        if context is None and self.num_workers > 0 and _reads_soma(stream):
            context = "spawn"
        return EpochLoader(stream, epoch=self._epoch, batch_size=None,
                           num_workers=self.num_workers, collate_fn=self.collate_fn,
                           multiprocessing_context=context if self.num_workers else None,
                           persistent_workers=self.persistent_workers and self.num_workers > 0,
                           pin_memory=self.pin_memory)

    def train_dataloader(self) -> EpochLoader:
        return self._loader(self.train)

    def val_dataloader(self) -> EpochLoader | list:
        return self._loader(self.val) if self.val is not None else []


def _reads_soma(stream: Stream) -> bool:
    from ._census_stream import CensusStream

    return isinstance(getattr(stream, "stream", stream), CensusStream)
