"""Attention backends on packed cells: a registry of functions with one signature.

Every backend takes ``q_thd, k_thd, v_thd`` (all cells' tokens end to end: tokens x heads x
head dim), a :class:`Packing` that says where each cell lies, and returns ``o_thd``. A
token only ever attends within its own cell. Backends that need padding build it inside.

- ``math``: the plain reference, one cell at a time, softmax in float32.
- ``sdpa``: :func:`torch.nn.functional.scaled_dot_product_attention` on cells sorted by
  length and padded per length bucket (padding at most 15% of a bucket). Measured on 16
  pbmc3k cells, 2 CPU cores, 4 heads: 164 ms, vs 390 ms padding the whole batch and 7 s
  with nested jagged tensors; one call per cell took 118 ms for attention alone, but whole
  Geneformer-shaped models did 13-23% more tokens per CPU-second with the buckets.
  Consecutive cells of one length (the copies of a perturbation screen) are attended where
  they lie, without gathering; on a CPU in bf16, buckets of cells up to
  :data:`SHORT_CELL` tokens use plain matrix products instead of SDPA.
- ``flash``: ``flash_attn_varlen_func`` on the packed tokens with ``cu_seqlens`` (CUDA,
  fp16/bf16; install ``sclcm[flash]``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from itertools import pairwise
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:  # optional: the `flash` extra, CUDA only
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

#: Largest ratio of padded to real tokens allowed within one sdpa length bucket.
BUCKET_WASTE = 1.15


class Bucket(NamedTuple):
    """Cells of similar length attended together as an ``n x L`` grid (padded backends).

    Attributes
    ----------
    L
        The grid's length (its longest cell).
    gather
        ``n * L`` token indices that fill the grid (token 0 where padded); ``None`` when the
        cells are consecutive and all ``L`` long, so that ``span`` of the packed tokens is
        the grid as it lies.
    rows, dest
        The grid's real positions and their tokens (``None`` with ``span``).
    mask
        SDPA's boolean mask (``True`` = attend), ``None`` where nothing needs masking.
    span
        The grid's tokens when they lie contiguous, else ``None``.
    """

    L: int
    gather: torch.Tensor | None
    rows: torch.Tensor | None
    dest: torch.Tensor | None
    mask: torch.Tensor | None
    span: slice | None


class Packing:
    """The layout of packed cells, shared by all layers of one forward pass.

    Parameters
    ----------
    offsets
        int64, ``n_cells + 1`` token offsets starting at 0 (``cu_seqlens``).
    query
        Optional bool per token: tokens to be predicted under scGPT's generative mask.
        Known tokens (``False``) attend to known tokens; a query token attends to the known
        tokens and itself.
    backend
        ``"auto"``, ``"flash"``, ``"sdpa"``, ``"math"`` or any registered name.
    """

    def __init__(self, offsets: torch.Tensor, *, query: torch.Tensor | None = None,
                 backend: str = "auto") -> None:
        self.offsets = offsets.long()
        self.query = query
        self.backend = backend
        if query is not None and query.shape != (self.n_tokens,):
            msg = f"query must have one flag per token ({self.n_tokens}), got {query.shape}."
            raise ValueError(msg)

    @property
    def n_cells(self) -> int:
        return self.offsets.numel() - 1

    @cached_property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @cached_property
    def lengths(self) -> torch.Tensor:
        return self.offsets.diff()

    @cached_property
    def max_len(self) -> int:
        return int(self.lengths.max()) if self.n_cells else 0

    @cached_property
    def cell(self) -> torch.Tensor:
        """Cell index of every token."""
        return torch.repeat_interleave(torch.arange(self.n_cells, device=self.offsets.device),
                                       self.lengths, output_size=self.n_tokens)

    @cached_property
    def position(self) -> torch.Tensor:
        """Position of every token within its cell (0 for the first)."""
        return torch.arange(self.n_tokens, device=self.offsets.device) - self.offsets[self.cell]

    @cached_property
    def cu_seqlens_i32(self) -> torch.Tensor:
        return self.offsets.to(torch.int32)

    @cached_property
    def buckets(self) -> list[Bucket]:
        """The cells in length buckets, for the padded backends (see ``Bucket``).

        Cells sorted by length are grouped so that each group's ``n x L`` grid holds at most
        ``BUCKET_WASTE`` times its real tokens.
        """
        lengths = self.lengths.tolist()
        order = sorted((c for c in range(self.n_cells) if lengths[c]),
                       key=lengths.__getitem__, reverse=True)
        groups, start, real = [], 0, 0
        for i, c in enumerate(order):
            real += lengths[c]
            if lengths[order[start]] * (i + 1 - start) > BUCKET_WASTE * real:
                groups.append(order[start:i])
                start, real = i, lengths[c]
        groups.append(order[start:])
        offsets = self.offsets.tolist()
        dev = self.offsets.device
        out = []
        for cells in (g for g in groups if g):
            L = lengths[cells[0]]
            if lengths[cells[-1]] == L and cells[-1] - cells[0] == len(cells) - 1:
                # consecutive cells of one length (all copies of a perturbation screen):
                # their tokens already are the grid
                span = slice(offsets[cells[0]], offsets[cells[-1] + 1])
                out.append(Bucket(L, None, None, None, self._span_mask(span, L), span))
                continue
            cells_t = torch.tensor(cells, device=dev)
            pos_l = torch.arange(L, device=dev)
            valid_nl = pos_l < self.lengths[cells_t, None]
            index_nl = torch.where(valid_nl, self.offsets[cells_t, None] + pos_l, 0)
            rows = valid_nl.flatten().nonzero()[:, 0]
            out.append(Bucket(L, index_nl.flatten(), rows, index_nl.flatten()[rows],
                              self._mask(index_nl, valid_nl), None))
        return out

    def _span_mask(self, span: slice, L: int) -> torch.Tensor | None:
        if self.query is None:
            return None
        index_nl = torch.arange(span.start, span.stop, device=self.offsets.device).view(-1, L)
        return self._mask(index_nl, torch.ones_like(index_nl, dtype=torch.bool))

    def _mask(self, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        if self.query is None:
            return None if bool(valid.all()) else valid[:, None, None, :]
        known = valid & ~self.query[index]
        # a padded row attends to itself only, so that no row is empty (NaN)
        eye = torch.eye(index.shape[1], dtype=torch.bool, device=index.device)
        return (known[:, None, :] | eye)[:, None]


def repack(keep_t: torch.Tensor, offsets: torch.Tensor, n_prefix: int,
            cell_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layout that keeps the tokens in ``keep_t`` and reserves ``n_prefix`` slots at the
    start of each cell: ``(dest of kept tokens, new offsets, prefix slots n_cells x p)``."""
    n_cells = offsets.numel() - 1
    kept = torch.zeros(n_cells, dtype=torch.long, device=offsets.device).index_add_(
        0, cell_t, keep_t.long())
    new_offsets = F.pad((kept + n_prefix).cumsum(0), (1, 0))
    before = F.pad(kept.cumsum(0), (1, 0))[:-1]  # kept tokens in earlier cells
    rank_t = keep_t.long().cumsum(0) - 1 - before[cell_t]
    dest = (new_offsets[:-1][cell_t] + n_prefix + rank_t)[keep_t]
    prefix = new_offsets[:-1, None] + torch.arange(n_prefix, device=offsets.device)
    return dest, new_offsets, prefix


def find_keys(keys_a: torch.Tensor, keys_b: torch.Tensor) -> torch.Tensor:
    """Index in ``keys_a`` (unique) of each key of ``keys_b``; -1 where absent."""
    sorted_a, order = keys_a.sort()
    pos = torch.searchsorted(sorted_a, keys_b).clamp(max=max(len(keys_a) - 1, 0))
    hit = (sorted_a[pos] == keys_b) if len(keys_a) else torch.zeros_like(keys_b, dtype=bool)
    return torch.where(hit, order[pos], -1)


AttentionFn = Callable[..., torch.Tensor]


#: ``on_probs(cell, p_hll)``: receives one cell's attention probabilities (heads x queries x
#: keys, float32) from :func:`math_attention`.
ProbsFn = Callable[[int, torch.Tensor], None]


def math_attention(q_thd: torch.Tensor, k_thd: torch.Tensor, v_thd: torch.Tensor,
                   packing: Packing, *, scale: float, dropout: float = 0.0,
                   on_probs: ProbsFn | None = None) -> torch.Tensor:
    """The reference: ``softmax(q k^T * scale) v`` written out, one cell at a time.

    ``on_probs`` is called with each cell's index and its probabilities before dropout: the
    only backend that has them (flash and SDPA never form them in full).
    """
    out = torch.empty_like(q_thd)
    offsets = packing.offsets.tolist()
    for cell, (start, end) in enumerate(pairwise(offsets)):
        q, k, v = (x[start:end].transpose(0, 1).float() for x in (q_thd, k_thd, v_thd))
        scores_hll = q @ k.transpose(1, 2) * scale
        if packing.query is not None:
            is_query = packing.query[start:end]
            eye = torch.eye(end - start, dtype=torch.bool, device=q.device)
            scores_hll = scores_hll.masked_fill(~(~is_query[None, :] | eye), float("-inf"))
        p_hll = scores_hll.softmax(-1)
        if on_probs is not None:
            on_probs(cell, p_hll)
        p_hll = F.dropout(p_hll, dropout)
        out[start:end] = (p_hll @ v).transpose(0, 1).to(out.dtype)
    return out


#: Longest cell that the ``sdpa`` backend attends with plain matrix products, head by head,
#: on a CPU in bf16/fp16: there SDPA's CPU kernel costs 1.3-1.8x more up to 512 tokens, and
#: less from ~1,024 on (4 heads x 64, 2 threads, 16,384 tokens per call). In float32 SDPA is
#: as fast or faster at every length.
SHORT_CELL = 512


def _short(q: torch.Tensor, L: int) -> bool:
    """Whether a bucket of cells ``L`` long takes :func:`_short_attention`."""
    return (L <= SHORT_CELL and q.device.type == "cpu"
            and q.dtype in (torch.bfloat16, torch.float16))


def _short_attention(q_nlhd: torch.Tensor, k_nlhd: torch.Tensor, v_nlhd: torch.Tensor,
                     mask: torch.Tensor | None, *, scale: float, dropout: float
                     ) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` on a grid of cells, one head at a time.

    A head's ``n x L x d`` slice is a strided view that batched matrix products read as it
    lies, where a head-major layout would first have to be copied. Scores stay in the
    input's dtype: the softmax kernel sums in float32 inside, and a float32 copy of the
    scores costs more than the products themselves from ~256 tokens on.
    """
    out_nlhd = torch.empty_like(q_nlhd)
    if mask is not None:
        mask = ~mask[:, 0]  # the same for every head; True = hidden
    for h in range(q_nlhd.shape[2]):
        scores = torch.bmm(q_nlhd[:, :, h], k_nlhd[:, :, h].transpose(1, 2)).mul_(scale)
        if mask is not None:
            scores = scores.masked_fill_(mask, float("-inf"))
        out_nlhd[:, :, h] = torch.bmm(F.dropout(scores.softmax(-1), dropout), v_nlhd[:, :, h])
    return out_nlhd


def sdpa_attention(q_thd: torch.Tensor, k_thd: torch.Tensor, v_thd: torch.Tensor,
                   packing: Packing, *, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Torch SDPA per length bucket (see the module docstring for why buckets)."""
    _, H, D = q_thd.shape
    out = torch.empty_like(q_thd)
    for L, gather, rows, dest, mask, span in packing.buckets:
        if span is not None:
            q, k, v = (x[span].view(-1, L, H, D) for x in (q_thd, k_thd, v_thd))
        else:  # index_select is ~2x faster than advanced indexing here on CPU
            q, k, v = (x.index_select(0, gather).view(-1, L, H, D)
                       for x in (q_thd, k_thd, v_thd))
        if _short(q, L):
            o_nlhd = _short_attention(q, k, v, mask, scale=scale, dropout=dropout)
        else:
            o_nlhd = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                dropout_p=dropout, scale=scale).transpose(1, 2)
        if span is not None:
            out[span] = o_nlhd.reshape(-1, H, D)
        else:
            out.index_copy_(0, dest, o_nlhd.reshape(-1, H, D).index_select(0, rows))
    return out


def flash_attention(q_thd: torch.Tensor, k_thd: torch.Tensor, v_thd: torch.Tensor,
                    packing: Packing, *, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """flash-attn's varlen kernel straight on the packed tokens (no padding at all)."""
    if flash_attn_varlen_func is None:
        msg = "The 'flash' backend needs flash-attn: pip install 'sclcm[flash]' (CUDA only)."
        raise RuntimeError(msg)
    if packing.query is not None:
        msg = ("The 'flash' backend cannot apply scGPT's generative attention mask; use "
               "attn_implementation='sdpa' or 'math'.")
        raise ValueError(msg)
    if not q_thd.is_cuda or q_thd.dtype not in (torch.float16, torch.bfloat16):
        msg = (f"The 'flash' backend needs CUDA fp16/bf16 tensors, got {q_thd.dtype} on "
               f"{q_thd.device}; use 'sdpa' here or move the model with .to('cuda', "
               "torch.bfloat16).")
        raise ValueError(msg)
    cu = packing.cu_seqlens_i32
    return flash_attn_varlen_func(q_thd, k_thd, v_thd, cu, cu, packing.max_len,
                                  packing.max_len, dropout_p=dropout, softmax_scale=scale)


ATTENTION_BACKENDS: dict[str, AttentionFn] = {
    "math": math_attention, "sdpa": sdpa_attention, "flash": flash_attention}


def register_attention(name: str, fn: AttentionFn) -> None:
    """Add a backend: ``fn(q_thd, k_thd, v_thd, packing, *, scale, dropout) -> o_thd``."""
    ATTENTION_BACKENDS[name] = fn


def resolve_backend(name: str, q_thd: torch.Tensor, packing: Packing) -> str:
    """The backend ``"auto"`` stands for on this input; other names are checked and kept."""
    if name == "auto":
        usable = (flash_attn_varlen_func is not None and q_thd.is_cuda
                  and q_thd.dtype in (torch.float16, torch.bfloat16) and packing.query is None)
        return "flash" if usable else "sdpa"
    if name not in ATTENTION_BACKENDS:
        msg = f"Unknown attention backend {name!r}; registered: {sorted(ATTENTION_BACKENDS)}."
        raise ValueError(msg)
    return name


def attention(q_thd: torch.Tensor, k_thd: torch.Tensor, v_thd: torch.Tensor, packing: Packing,
              *, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Self-attention within each packed cell through the backend ``packing.backend``."""
    fn = ATTENTION_BACKENDS[resolve_backend(packing.backend, q_thd, packing)]
    return fn(q_thd, k_thd, v_thd, packing, scale=scale, dropout=dropout)
