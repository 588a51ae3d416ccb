"""Value encoders and heads: the parts in which the four model families differ."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ._attention import Packing
    from ._config import ModelConfig

ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu,
       "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


# --- value encoders: (values_t, masked_t | None) -> x_td ----------------------------------
class CategoryValueEncoder(nn.Module):
    """One embedding per bin (scGPT's binned values, scBERT's levels); row ``n_bins`` = mask."""

    def __init__(self, n_bins: int, d_model: int) -> None:
        super().__init__()
        self.n_bins = n_bins
        self.embedding = nn.Embedding(n_bins + 1, d_model)

    def forward(self, values_t: torch.Tensor, masked_t: torch.Tensor | None) -> torch.Tensor:
        bins_t = values_t.round().long()
        if bool(((bins_t < 0) | (bins_t >= self.n_bins) | (bins_t != values_t)).any()):
            msg = (f"Token values must be bin indices 0..{self.n_bins - 1} for this model "
                   f"(n_bins={self.n_bins}); got values in [{float(values_t.min())}, "
                   f"{float(values_t.max())}]. Tokenize with the model's tokenizer.")
            raise ValueError(msg)
        if masked_t is not None:
            bins_t = bins_t.masked_fill(masked_t, self.n_bins)
        return self.embedding(bins_t)


class ContinuousValueEncoder(nn.Module):
    """scGPT's continuous mode: a small MLP on the value; masked tokens get a learned vector."""

    def __init__(self, d_model: int, eps: float, clamp: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(1, d_model), nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.mask = nn.Parameter(torch.zeros(d_model))
        self.clamp = clamp  # 0: none

    def forward(self, values_t: torch.Tensor, masked_t: torch.Tensor | None) -> torch.Tensor:
        v_t = values_t.clamp(max=self.clamp) if self.clamp else values_t
        x_td = self.norm(self.fc2(F.relu(self.fc1(v_t[:, None]))))
        return x_td if masked_t is None else torch.where(masked_t[:, None], self.mask, x_td)


class AutoDiscretization(nn.Module):
    """scFoundation's value embedding: a soft assignment of the value to ``n_bins`` learned
    bin vectors, ``softmax(W2 a + alpha a)`` with ``a = leaky_relu(W1 v)``."""

    def __init__(self, n_bins: int, d_model: int, alpha: float = 1.0,
                 slope: float = 0.01) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(1, n_bins), nn.Linear(n_bins, n_bins)
        self.bins = nn.Parameter(torch.empty(n_bins, d_model))
        self.mask = nn.Parameter(torch.zeros(d_model))
        self.alpha, self.slope = alpha, slope

    def forward(self, values_t: torch.Tensor, masked_t: torch.Tensor | None) -> torch.Tensor:
        a_tb = F.leaky_relu(self.fc1(values_t[:, None]), self.slope)
        w_tb = (self.fc2(a_tb) + self.alpha * a_tb).softmax(-1)
        x_td = w_tb @ self.bins
        return x_td if masked_t is None else torch.where(masked_t[:, None], self.mask, x_td)


def value_encoder(kind: str, *, n_bins: int, d_model: int, eps: float,
                  clamp: float = 0.0, slope: float = 0.01) -> nn.Module | None:
    if kind == "none":
        return None
    if kind == "category":
        return CategoryValueEncoder(n_bins, d_model)
    if kind == "continuous":
        return ContinuousValueEncoder(d_model, eps, clamp)
    return AutoDiscretization(n_bins, d_model, slope=slope)


class Embeddings(nn.Module):
    """Gene identity (+ position, token type, value, read-depth tokens), normed, dropped."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.genes = nn.Embedding(cfg.vocab_size, d)
        self.positions = nn.Embedding(cfg.max_position, d) if cfg.max_position else None
        self.token_types = nn.Embedding(cfg.type_vocab_size, d) if cfg.type_vocab_size else None
        # scGPT norms the gene embedding alone, before the value is added
        self.gene_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.gene_norm else None
        self.values = value_encoder(cfg.value_encoder, n_bins=cfg.n_bins, d_model=d,
                                    eps=cfg.norm_eps, clamp=cfg.value_clamp,
                                    slope=cfg.autobin_slope)
        self.depth = nn.Embedding(2, d) if cfg.depth_tokens else None
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.embed_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor | None,
                masked: torch.Tensor | None, packing: Packing,
                depth_kind: torch.Tensor | None = None) -> torch.Tensor:
        x_td = self.gene_vectors(gene_ids)
        if depth_kind is not None:  # read-depth tokens (kind 0 = T, 1 = S; -1 = a gene)
            x_td = torch.where(depth_kind[:, None] >= 0, self.depth(depth_kind.clamp(min=0)),
                               x_td)
        if self.positions is not None:
            if packing.max_len > self.positions.num_embeddings:
                msg = (f"A cell has {packing.max_len} tokens, more than the model's "
                       f"{self.positions.num_embeddings} positions; tokenize with "
                       f"max_len={self.positions.num_embeddings}.")
                raise ValueError(msg)
            x_td = x_td + self.positions(packing.position)
        if self.token_types is not None:
            x_td = x_td + self.token_types.weight[0]
        if self.values is not None:
            x_td = x_td + self.values(values.to(x_td.dtype), masked)
        return self.drop(self.norm(x_td))

    def gene_vectors(self, gene_ids: torch.Tensor) -> torch.Tensor:
        """The genes' embeddings (normed where ``gene_norm``), without values."""
        x_td = self.genes(gene_ids)
        return x_td if self.gene_norm is None else self.gene_norm(x_td)


# --- heads ---------------------------------------------------------------------------------
class MLMHead(nn.Module):
    """BERT's masked-token head: dense, activation, layer norm, then logits over the
    vocabulary through the (tied) gene embedding plus a bias."""

    def __init__(self, d_model: int, vocab_size: int, *, activation: str, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.decoder = nn.Linear(d_model, vocab_size)
        self.act = ACT[activation]

    def forward(self, h_nd: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(h_nd))))


class ValueHead(nn.Module):
    """Regresses a value per token (scGPT's expression decoder, scFoundation's output):
    ``n_layers`` linear layers ``fc1 .. fcN`` (the last one to a scalar), leaky ReLU
    between them."""

    def __init__(self, d_model: int, n_layers: int = 2) -> None:
        super().__init__()
        self.n_layers = n_layers
        for i in range(1, n_layers + 1):
            setattr(self, f"fc{i}", nn.Linear(d_model, 1 if i == n_layers else d_model))

    def forward(self, h_nd: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.n_layers):
            h_nd = F.leaky_relu(getattr(self, f"fc{i}")(h_nd))
        return getattr(self, f"fc{self.n_layers}")(h_nd)[:, 0]


class MVCDecoder(nn.Module):
    """scGPT's masked value prediction from the cell embedding: value of gene ``g`` in cell
    ``c`` = ``<sigmoid(Q e_g), W h_c>`` with ``e_g`` the gene's embedding."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.query = nn.Linear(d_model, d_model)
        self.cell = nn.Linear(d_model, d_model, bias=False)

    def forward(self, gene_emb_nd: torch.Tensor, cell_emb_nd: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(self.query(gene_emb_nd)) * self.cell(cell_emb_nd)).sum(-1)


class ClassifierHead(nn.Module):
    """Cell classification for fine-tuning, on the cell embedding: ``n_layers - 1`` times
    (linear, ReLU, layer norm) as scGPT's ``ClsDecoder``, then the output layer."""

    def __init__(self, d_model: int, n_classes: int, dropout: float, n_layers: int = 1,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model, eps=eps))
            for _ in range(n_layers - 1))
        self.drop, self.out = nn.Dropout(dropout), nn.Linear(d_model, n_classes)

    def forward(self, cell_bd: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            cell_bd = layer(cell_bd)
        return self.out(self.drop(cell_bd))


def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) weights, zero biases, unit layer norms (BERT / GPT-2 init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():  # after the Linear layers inside them
        if isinstance(m, ContinuousValueEncoder | AutoDiscretization):
            nn.init.normal_(m.mask, std=std)
        if isinstance(m, AutoDiscretization):
            nn.init.normal_(m.bins, std=std)
            # unit-scale slopes so that values (log1p, ~0..10) spread over the bins from the
            # start; at std 0.02 every value would get nearly the same soft bin
            nn.init.normal_(m.fc1.weight, std=1.0)


def residual_std(std: float, n_layers: int) -> float:
    """Scaled init of projections into the residual stream (GPT-2): std / sqrt(2 n_layers)."""
    return std / math.sqrt(2 * max(n_layers, 1))
