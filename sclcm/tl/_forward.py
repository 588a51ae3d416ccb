"""Running a model over tokenized cells in inference: forward batches by a token budget."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch



@dataclass(frozen=True)
class Budget:
    """How much one forward pass may hold, when cells per pass are not fixed.

    Attributes
    ----------
    tokens
        Padded tokens per pass (cells x the longest cell's length): bounds the
        activations, ``tokens x d_ff`` in the MLP.
    scores
        Attention scores per pass (cells x heads x length²): bounds attention where it
        is computed in full (CPU SDPA with a padding mask, the ``math`` backend).
    """

    tokens: int
    scores: int

    @classmethod
    def for_device(cls, device: torch.device) -> Budget:
        # CPU: ~64 MB of activations at d_ff=1024 and 256 MB of float32 scores, so that an
        # embedding run stays far below 2 GB; a GPU has memory for far more, and flash
        # attention never holds the scores
        if device.type == "cuda":
            return cls(tokens=131_072, scores=2**30)
        return cls(tokens=16_384, scores=2**26)


def plan_batches(lengths: np.ndarray, *, n_heads: int, batch_size: int | None = None,
                 budget: Budget | None = None) -> list[np.ndarray]:
    """Split cells into forward passes, longest first; returns index arrays into ``lengths``.

    Cells are sorted by length so that the cells of a pass are alike (little padding, and
    the longest pass comes first, so that an out-of-memory error comes early).
    ``batch_size`` fixes the cells per pass; otherwise a pass takes as many cells as
    ``budget`` allows, at least one.

    >>> [b.tolist() for b in plan_batches(np.array([5, 100, 7, 6]), n_heads=1,
    ...                                    budget=Budget(tokens=200, scores=10**6))]
    [[1, 2], [3, 0]]
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    if batch_size is not None:
        if batch_size < 1:
            msg = f"batch_size must be a positive number of cells, not {batch_size}."
            raise ValueError(msg)
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if budget is None:
        msg = "Give batch_size or budget."
        raise ValueError(msg)
    out, i = [], 0
    while i < len(order):
        L = max(int(lengths[order[i]]), 1)  # the longest cell of this pass
        n = max(1, min(budget.tokens // L, budget.scores // (n_heads * L * L)))
        out.append(order[i:i + n])
        i += n
    return out


#: Arithmetic the tools run the model in; ``None`` picks by device (see :func:`precision_for`).
PRECISIONS = ("float32", "bfloat16")


def precision_for(precision: str | None, device: torch.device) -> str:
    """The precision a tool runs in: ``precision``, checked, or by default bf16 on CUDA and
    float32 elsewhere.

    >>> import torch
    >>> precision_for(None, torch.device("cpu")), precision_for("bfloat16", torch.device("cpu"))
    ('float32', 'bfloat16')
    """
    if precision is None:
        return "bfloat16" if device.type == "cuda" else "float32"
    if precision not in PRECISIONS:
        msg = (f"precision must be one of {', '.join(map(repr, PRECISIONS))} (or None for "
               f"bf16 on CUDA, float32 elsewhere), not {precision!r}.")
        raise ValueError(msg)
    if precision == "bfloat16" and device.type == "cpu" and not cpu_has_native_bf16():
        from .. import logging as logg

        logg.warning("precision='bfloat16' on a CPU without native bf16 (AVX512-BF16 or AMX): "
                     "bf16 is emulated there, several times slower than float32 (5.5x "
                     "measured). Use precision='float32' (the CPU default).")
    return precision


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (oneDNN's own check)."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, precision: str = "float32"
             ) -> contextlib.AbstractContextManager:
    """bf16 autocast (matrix products in bf16, norms in float32, softmax summed in float32),
    or nothing.

    bf16 doubles matrix-product throughput on GPUs and on CPUs with native bf16
    (AVX512-BF16, AMX); elsewhere a CPU emulates it, slower than float32.
    """
    import torch

    if precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def input_rows(out_offsets: torch.Tensor, in_offsets: torch.Tensor,
               n_prefix: int) -> torch.Tensor:
    """Row of ``last_hidden_state`` for each input token.

    The encoder may put ``n_prefix`` tokens before each cell (scFoundation's read depth),
    so its rows are not the input's.
    """
    import torch

    lengths = in_offsets.diff()
    cell = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    pos = torch.arange(len(cell), device=cell.device) - in_offsets[cell]
    return out_offsets[cell] + n_prefix + pos
