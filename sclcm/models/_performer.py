"""scFoundation's decoder: a Performer (random-feature softmax attention) on packed cells.

Pre-norm blocks (layer norm, attention, residual; layer norm, GELU MLP, residual), then the
Performer's final layer norm and the model's own. Attention is FAVOR+ (Choromanski et al.,
*Rethinking attention with Performers*, ICLR 2021): each layer holds a fixed projection
``P`` (``m`` random features x head dim ``e``, orthogonal Gaussian rows), and a query or
key ``x`` of a head becomes ``m`` positive features

    phi(x) = m^-1/2 (exp(e^-1/4 P x - |x|^2 / (2 sqrt(e)) - c) + 1e-4),

so that attention is linear in the number of tokens: token ``i`` of a cell gets
``phi(q_i) S / (phi(q_i) . z)`` with ``S = sum_j phi(k_j) v_j^T`` and ``z = sum_j phi(k_j)``
over the cell's tokens (the published decoder passes no mask: every token of the cell is a
key). The stabiliser ``c`` cancels but for the ``1e-4``: a query's is the max of its own
``m`` products, a key's the max over all the cell's keys, heads and features. The published
code takes that one over the whole batch, and its scripts run one cell at a time: per cell
is what they compute (a batch of cells there differs through the ``1e-4``).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from ._attention import Packing
from ._model import MLP

#: Added to every feature (the published kernel's epsilon).
FEATURE_EPS = 1e-4


def orthogonal_features(n_features: int, head_dim: int) -> torch.Tensor:
    """A FAVOR+ projection: blocks of orthonormal rows (QR of Gaussian matrices), each row
    scaled to the norm of a Gaussian vector (the paper's regularised orthogonal features)."""
    blocks, left = [], n_features
    while left > 0:
        q, _ = torch.linalg.qr(torch.randn(head_dim, head_dim))
        blocks.append(q.T[:left])
        left -= head_dim
    return torch.randn(n_features, head_dim).norm(dim=1)[:, None] * torch.cat(blocks)


class PerformerAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_features: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.proj = nn.Linear(d_model, d_model)
        # a buffer: saved with the weights, fixed at inference (the published model redraws
        # it only while training, every 1,000 steps)
        self.register_buffer("projection", torch.zeros(n_features, d_model // n_heads))

    def reset_projection(self) -> None:
        with torch.no_grad():
            self.projection.copy_(orthogonal_features(*self.projection.shape))

    def features(self, x_the: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """``phi`` of queries (``packing=None``: each its own stabiliser) or of keys (one
        per cell), tokens x heads x features."""
        e, m = x_the.shape[-1], self.projection.shape[0]
        scale = e ** -0.25
        dash_thm = torch.einsum("the,me->thm", x_the * scale, self.projection.to(x_the.dtype))
        sq_th1 = (x_the**2).sum(-1, keepdim=True) * (scale**2 / 2)
        if packing is None:
            top = dash_thm.amax(-1, keepdim=True)
        else:
            per_token = dash_thm.amax(dim=(1, 2))
            top = per_token.new_full((packing.n_cells,), -math.inf).scatter_reduce(
                0, packing.cell, per_token, "amax")[packing.cell][:, None, None]
        return m**-0.5 * (torch.exp(dash_thm - sq_th1 - top) + FEATURE_EPS)

    def forward(self, x_td: torch.Tensor, packing: Packing) -> torch.Tensor:
        T, d = x_td.shape
        q_the, k_the, v_the = (f(x_td).view(T, self.n_heads, -1) for f in (self.q, self.k,
                                                                               self.v))
        phi_q, phi_k = self.features(q_the), self.features(k_the, packing)
        o_the = torch.empty_like(v_the)
        bounds = packing.offsets.tolist()
        for a, b in itertools.pairwise(bounds):  # one cell's sums at a time
            s_hme = torch.einsum("thm,the->hme", phi_k[a:b], v_the[a:b])
            z_hm = phi_k[a:b].sum(0)
            num = torch.einsum("thm,hme->the", phi_q[a:b], s_hme)
            o_the[a:b] = num / torch.einsum("thm,hm->th", phi_q[a:b], z_hm)[..., None]
        return self.proj(o_the.reshape(T, d))


class PerformerBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, n_features: int,
                 eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = PerformerAttention(d_model, n_heads, n_features)
        self.ln_2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, d_ff, "gelu")

    def forward(self, x_td: torch.Tensor, packing: Packing) -> torch.Tensor:
        x_td = x_td + self.attn(self.ln_1(x_td), packing)
        return x_td + self.mlp(self.ln_2(x_td))


class PerformerStack(nn.Module):
    """Performer blocks, the Performer's final layer norm (``ln_f``) and the model's
    (``ln_out``); called as :class:`~sclcm.models._model.Stack` is."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int,
                 n_features: int, eps: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PerformerBlock(d_model, n_heads, d_ff, n_features, eps)
                                    for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, eps=eps)
        self.ln_out = nn.LayerNorm(d_model, eps=eps)

    def reset_projections(self) -> None:
        for block in self.blocks:
            block.attn.reset_projection()

    def forward(self, x_td: torch.Tensor, packing: Packing, keep: object = (),
                upto: int | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        for block in self.blocks:
            x_td = block(x_td, packing)
        return self.ln_out(self.ln_f(x_td)), {}
