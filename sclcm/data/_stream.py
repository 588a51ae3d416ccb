"""The streams' common ground: seed, epoch, rank and world size, and the chunked reader."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .. import logging as logg
from ._plan import Ranges, rank_share, share_size, worker_part

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from ..tokenizers import TokenBatch, Tokenizer
    from ._block import CellBlock

    Targets = Callable[[CellBlock, TokenBatch], TokenBatch]


def identity(block: Any) -> Any:
    """The DataLoader collate function of the streams: blocks pass as they are."""
    return block


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _positive(name: str, value: int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int | np.integer) or value < 1:
        msg = f"{name} must be a positive integer, not {value!r}."
        raise ValueError(msg)


class CellStream(IterableDataset):
    """Base of the streams: what decides which cells a process reads, and in what order.

    Parameters
    ----------
    block_size
        Cells per yielded block.
    shuffle
        Shuffle the cells (by chunks, then within a buffer); the order depends only on
        ``seed`` and the epoch set with :meth:`set_epoch`.
    seed
        Seed of the shuffling; every rank must use the same one.
    rank, world_size
        This process's global rank and the number of ranks (see :meth:`set_shard`).
    """

    def __init__(self, *, block_size: int, shuffle: bool, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        _positive("block_size", block_size)
        if not isinstance(seed, int | np.integer) or seed < 0:
            msg = f"seed must be a non-negative integer, not {seed!r}."
            raise ValueError(msg)
        self.block_size, self.shuffle, self.seed = int(block_size), bool(shuffle), int(seed)
        # in shared memory: persistent DataLoader workers see the epoch the trainer sets
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.num_workers = 0
        self.set_shard(rank, world_size)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on (call before each epoch).

        The epoch is shared with the DataLoader workers this stream was sent to, so
        ``persistent_workers=True`` works.
        """
        self._epoch.fill_(int(epoch))

    def set_shard(self, rank: int, world_size: int, *, num_workers: int | None = None) -> None:
        """Read the share of rank ``rank`` of ``world_size`` (e.g. ``trainer.global_rank``).

        Nothing is read from environment variables: the caller says where this stream is
        read. ``num_workers`` is the DataLoader's (only ``len()`` of a
        :class:`CensusStream` depends on it).
        """
        if not 0 <= rank < world_size:
            msg = f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}."
            raise ValueError(msg)
        self.rank, self.world_size = int(rank), int(world_size)
        if num_workers is not None:
            self.num_workers = int(num_workers)

    def _check_world(self) -> None:
        """Warn when torch.distributed runs more ranks than this stream was told of."""
        import torch.distributed as dist

        if get_worker_info() is None and dist.is_available() and dist.is_initialized():
            n = dist.get_world_size()
            if n != self.world_size and not getattr(self, "_warned", False):
                self._warned = True
                logg.warning(f"torch.distributed has {n} ranks but this stream is sharded for "
                             f"{self.world_size}: every rank reads the same cells. Call "
                             "stream.set_shard(rank, world_size) (CellDataModule does).")

    def tokenize(self, tokenizer: Tokenizer, *, targets: Targets | None = None,
                 **kwargs: Any) -> TokenizedStream:
        """This stream with each block encoded by ``tokenizer`` (in the DataLoader workers);
        ``targets(block, batch)`` adds what the raw counts give beyond the tokens (e.g. the
        reconstruction target, :class:`sclcm.train.PanelTargets`)."""
        return TokenizedStream(self, tokenizer, targets=targets, **kwargs)


class ChunkedStream(CellStream):
    """A stream over sources of known length, read by the plan of :mod:`sclcm.data._plan`.

    Subclasses give the number of cells of each source (``_sizes``) and read a list of
    row ranges into one block (``_read``).

    Parameters
    ----------
    chunk_size
        Consecutive rows shuffled as a unit: larger chunks read faster from disk, smaller
        ones mix better.
    buffer_size
        Cells read together and shuffled among themselves (memory grows with it); ``None``
        keeps each chunk's cells in file order.
    even_shards
        Give every rank ``n // world_size`` cells per epoch (what DDP needs); the last
        ``n % world_size`` of the epoch's order are left out. ``False`` keeps every cell,
        with shares differing by one cell.
    """

    def __init__(self, *, block_size: int = 1024, chunk_size: int = 64,
                 buffer_size: int | None = 16_384, shuffle: bool = True, seed: int = 0,
                 even_shards: bool = True, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(block_size=block_size, shuffle=shuffle, seed=seed, rank=rank,
                         world_size=world_size)
        _positive("chunk_size", chunk_size)
        _positive("buffer_size", buffer_size, allow_none=True)
        self.chunk_size, self.buffer_size = int(chunk_size), buffer_size
        self.even_shards = bool(even_shards)

    def _sizes(self) -> list[int]:
        raise NotImplementedError

    def _read(self, ranges: Ranges) -> CellBlock | TokenBatch:
        raise NotImplementedError

    @property
    def n_cells(self) -> int:
        """Cells of all sources (every rank together)."""
        return int(sum(self._sizes()))

    def plan(self, worker: int = 0, n_workers: int = 1) -> Ranges:
        """The row ranges this rank's worker reads in the current epoch, in order."""
        share = rank_share(self._sizes(), chunk_size=self.chunk_size, shuffle=self.shuffle,
                           seed=self.seed, epoch=self.epoch, rank=self.rank,
                           world_size=self.world_size, even=self.even_shards)
        return worker_part(share, worker, n_workers, self.block_size)

    def __len__(self) -> int:
        """Blocks this rank yields per epoch (all its DataLoader workers together)."""
        n = share_size(self.n_cells, self.rank, self.world_size, even=self.even_shards)
        return -(-n // self.block_size)

    def __iter__(self) -> Iterator[CellBlock | TokenBatch]:
        self._check_world()
        worker, n_workers = _worker()
        part = self.plan(worker, n_workers)
        mixing = self.shuffle and self.buffer_size is not None
        # the within-buffer shuffle only reorders this worker's own cells, so its seed may
        # differ between ranks and workers; it stays a function of (seed, epoch)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        carry = None
        for piece in part.batches(self.buffer_size if mixing else self.block_size):
            # read in file order (sequential), then shuffle in memory
            buf = self._read(piece.sorted() if mixing else piece.merged())
            if mixing:
                buf = buf.select(rng.permutation(len(buf)))
            if carry is not None:
                buf = type(buf).concat([carry, buf])
            n_full = len(buf) - len(buf) % self.block_size
            for a in range(0, n_full, self.block_size):
                yield buf.select(slice(a, a + self.block_size))
            carry = buf.select(slice(n_full, len(buf))) if n_full < len(buf) else None
        if carry is not None:
            yield carry


class TokenizedStream(IterableDataset):
    """A stream whose blocks are encoded by a tokenizer: yields :class:`TokenBatch` es.

    Tokenizing inside the DataLoader workers sends only token arrays back to the
    training process. ``cell_index`` of each batch holds the stream's cell ids.
    """

    def __init__(self, stream: CellStream, tokenizer: Tokenizer, *,
                 targets: Targets | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.stream, self.tokenizer, self.kwargs = stream, tokenizer, kwargs
        self.targets = targets

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def set_shard(self, rank: int, world_size: int, *, num_workers: int | None = None) -> None:
        self.stream.set_shard(rank, world_size, num_workers=num_workers)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[TokenBatch]:
        for block in self.stream:
            batch = block.tokenize(self.tokenizer, **self.kwargs)
            yield batch if self.targets is None else self.targets(block, batch)
