"""Micro-batches from stream blocks: cells grouped by length under a token budget.

A stream yields blocks of ``block_size`` cells; a training step takes fewer. Each block is
cut into micro-batches whose *padded* size (cells x longest cell) stays within
``max_tokens``, after sorting its cells by length, so that a backend that pads (SDPA per
length bucket, or a whole-batch pad) wastes little, while flash-attn takes the same packed
cells as they are. The micro-batches of a block are then visited in a random order drawn
from ``(seed, epoch, block)``: lengths follow cell type and sequencing depth, and a run
should not sweep from short to long cells within every block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..tokenizers import TokenBatch


class MicroBatch:
    """One training step's packed cells and their place in the epoch.

    Not a dataclass on purpose: Lightning moves dataclasses field by field and cannot
    rebuild the frozen :class:`~sclcm.tokenizers.TokenBatch`; this object passes through
    untouched and the training step makes the tensors.

    Attributes
    ----------
    tokens
        The cells, packed.
    epoch, index
        The epoch, and the micro-batch's position among the epoch's micro-batches of
        this rank.
    """

    __slots__ = ("epoch", "index", "tokens")

    def __init__(self, tokens: TokenBatch, epoch: int, index: int) -> None:
        self.tokens, self.epoch, self.index = tokens, epoch, index

    @property
    def n_tokens(self) -> int:
        """Real tokens (no padding)."""
        return self.tokens.n_tokens

    @property
    def n_cells(self) -> int:
        return self.tokens.n_cells

    def __repr__(self) -> str:
        return f"MicroBatch(epoch {self.epoch}, #{self.index}: {self.tokens!r})"


def group_by_length(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cell indices of each micro-batch: longest cells first, each group as large as the
    budget allows (``len(group) * longest <= max_tokens``; a longer cell goes alone).

    >>> [g.tolist() for g in group_by_length(np.array([5, 1, 4, 2, 9]), max_tokens=10)]
    [[4], [0, 2], [3, 1]]
    """
    if max_tokens < 1:
        msg = f"max_tokens must be positive, not {max_tokens}."
        raise ValueError(msg)
    order = np.argsort(-np.asarray(lengths), kind="stable")  # ties keep the stream's order
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        # the group's first cell is its longest: the padded size is count x that length
        if i == len(order) or (i + 1 - start) * int(lengths[order[start]]) > max_tokens:
            groups.append(order[start:i])
            start = i
    return groups


def split_further(groups: list[np.ndarray], n: int) -> list[np.ndarray]:
    """Halve the groups of most cells until there are ``n`` (ranks of a DDP run must take
    the same number of steps per block, whatever their cells' lengths).

    >>> [g.tolist() for g in split_further([np.array([0, 1, 2, 3]), np.array([4])], 3)]
    [[0, 1], [4], [2, 3]]
    """
    groups = list(groups)
    while len(groups) < n:
        i = max(range(len(groups)), key=lambda j: len(groups[j]), default=None)
        if i is None or len(groups[i]) < 2:
            msg = (f"Cannot cut {sum(len(g) for g in groups)} cells into {n} micro-batches "
                   "to match the other ranks: the ranks' blocks differ in cells (use even "
                   "shards, the default, and tokenizers that keep every cell).")
            raise ValueError(msg)
        g = groups.pop(i)
        groups[i:i] = [g[: len(g) // 2]]
        groups.append(g[len(g) // 2:])
    return groups


def micro_batches(batch: TokenBatch, max_tokens: int, *, rng: np.random.Generator | None = None,
                  n_min: int = 1) -> list[TokenBatch]:
    """Cut a block into micro-batches by token budget with length grouping.

    Parameters
    ----------
    batch
        A block of tokenized cells.
    max_tokens
        Largest padded size (cells x longest cell) of a micro-batch.
    rng
        Shuffles the order of the micro-batches (not the cells within one).
    n_min
        At least this many micro-batches (see :func:`split_further`).

    Examples
    --------
    >>> from sclcm.tokenizers import TokenBatch
    >>> lengths = np.array([3, 1, 2, 3])
    >>> offsets = np.concatenate([[0], np.cumsum(lengths)])
    >>> block = TokenBatch(np.arange(9, dtype=np.int32), np.zeros(9, np.float32), offsets,
    ...                    np.arange(4))
    >>> [b.lengths.tolist() for b in micro_batches(block, max_tokens=6)]
    [[3, 3], [2, 1]]
    """
    groups = split_further(group_by_length(batch.lengths, max_tokens), n_min)
    if rng is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return [batch.select(g) for g in groups]
