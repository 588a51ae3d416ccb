"""TokenBatch: cells as packed token sequences (no padding)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class TokenBatch:
    """A block of tokenized cells, packed end to end.

    Cell ``i`` is ``gene_ids[offsets[i]:offsets[i + 1]]`` with the same slice of
    ``values``. ``offsets`` can be passed as ``cu_seqlens`` to a varlen attention kernel.

    Attributes
    ----------
    gene_ids
        Token ids (int32), all cells concatenated.
    values
        A value per token (float32): a rank-normalized expression (geneformer), a bin
        (scgpt, scbert) or a continuous value (scfoundation); 0 for special tokens
        unless the family says otherwise.
    offsets
        int64, length ``n_cells + 1``, starting at 0.
    cell_index
        int64 row of each cell in the source (cells dropped for having no token are
        absent).
    extras
        Per-cell arrays (length ``n_cells``) a family adds, e.g. scFoundation's
        ``"depth_T"`` and ``"depth_S"``.
    """

    gene_ids: np.ndarray
    values: np.ndarray
    offsets: np.ndarray
    cell_index: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.offsets) - 1
        if (self.gene_ids.dtype != np.int32 or self.values.dtype != np.float32
                or self.offsets.dtype != np.int64):
            msg = "TokenBatch needs int32 gene_ids, float32 values and int64 offsets."
            raise TypeError(msg)
        if (len(self.gene_ids) != len(self.values) or n < 0 or self.offsets[0] != 0
                or self.offsets[-1] != len(self.gene_ids) or len(self.cell_index) != n
                or any(len(v) != n for v in self.extras.values())):
            msg = "TokenBatch arrays are inconsistent (offsets, lengths or extras)."
            raise ValueError(msg)

    @property
    def n_cells(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return self.n_cells

    @property
    def lengths(self) -> np.ndarray:
        """Number of tokens of each cell (int64)."""
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(gene_ids, values)`` of cell ``i``."""
        s = slice(self.offsets[i], self.offsets[i + 1])
        return self.gene_ids[s], self.values[s]

    def select(self, cells) -> TokenBatch:
        """A new batch of the given cells (indices or a boolean mask), in that order."""
        idx = np.arange(self.n_cells)[cells]
        lengths = self.lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # positions of the kept tokens: each cell's start, then 0..len-1
        starts = np.repeat(self.offsets[idx], lengths)
        pos = starts + np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        return TokenBatch(self.gene_ids[pos], self.values[pos], offsets, self.cell_index[idx],
                          {k: v[idx] for k, v in self.extras.items()})

    def __getitem__(self, cells) -> TokenBatch:
        if isinstance(cells, int | np.integer):
            cells = [cells]
        return self.select(cells)

    @staticmethod
    def concat(batches: list[TokenBatch]) -> TokenBatch:
        """One batch of all cells of ``batches``, in order."""
        if not batches:
            msg = "concat needs at least one TokenBatch."
            raise ValueError(msg)
        lengths = np.concatenate([b.lengths for b in batches])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        keys = set(batches[0].extras)
        if any(set(b.extras) != keys for b in batches):
            msg = "Cannot concat TokenBatches with different extras."
            raise ValueError(msg)
        return TokenBatch(np.concatenate([b.gene_ids for b in batches]),
                          np.concatenate([b.values for b in batches]), offsets,
                          np.concatenate([b.cell_index for b in batches]),
                          {k: np.concatenate([b.extras[k] for b in batches]) for k in keys})

    def to_padded(self, pad_id: int, pad_value: float = 0.0,
                  max_len: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(gene_ids, values, mask)`` as ``n_cells x L`` arrays, ``mask`` True on tokens.

        For backends and peers that need padding; sclcm's own path stays packed.
        """
        lengths = self.lengths
        L = int(lengths.max(initial=0)) if max_len is None else max_len
        if lengths.max(initial=0) > L:
            msg = f"A cell has {lengths.max()} tokens, more than max_len={L}."
            raise ValueError(msg)
        mask = np.arange(L)[None, :] < lengths[:, None]
        ids = np.full((self.n_cells, L), pad_id, dtype=np.int32)
        vals = np.full((self.n_cells, L), pad_value, dtype=np.float32)
        ids[mask], vals[mask] = self.gene_ids, self.values
        return ids, vals, mask

    def __repr__(self) -> str:
        lens = self.lengths
        extra = f", extras={sorted(self.extras)}" if self.extras else ""
        if self.n_cells == 0:
            return f"TokenBatch(0 cells{extra})"
        return (f"TokenBatch({self.n_cells} cells, {self.n_tokens} tokens, length "
                f"{lens.min()}..{lens.max()} (mean {lens.mean():.0f}){extra})")
