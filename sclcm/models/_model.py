"""CellModel: gene embedding + value encoder -> transformer blocks on packed cells -> heads.

Cells arrive packed (``gene_ids``, ``values`` of all cells end to end, ``offsets`` =
``cu_seqlens``), as :class:`~sclcm.tokenizers.TokenBatch` holds them; every layer works on
the ``tokens x d_model`` tensor and only attention looks at cell boundaries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._attention import Packing, ProbsFn, attention, find_keys, math_attention, repack
from ._config import ModelConfig, check_inputs, check_vocab
from ._layers import (
    ACT,
    ClassifierHead,
    Embeddings,
    MLMHead,
    MVCDecoder,
    ValueHead,
    init_weights,
    residual_std,
)

if TYPE_CHECKING:
    from pathlib import Path

    from ..genes import GeneVocab
    from ..tokenizers import TokenBatch


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        #: set by :meth:`CellModel.record_attention`: this layer then runs the math backend
        #: and hands each cell's probabilities to it
        self.on_probs: ProbsFn | None = None

    def forward(self, x_td: torch.Tensor, packing: Packing) -> torch.Tensor:
        T, d = x_td.shape
        q_thd, k_thd, v_thd = self.qkv(x_td).view(T, 3, self.n_heads, -1).unbind(1)
        kw = {"scale": q_thd.shape[-1] ** -0.5, "dropout": self.dropout if self.training else 0.0}
        o_thd = attention(q_thd, k_thd, v_thd, packing, **kw) if self.on_probs is None else \
            math_attention(q_thd, k_thd, v_thd, packing, on_probs=self.on_probs, **kw)
        return self.proj(o_thd.reshape(T, d))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.act = ACT[activation]

    def forward(self, x_td: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_td)))


class Block(nn.Module):
    """One transformer block, pre-norm (nanoGPT) or post-norm (BERT)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.ln_1 = nn.LayerNorm(d_model, eps=cfg.norm_eps)
        self.attn = SelfAttention(d_model, n_heads, cfg.attn_dropout)
        self.ln_2 = nn.LayerNorm(d_model, eps=cfg.norm_eps)
        self.mlp = MLP(d_model, d_ff, cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_td: torch.Tensor, packing: Packing) -> torch.Tensor:
        if self.pre_norm:
            x_td = x_td + self.drop(self.attn(self.ln_1(x_td), packing))
            return x_td + self.drop(self.mlp(self.ln_2(x_td)))
        x_td = self.ln_1(x_td + self.drop(self.attn(x_td, packing)))
        return self.ln_2(x_td + self.drop(self.mlp(x_td)))


class Stack(nn.Module):
    """Blocks plus the final layer norm of pre-norm models (and of ``final_norm`` ones)."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int,
                 cfg: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, cfg) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, eps=cfg.norm_eps) \
            if cfg.norm == "pre" or cfg.final_norm else None

    def forward(self, x_td: torch.Tensor, packing: Packing, keep: Collection[int] = (),
                upto: int | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Final states and those of the layers in ``keep`` (0 = input, i = after block i,
        the last one normed); stops after block ``upto``."""
        n, out = len(self.blocks), {}
        upto = n if upto is None else upto
        for i in range(upto + 1):
            if i > 0:
                x_td = self.blocks[i - 1](x_td, packing)
            if i == n and self.ln_f is not None:
                x_td = self.ln_f(x_td)
            if i in keep:
                out[i] = x_td
        return x_td, out


class CellModel(nn.Module):
    """A single-cell transformer built from a :class:`ModelConfig`.

    Parameters
    ----------
    config
        The configuration (see :meth:`ModelConfig.preset`).
    vocab
        The gene vocabulary; checked against ``config`` and saved with the model.
    tokenizer
        The tokenizer that makes the model's input; saved with the model.

    Examples
    --------
    >>> import torch
    >>> cfg = ModelConfig.preset("geneformer", "tiny", vocab_size=50, n_special_tokens=2,
    ...                          cls_id=-1)
    >>> model = CellModel(cfg).eval()
    >>> out = model(torch.tensor([5, 9, 7, 3, 8]), torch.tensor([0, 3, 5]))
    >>> out["last_hidden_state"].shape, out["cell_embedding"].shape
    (torch.Size([5, 64]), torch.Size([2, 64]))
    """

    def __init__(self, config: ModelConfig, *, vocab: GeneVocab | None = None,
                 tokenizer: Any = None) -> None:
        super().__init__()
        config.validate()
        if config.vocab_size <= config.n_special_tokens:
            msg = ("config.vocab_size is not set: build the config with "
                   "ModelConfig.preset(name, size, vocab=vocab).")
            raise ValueError(msg)
        if vocab is not None:
            check_vocab(config, vocab)
        self.config, self.vocab, self.tokenizer = config, vocab, None
        if tokenizer is not None:
            self.attach_tokenizer(tokenizer)
        cfg, d = config, config.d_model
        self.embed_tokens = Embeddings(cfg)
        self.encoder = Stack(cfg.n_layers, d, cfg.n_heads, cfg.d_ff, cfg)
        self.decoder_in = self.decoder = None
        if cfg.decoder_layers:  # scFoundation: a lighter decoder over all / sampled genes
            self.decoder_in = nn.Linear(d, cfg.decoder_d_model)
            if cfg.decoder_attention == "performer":  # the published scFoundation's
                from ._performer import PerformerStack

                self.decoder = PerformerStack(cfg.decoder_layers, cfg.decoder_d_model,
                                              cfg.decoder_heads, cfg.decoder_d_ff,
                                              cfg.decoder_features, cfg.norm_eps)
            else:
                self.decoder = Stack(cfg.decoder_layers, cfg.decoder_d_model,
                                     cfg.decoder_heads, cfg.decoder_d_ff, cfg)
        self.head = {"none": lambda: None, "bin": lambda: nn.Linear(d, cfg.n_bins),
                     "mlm": lambda: MLMHead(d, cfg.vocab_size, activation=cfg.activation,
                                            eps=cfg.norm_eps),
                     "value": lambda: ValueHead(d, cfg.value_head_layers),
                     "depth_value": lambda: ValueHead(cfg.decoder_d_model,
                                                      cfg.value_head_layers)}[cfg.objective]()
        self.mvc = MVCDecoder(d) if cfg.mvc else None
        self.classifier = ClassifierHead(d, cfg.n_classes, cfg.dropout, cfg.classifier_layers,
                                         cfg.norm_eps) if cfg.n_classes else None
        # a bottleneck: a linear read of the cell embedding must hold the cell's expression
        self.recon_head = nn.Linear(d, len(cfg.recon_panel)) if cfg.recon_panel else None
        self.tie_weights()
        self.reset_parameters()

    # --- parameters ------------------------------------------------------------------
    def tie_weights(self) -> None:
        """The MLM decoder shares the gene embedding (BERT)."""
        if isinstance(self.head, MLMHead) and self.config.tie_word_embeddings:
            self.head.decoder.weight = self.embed_tokens.genes.weight

    def reset_parameters(self) -> None:
        """Random init; projections into the residual stream get std / sqrt(2 n_layers)."""
        std = self.config.initializer_range
        init_weights(self, std)
        for stack in (self.encoder, self.decoder):
            for block in stack.blocks if stack is not None else ():
                for w in (block.attn.proj.weight, block.mlp.fc2.weight):
                    nn.init.normal_(w, std=residual_std(std, len(stack.blocks)))
        if hasattr(self.decoder, "reset_projections"):
            self.decoder.reset_projections()

    def get_num_params(self, *, non_embedding: bool = False) -> int:
        """Number of parameters (shared ones once); without gene/position embeddings
        when ``non_embedding``."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            emb = self.embed_tokens
            n -= sum(m.weight.numel() for m in (emb.genes, emb.positions) if m is not None)
        return n

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: weight decay on matrices and embeddings (2+ dims) only."""
        params = list(self.parameters())  # shared parameters appear once
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ``ValueError`` unless ``tokenizer`` makes input for this model."""
        if getattr(tokenizer, "name", None) != self.config.tokenizer:
            msg = (f"A {getattr(tokenizer, 'name', type(tokenizer).__name__)!r} tokenizer "
                   f"cannot feed a {self.config.tokenizer!r} model.")
            raise ValueError(msg)
        check_vocab(self.config, tokenizer.vocab)
        n_pos = self.config.max_position
        if n_pos and (tokenizer.max_len is None or tokenizer.max_len > n_pos):
            # a rank family's positions bound its cells' length: refuse now, not mid-embed
            msg = (f"The tokenizer makes cells of up to {tokenizer.max_len or 'any number of'} "
                   f"tokens, but the model has {n_pos} positions: make the tokenizer with "
                   f"max_len={n_pos} (e.g. GeneformerTokenizer(vocab, medians, "
                   f"max_len={n_pos})).")
            raise ValueError(msg)
        if self.vocab is not None and tokenizer.vocab != self.vocab:
            msg = "The tokenizer's vocabulary differs from the model's (model.vocab)."
            raise ValueError(msg)

    def attach_tokenizer(self, tokenizer: Any) -> None:
        """Keep ``tokenizer`` with the model (and saved with it) after checking it."""
        self.check_tokenizer(tokenizer)
        if self.vocab is None:
            self.vocab = tokenizer.vocab
        self.tokenizer = tokenizer

    # --- forward ---------------------------------------------------------------------
    def forward(self, gene_ids: torch.Tensor, offsets: torch.Tensor,
                values: torch.Tensor | None = None, *, masked: torch.Tensor | None = None,
                depth: torch.Tensor | None = None, generative: bool = False,
                decoder_gene_ids: torch.Tensor | None = None,
                decoder_offsets: torch.Tensor | None = None,
                output_hidden_states: bool | Sequence[int] = False,
                attn_implementation: str | None = None, heads: bool = True,
                upto: int | None = None, replace_masked: bool = True) -> dict[str, Any]:
        """Run packed cells through the model.

        Parameters
        ----------
        gene_ids, offsets, values
            Packed token ids (``T``), ``n_cells + 1`` offsets, a float value per token.
        masked
            Bool per token: tokens whose identity (geneformer: replaced by ``<mask>``) or
            value (the other families) is hidden; the heads predict them. scFoundation's
            encoder leaves them out and its decoder sees them as masked.
        depth
            ``n_cells x 2`` read-depth values (scFoundation's T and S tokens).
        generative
            scGPT's generative attention: masked tokens are queries that attend to the
            known tokens and themselves; known tokens attend only to known tokens.
        decoder_gene_ids, decoder_offsets
            Genes the scFoundation decoder runs over, packed per cell (default: the input
            tokens); genes absent from the input enter with value 0.
        output_hidden_states
            ``True`` for all layers or a list of layer indices (0 = embeddings, ``i`` =
            after block ``i``; negative ones count from the end).
        attn_implementation
            Overrides ``config.attn_implementation`` for this call.
        heads
            ``False`` skips the heads (embeddings only).
        upto
            Stop after this block (for an inner layer's embeddings; skips the heads).
        replace_masked
            Geneformer: replace the ids of ``masked`` tokens by ``<mask>``. ``False`` when
            the caller corrupted them already (BERT's 80/10/10, see
            :class:`sclcm.data.MaskingCollator`); ``masked`` still marks what the head
            predicts.

        Returns
        -------
        dict[str, Any]
            A dict: ``last_hidden_state`` (encoder tokens x d) with its ``offsets`` (read-depth
            tokens added, scFoundation's masked tokens left out), ``hidden_states`` (layer ->
            tensor) when asked, ``cell_embedding``; from the heads, at the input tokens
            ``target_index`` (the masked ones, else all): ``logits`` (mlm, bin), ``pred``
            (values), ``mvc_pred``; per cell: ``class_logits``, ``recon_pred`` (the
            ``recon_panel`` genes' log1p expression per 10,000 counts); scFoundation's
            ``decoder_pred``, ``decoder_hidden_state`` (its gene embeddings),
            ``decoder_gene_ids``, ``decoder_offsets``.
        """
        cfg = self.config
        backend = attn_implementation or cfg.attn_implementation
        gene_ids, offsets = gene_ids.long(), offsets.long().to(gene_ids.device)
        check_inputs(cfg, gene_ids, offsets, values, masked, depth,
                     needs_values=cfg.value_encoder != "none" or self.decoder is not None)
        if generative and masked is None:
            msg = "generative=True needs masked= (the genes whose values are to be predicted)."
            raise ValueError(msg)
        inp = Packing(offsets, backend=backend)
        ids = gene_ids.masked_fill(masked, cfg.mask_id) if masked is not None and \
            cfg.objective == "mlm" and replace_masked else gene_ids

        # Encoder layout: scFoundation leaves masked tokens out and adds read-depth tokens.
        enc, enc_ids, enc_values, enc_masked, kind = inp, ids, values, masked, None
        enc_pos = torch.arange(len(ids), device=ids.device)  # input token -> encoder token
        drop = masked is not None and self.decoder is not None
        n_prefix = 2 if cfg.depth_tokens else 0
        if drop or n_prefix:
            keep = ~masked if drop else torch.ones_like(ids, dtype=torch.bool)
            dest, enc_offsets, prefix = repack(keep, offsets, n_prefix, inp.cell)
            enc_pos = torch.full_like(ids, -1).masked_scatter_(keep, dest)
            T = int(enc_offsets[-1])
            enc_ids = ids.new_full((T,), cfg.pad_id).index_copy_(0, dest, ids[keep])
            kind = torch.full((T,), -1, device=ids.device)
            kind[prefix] = torch.arange(n_prefix, device=ids.device)
            enc_values = torch.zeros(T, device=ids.device)
            enc_values[dest] = values[keep].float()
            if n_prefix:
                enc_values[prefix] = depth.float()
            enc_masked = None if masked is None or drop else \
                torch.zeros(T, dtype=torch.bool, device=ids.device).index_copy_(0, dest, masked)
            enc = Packing(enc_offsets, backend=backend)
        enc.query = enc_masked if generative else None

        n = cfg.n_layers
        keep_layers = set() if output_hidden_states is False else set(range(n + 1)) \
            if output_hidden_states is True else {i % (n + 1) for i in output_hidden_states}
        x_td = self.embed_tokens(enc_ids, enc_values, enc_masked, enc, kind)
        h_td, hidden = self.encoder(x_td, enc, keep_layers, upto)
        cell_bd = self.pool(h_td, enc_ids, enc, n_prefix)
        out: dict[str, Any] = {"last_hidden_state": h_td, "offsets": enc.offsets,
                               "cell_embedding": F.normalize(cell_bd, dim=-1)
                               if cfg.normalize_embedding else cell_bd}
        if output_hidden_states is not False:
            out["hidden_states"] = hidden
        if not heads or upto is not None:
            return out

        target = masked.nonzero()[:, 0] if masked is not None else \
            torch.arange(len(ids), device=ids.device)
        out["target_index"] = target
        if cfg.objective in ("mlm", "bin"):
            out["logits"] = self.head(h_td[enc_pos[target]])
        elif cfg.objective == "value":
            out["pred"] = self.head(h_td[enc_pos[target]])
        elif cfg.objective == "depth_value":
            out.update(self._decode(h_td, enc, enc_pos, inp, gene_ids, masked, target,
                                    decoder_gene_ids, decoder_offsets, n_prefix))
        if self.mvc is not None:
            out["mvc_pred"] = self.mvc(self.embed_tokens.gene_vectors(gene_ids[target]),
                                       cell_bd[inp.cell[target]])
        if self.classifier is not None:
            out["class_logits"] = self.classifier(cell_bd)
        if self.recon_head is not None:
            out["recon_pred"] = self.recon_head(cell_bd)
        return out

    def _decode(self, h_td: torch.Tensor, enc: Packing, enc_pos: torch.Tensor, inp: Packing,
                gene_ids: torch.Tensor, masked: torch.Tensor | None, target: torch.Tensor,
                dec_ids: torch.Tensor | None, dec_offsets: torch.Tensor | None,
                n_prefix: int) -> dict[str, torch.Tensor]:
        """scFoundation's decoder: encoder outputs scattered back among the decoder's genes;
        genes the encoder did not see enter as embeddings of value 0, or masked."""
        V, dev = self.config.vocab_size, gene_ids.device
        if dec_ids is None:
            dec_ids, dec_offsets = gene_ids, inp.offsets
        elif dec_offsets is None:
            msg = "decoder_gene_ids needs decoder_offsets."
            raise ValueError(msg)
        dec = Packing(dec_offsets.long().to(dev), backend=enc.backend)
        dec_ids = dec_ids.long().to(dev)
        src = find_keys(inp.cell * V + gene_ids, dec.cell * V + dec_ids)  # input token, or -1
        src_c = src.clamp(min=0)
        is_masked = (src >= 0) & masked[src_c] if masked is not None else None
        from_enc = (src >= 0) if is_masked is None else (src >= 0) & ~is_masked
        x_td = self.embed_tokens(dec_ids, torch.zeros(len(dec_ids), device=dev), is_masked, dec)
        h_enc = h_td[enc_pos[src_c]]
        if self.config.decoder_gene_embedding:  # scFoundation adds them again
            h_enc = h_enc + self.embed_tokens.gene_vectors(dec_ids)
        x_td = torch.where(from_enc[:, None], h_enc, x_td)
        # the read-depth tokens lead each decoder cell too
        ddest, d_offsets, prefix = repack(torch.ones_like(dec_ids, dtype=torch.bool),
                                           dec.offsets, n_prefix, dec.cell)
        x_dec = h_td.new_empty(int(d_offsets[-1]), h_td.shape[1])
        x_dec[ddest] = x_td
        x_dec[prefix] = h_td[enc.offsets[:-1, None] + torch.arange(n_prefix, device=dev)]
        if self.config.decoder_gene_embedding and n_prefix:
            x_dec[prefix] += self.embed_tokens.depth.weight
        y_td, _ = self.decoder(self.decoder_in(x_dec), Packing(d_offsets, backend=enc.backend))
        pred = self.head(y_td[ddest])
        pos = find_keys(dec.cell * V + dec_ids, inp.cell[target] * V + gene_ids[target])
        if bool((pos < 0).any()):
            msg = "decoder_gene_ids must include every masked gene of its cell."
            raise ValueError(msg)
        return {"pred": pred[pos], "decoder_pred": pred, "decoder_hidden_state": y_td[ddest],
                "decoder_gene_ids": dec_ids, "decoder_offsets": dec.offsets}

    def pool(self, h_td: torch.Tensor, gene_ids: torch.Tensor, packing: Packing,
             n_prefix: int = 0) -> torch.Tensor:
        """Cell embeddings: the ``<cls>`` state, or the mean over gene tokens (special and
        read-depth tokens excluded)."""
        if self.config.pooling == "cls":
            first = packing.offsets[:-1] + n_prefix
            if bool((gene_ids[first] != self.config.cls_id).any()):
                msg = ("pooling='cls' but a cell does not start with <cls>: tokenize with the "
                       "model's tokenizer (special tokens on).")
                raise ValueError(msg)
            return h_td[first]
        # sums in float32: half precision loses digits over thousands of tokens
        is_gene = (gene_ids >= self.config.n_special_tokens).float()
        sums = h_td.new_zeros(packing.n_cells, h_td.shape[1], dtype=torch.float32).index_add_(
            0, packing.cell, h_td.float() * is_gene[:, None])
        counts = is_gene.new_zeros(packing.n_cells).index_add_(0, packing.cell, is_gene)
        return (sums / counts.clamp(min=1)[:, None]).to(h_td.dtype)

    @contextlib.contextmanager
    def record_attention(self, layers: Sequence[int],
                         fn: Callable[[int, int, torch.Tensor], None]) -> Iterator[None]:
        """Within the block, the encoder blocks in ``layers`` (0 = the first; negative ones
        count from the end) compute attention on the ``math`` backend and call
        ``fn(layer, cell, p_hll)`` with each cell's probabilities (heads x queries x keys,
        float32, over the cell's encoder tokens); the other blocks keep their backend.

        >>> import torch
        >>> cfg = ModelConfig.preset("geneformer", "tiny", vocab_size=50, n_special_tokens=2,
        ...                          cls_id=-1)
        >>> model, seen = CellModel(cfg).eval(), []
        >>> with model.record_attention([-1], lambda l, c, p: seen.append((l, c, p.shape))):
        ...     _ = model(torch.tensor([5, 9, 7, 3, 8]), torch.tensor([0, 3, 5]))
        >>> seen
        [(1, 0, torch.Size([2, 3, 3])), (1, 1, torch.Size([2, 2, 2]))]
        """
        blocks = self.encoder.blocks
        chosen = sorted({int(i) % len(blocks) for i in layers})
        try:
            for i in chosen:
                blocks[i].attn.on_probs = lambda c, p, i=i: fn(i, c, p)
            yield
        finally:
            for i in chosen:
                blocks[i].attn.on_probs = None

    # --- batches, embeddings, persistence ----------------------------------------------
    def inputs(self, batch: TokenBatch, *, device: str | torch.device | None = None
               ) -> dict[str, torch.Tensor]:
        """The forward arguments of a :class:`~sclcm.tokenizers.TokenBatch`, as tensors."""
        device = next(self.parameters()).device if device is None else torch.device(device)
        out = {"gene_ids": torch.from_numpy(batch.gene_ids).to(device, torch.long),
               "offsets": torch.from_numpy(batch.offsets).to(device),
               "values": torch.from_numpy(batch.values).to(device)}
        if self.config.depth_tokens:
            if not {"depth_T", "depth_S"} <= set(batch.extras):
                msg = ("This model reads read-depth tokens: tokenize with the scfoundation "
                       "tokenizer (extras depth_T and depth_S).")
                raise ValueError(msg)
            depth = np.stack([batch.extras["depth_T"], batch.extras["depth_S"]], axis=1)
            out["depth"] = torch.from_numpy(depth.astype(np.float32)).to(device)
        return out

    @torch.inference_mode()
    def embed(self, batch: TokenBatch, *, layer: int | None = None,
              batch_size: int = 64, special_tokens: bool = False) -> np.ndarray:
        """Cell embeddings (``n_cells x d_model``, float32) of a tokenized batch.

        Parameters
        ----------
        batch
            Cells from the model's tokenizer.
        layer
            Hidden layer to pool (0 = embeddings, ``n_layers`` or -1 = last); default last.
            Geneformer's ``EmbExtractor(emb_layer=-1)``, its default, reads the
            second-to-last layer: ``layer=-2`` here; its ``emb_layer=0`` (and Helical) the
            last one, sclcm's default.
        batch_size
            Cells per forward pass (on the model's device).
        special_tokens
            Mean pooling: also average the ``<cls>`` / ``<eos>`` states (Geneformer's
            ``mean_nonpadding_embs`` over all tokens); by default only gene tokens count.
        """
        cfg = self.config
        if special_tokens and (cfg.pooling != "mean" or cfg.depth_tokens):
            msg = "special_tokens=True applies to mean pooling over the input tokens only."
            raise ValueError(msg)
        upto = None if layer is None else layer % (cfg.n_layers + 1)
        was_training = self.training
        self.eval()
        try:
            chunks = [self._embed_chunk(batch[i:i + batch_size], upto, special_tokens)
                      for i in range(0, batch.n_cells, batch_size)]
        finally:
            self.train(was_training)
        d = self.config.d_model
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, d), np.float32)

    def _embed_chunk(self, batch: TokenBatch, upto: int | None,
                     special_tokens: bool) -> torch.Tensor:  # noqa: FBT001
        inp = self.inputs(batch)
        out = self(**inp, heads=False, upto=upto)
        if not special_tokens:
            return out["cell_embedding"].float().cpu()
        h_td, packing = out["last_hidden_state"].float(), Packing(out["offsets"])
        sums = h_td.new_zeros(packing.n_cells, h_td.shape[1]).index_add_(0, packing.cell, h_td)
        cell_bd = sums / packing.offsets.diff().clamp(min=1)[:, None]
        if self.config.normalize_embedding:
            cell_bd = F.normalize(cell_bd, dim=-1)
        return cell_bd.cpu()

    def save_pretrained(self, directory: str | Path, *, tokenizer: Any = None,
                        dtype: str | torch.dtype | None = None) -> None:
        """Write ``config.json``, ``model.safetensors``, ``vocab.json`` and the tokenizer
        (``tokenizer/``; ``tokenizer`` or the attached one) to ``directory``; no pickle.

        ``dtype`` (``"float16"``, ``"bfloat16"``) stores the floating weights compactly
        (half the bytes); :meth:`from_pretrained` casts them back to float32."""
        from ._io import save_pretrained

        save_pretrained(self, directory, tokenizer=tokenizer, dtype=dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> CellModel:
        """Load a model written by :meth:`save_pretrained` (a directory, or the name of a
        shipped model, :func:`sclcm.tl.shipped_models`), checking every file's checksum,
        the tensor names and shapes, and the vocabulary."""
        from .._shipped import model_path
        from ._io import load_pretrained

        return load_pretrained(cls, model_path(directory), device=device, dtype=dtype)
