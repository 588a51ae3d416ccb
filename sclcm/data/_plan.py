"""Which cells a rank and a DataLoader worker read in an epoch, and in what order.

Every stream in :mod:`sclcm.data` follows one plan, computed from the number of cells of
each source, ``(seed, epoch)``, ``rank``/``world_size`` and the worker:

1. Each source's rows are cut into *chunks* of ``chunk_size`` consecutive rows.
2. With ``shuffle``, the chunks of all sources are permuted by a generator seeded with
   :func:`epoch_seed` ``(seed, epoch)``; every rank computes the same permutation.
3. The permuted sequence of cells is cut into ``world_size`` contiguous shares. With
   ``even`` every share has ``n // world_size`` cells (DDP needs the same number of steps on
   every rank): the last ``n % world_size`` cells of the sequence are left out this epoch,
   and since the sequence changes each epoch, so do they.
4. A rank's share is cut among its DataLoader workers in whole blocks of ``block_size``, so
   only the rank's very last block can be short, whatever the number of workers.

Plans are lists of row ranges (:class:`Ranges`); reads stay sequential within a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence


def epoch_seed(seed: int, epoch: int) -> int:
    """One 32-bit seed from ``(seed, epoch)``: distinct epochs give unrelated orders.

    >>> epoch_seed(0, 1) == epoch_seed(0, 1), epoch_seed(0, 1) == epoch_seed(1, 0)
    (True, False)
    """
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def split_bounds(n: int, parts: int) -> np.ndarray:
    """Offsets that cut ``n`` items into ``parts`` contiguous parts, sizes differing by <= 1.

    >>> split_bounds(10, 3).tolist()
    [0, 4, 7, 10]
    """
    size, extra = divmod(n, parts)
    sizes = np.full(parts, size, dtype=np.int64)
    sizes[:extra] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


@dataclass(frozen=True, eq=False)
class Ranges:
    """Row ranges ``[start, stop)`` of sources, read in this order."""

    source: np.ndarray  # int64
    start: np.ndarray  # int64
    stop: np.ndarray  # int64

    @cached_property
    def ends(self) -> np.ndarray:
        """Position just after each range in the concatenated sequence of cells."""
        return np.cumsum(self.stop - self.start)

    @property
    def n_cells(self) -> int:
        return int(self.ends[-1]) if len(self.start) else 0

    def __len__(self) -> int:
        return len(self.start)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.source.tolist(), self.start.tolist(), self.stop.tolist(), strict=True)

    def rows(self) -> np.ndarray:
        """Every row of the ranges, in order (for a single source)."""
        lengths = self.stop - self.start
        return np.repeat(self.start - (self.ends - lengths), lengths) + np.arange(self.n_cells)

    def take(self, idx: np.ndarray) -> Ranges:
        return Ranges(self.source[idx], self.start[idx], self.stop[idx])

    def cut(self, a: int, b: int) -> Ranges:
        """The cells at positions ``[a, b)`` of the concatenated sequence, as ranges."""
        ends = self.ends
        lo = int(np.searchsorted(ends, a, side="right"))
        hi = int(np.searchsorted(ends, b, side="left")) + 1
        part = self.take(slice(lo, min(hi, len(self))))
        if not len(part) or b <= a:
            return Ranges(*(np.zeros(0, np.int64) for _ in range(3)))
        begins = ends[lo:lo + len(part)] - (part.stop - part.start)
        start = part.start + np.maximum(a - begins, 0)
        stop = part.stop - np.maximum(ends[lo:lo + len(part)] - b, 0)
        return Ranges(part.source, start, stop)

    def merged(self) -> Ranges:
        """Adjacent ranges of one source joined (one read instead of several)."""
        if len(self) < 2:
            return self
        joins = (self.source[1:] == self.source[:-1]) & (self.start[1:] == self.stop[:-1])
        first = np.flatnonzero(np.concatenate([[True], ~joins]))
        last = np.concatenate([first[1:] - 1, [len(self) - 1]])
        return Ranges(self.source[first], self.start[first], self.stop[last])

    def sorted(self) -> Ranges:
        """Ranges in file order (source, then row): a forward pass over each file."""
        return self.take(np.lexsort((self.start, self.source))).merged()

    def batches(self, size: int) -> Iterator[Ranges]:
        """Consecutive pieces of ``size`` cells (the last may be shorter)."""
        for a in range(0, self.n_cells, size):
            yield self.cut(a, a + size)


def chunks(sizes: Sequence[int], chunk_size: int) -> Ranges:
    """Every source's rows as chunks of ``chunk_size`` consecutive rows, in source order."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n_chunks = -(-sizes // chunk_size)
    source = np.repeat(np.arange(len(sizes), dtype=np.int64), n_chunks)
    first = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    start = (np.arange(int(n_chunks.sum()), dtype=np.int64) - first) * chunk_size
    stop = np.minimum(start + chunk_size, sizes[source])
    return Ranges(source, start, stop)


def share_size(n: int, rank: int, world_size: int, *, even: bool) -> int:
    """Number of cells rank ``rank`` reads per epoch."""
    if even:
        return n // world_size
    bounds = split_bounds(n, world_size)
    return int(bounds[rank + 1] - bounds[rank])


def rank_share(sizes: Sequence[int], *, chunk_size: int, shuffle: bool, seed: int, epoch: int,
               rank: int, world_size: int, even: bool) -> Ranges:
    """The ranges rank ``rank`` reads in ``epoch``, in order (steps 1-3 of the module doc)."""
    plan = chunks(sizes, chunk_size)
    if shuffle:
        order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(len(plan))
        plan = plan.take(order)
    n = plan.n_cells
    a = rank * (n // world_size) if even else int(split_bounds(n, world_size)[rank])
    return plan.cut(a, a + share_size(n, rank, world_size, even=even))


def worker_part(share: Ranges, worker: int, n_workers: int, block_size: int) -> Ranges:
    """Worker ``worker``'s whole blocks of a rank's share (step 4 of the module doc)."""
    n = share.n_cells
    bounds = split_bounds(-(-n // block_size), n_workers) * block_size
    return share.cut(min(int(bounds[worker]), n), min(int(bounds[worker + 1]), n))
