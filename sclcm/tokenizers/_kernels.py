"""NumPy helpers on CSR row blocks and packed batches, and the tokenizers' random numbers.

The per-cell work of tokenizing is compiled (:mod:`sclcm.tokenizers._compiled`); these
are the vectorized pieces that other modules use without loading numba.
"""

from __future__ import annotations

import numpy as np

SLOT_BITS = 17  # token slots per block (131,072 > any gene reference)
MAX_SLOTS = 1 << SLOT_BITS


def row_ids(indptr: np.ndarray) -> np.ndarray:
    """Row of each stored entry of a CSR matrix (int64)."""
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))


def positions_in_row(indptr: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each row, for every stored entry."""
    n = int(indptr[-1])
    return np.arange(n, dtype=np.int64) - np.repeat(indptr[:-1], np.diff(indptr))


def uniform(seed: int, cells: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers, one per (cell, token), from a counter-based hash.

    The number depends only on ``(seed, cell, token)``, not on how cells are split into
    blocks or which other genes a cell has, so results are reproducible for any
    chunking. The mixing function is SplitMix64's finalizer. The kernels draw the same
    numbers one at a time (:func:`sclcm.tokenizers._compiled.uniform_at`).
    """
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
             + cells.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
             + tokens.astype(np.uint64) * np.uint64(0x94D049BB133111EB))
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
