"""import_scfoundation: parity of the encoder and of the Performer decoder with a reference
built from torch's own layers and ops in scFoundation's key layout, on real cells tokenized
by sclcm."""

from __future__ import annotations

from functools import cache

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import PBMC3K, _load
from test_model_data import cell_rows
from torch import nn

from sclcm import InputError
from sclcm.models import (
    CellModel,
    ModelConfig,
    import_scfoundation,
    scfoundation_cell_embedding,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, HEADS, DEPTH, BINS = 32, 4, 2, 10
DEC, DEC_HEADS, DEC_DEPTH, FEATURES = 16, 2, 2, 16  # dim_head 8: 8 ln 8 = 16 features
PAD, MASK = 103.0, 102.0  # scFoundation's pad and mask values
TOL = 1e-5


@cache
def genes() -> list[str]:
    adata = _load(PBMC3K)
    expressed = np.asarray((adata.X[cell_rows()] > 0).sum(0)).ravel() > 0
    return list(dict.fromkeys(adata.var_names[expressed]))


class ScFoundationReference(nn.Module):
    """scFoundation's MaeAutobin encoder path from torch's layers and its module names:
    auto-discretization (leaky ReLU 0.1, softmax over bins), ``pos_emb`` per gene (T, S
    after the genes), post-norm ``nn.TransformerEncoderLayer`` x depth, a final layer norm."""

    def __init__(self, n_genes: int) -> None:
        super().__init__()
        self.token_emb = nn.Module()
        self.token_emb.mlp, self.token_emb.mlp2 = nn.Linear(1, BINS), nn.Linear(BINS, BINS)
        self.token_emb.emb = nn.Embedding(BINS, D)
        self.token_emb.emb_mask, self.token_emb.emb_pad = nn.Embedding(1, D), nn.Embedding(1, D)
        self.pos_emb = nn.Embedding(n_genes + 3, D)  # seq_len + 1 rows
        self.encoder = nn.Module()
        self.encoder.transformer_encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(D, HEADS, 4 * D, batch_first=True) for _ in range(DEPTH))
        self.encoder.norm = nn.LayerNorm(D)
        self.decoder = PerformerReference()
        self.decoder_embed, self.norm, self.to_final = nn.Linear(D, DEC), nn.LayerNorm(DEC), \
            nn.Linear(DEC, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.3)

    def embed(self, values):
        t = self.token_emb
        a = F.leaky_relu(t.mlp(values[..., None]), 0.1)
        x = (a + t.mlp2(a)).softmax(-1) @ t.emb.weight
        return torch.where((values == PAD)[..., None], t.emb_pad.weight[0], x)

    def forward(self, values, pos_ids, pad):
        x = self.embed(values) + self.pos_emb(pos_ids)
        for layer in self.encoder.transformer_encoder:
            x = layer(x, src_key_padding_mask=pad)
        return self.encoder.norm(x)

    def decode(self, full):
        """MaeAutobin's forward for one cell (as scFoundation's scripts run them): ``full``
        holds every gene's value, then T and S; the encoder sees those > 0; its states
        replace their embeddings among all genes, the gene embeddings are added to all,
        then decoder_embed, the Performer, norm, to_final."""
        n = len(full)
        seen = (full > 0).nonzero()[:, 0]
        h = self(full[seen][None], seen[None], None)[0]
        x = self.embed(full)
        x[seen] = h
        x = x + self.pos_emb(torch.arange(n))
        y = self.norm(self.decoder(self.decoder_embed(x)[None]))[0]
        return y, self.to_final(y)[:, 0]


class PerformerReference(nn.Module):
    """The published PerformerModule by its module names (``performer.net.layers[i]`` =
    [pre-norm self-attention, pre-norm feed-forward], then ``norm``), FAVOR+ attention written
    from the published algorithm: the softmax kernel's random features (a query's stabiliser
    its own max, the keys' the max over the whole tensor), no mask, linear attention."""

    def __init__(self) -> None:
        super().__init__()
        self.performer = nn.Module()
        self.performer.net = nn.Module()
        self.performer.net.layers = nn.ModuleList()
        for _ in range(DEC_DEPTH):
            attn, ff = nn.Module(), nn.Module()
            attn.norm, attn.fn = nn.LayerNorm(DEC), nn.Module()
            for name in ("to_q", "to_k", "to_v", "to_out"):
                setattr(attn.fn, name, nn.Linear(DEC, DEC))
            attn.fn.fast_attention = nn.Module()
            attn.fn.fast_attention.register_buffer(
                "projection_matrix", torch.randn(FEATURES, DEC // DEC_HEADS))
            ff.norm, ff.fn = nn.LayerNorm(DEC), nn.Module()
            ff.fn.fn = nn.Module()
            ff.fn.fn.w1, ff.fn.fn.w2 = nn.Linear(DEC, 4 * DEC), nn.Linear(4 * DEC, DEC)
            self.performer.net.layers.append(nn.ModuleList([attn, ff]))
        self.performer.register_buffer("calls_since_last_redraw", torch.tensor(0))
        self.norm = nn.LayerNorm(DEC)  # PerformerModule's, after the Performer

    def forward(self, x):
        for attn, ff in self.performer.net.layers:
            x = x + self.attention(attn.fn, attn.norm(x))
            x = x + ff.fn.fn.w2(F.gelu(ff.fn.fn.w1(ff.norm(x))))
        return self.norm(x)

    @staticmethod
    def attention(fn, x):
        b, n, _ = x.shape
        q, k, v = (getattr(fn, f)(x).view(b, n, DEC_HEADS, -1).transpose(1, 2)
                   for f in ("to_q", "to_k", "to_v"))  # b h n e
        proj = fn.fast_attention.projection_matrix

        def kernel(t, *, is_query):
            c = t.shape[-1] ** -0.25
            dash = (c * t) @ proj.T
            diag = (t**2).sum(-1, keepdim=True) / 2 * c**2
            top = dash.max(-1, keepdim=True).values if is_query else dash.max()
            return proj.shape[0] ** -0.5 * (torch.exp(dash - diag - top) + 1e-4)

        qf, kf = kernel(q, is_query=True), kernel(k, is_query=False)
        out = (qf @ (kf.transpose(-1, -2) @ v)) / (qf @ kf.sum(-2)[..., None])
        return fn.to_out(out.transpose(1, 2).reshape(b, n, DEC))


def write_checkpoint(tmp_path, *, edit=None):
    torch.manual_seed(0)
    ref = ScFoundationReference(len(genes())).eval()
    sd = {f"model.{k}": v for k, v in ref.state_dict().items()}
    if edit is not None:
        edit(sd)
    config = {"model": "mae_autobin", "model_config": {"mae_autobin": {
        "encoder": {"hidden_dim": D, "depth": DEPTH, "heads": HEADS, "module_type": "transformer"},
        "decoder": {"hidden_dim": DEC, "depth": DEC_DEPTH, "heads": DEC_HEADS,
                    "dim_head": DEC // DEC_HEADS, "module_type": "performer"},
        "seq_len": len(genes()) + 2, "bin_num": BINS, "bin_alpha": 1.0, "pad_token_id": PAD,
        "mask_token_id": MASK, "n_class": 104}}, "dataset_config": {"rnaseq": {}}}
    torch.save({"cell": {"config": config, "state_dict": sd}}, tmp_path / "models.ckpt")
    pd.DataFrame({"gene_name": genes(), "index": range(len(genes()))}).to_csv(
        tmp_path / "genes.tsv", sep="\t", index=False)
    return ref


def test_encoder_parity_with_the_torch_reference(tmp_path):
    ref = write_checkpoint(tmp_path)
    model = import_scfoundation(tmp_path / "models.ckpt", tmp_path / "genes.tsv")
    batch = model.tokenizer.tokenize(_load(PBMC3K)[cell_rows()[:10]].copy())
    assert batch.lengths.min() < 300 < 1500 < batch.lengths.max()
    # scFoundation's input per cell: the genes' values, then T and S, padded with PAD
    n, special = len(genes()), len(model.vocab.special_tokens)
    lens = batch.lengths + 2
    L = int(lens.max())
    values = torch.full((batch.n_cells, L), PAD)
    pos = torch.zeros((batch.n_cells, L), dtype=torch.long)
    for c in range(batch.n_cells):
        a, b = batch.offsets[c], batch.offsets[c + 1]
        k = b - a
        values[c, :k] = torch.from_numpy(batch.values[a:b])
        values[c, k:k + 2] = torch.tensor([batch.extras["depth_T"][c],
                                           batch.extras["depth_S"][c]])
        pos[c, :k] = torch.from_numpy(batch.gene_ids[a:b] - special)
        pos[c, k:k + 2] = torch.tensor([n, n + 1])
    pad = torch.arange(L)[None] >= torch.from_numpy(lens)[:, None]
    with torch.no_grad():
        h = ref(values, pos, pad)
        out = model.eval()(**model.inputs(batch), heads=False)
    ours, offs = out["last_hidden_state"], out["offsets"]
    worst, cells = 0.0, []
    for c in range(batch.n_cells):
        k = int(lens[c]) - 2
        mine = ours[offs[c]:offs[c + 1]]  # T, S, genes
        theirs = torch.cat([h[c, k:k + 2], h[c, :k]])
        worst = max(worst, (mine - theirs).abs().max().item())
        cells.append(torch.cat([h[c, k + 1], h[c, k], h[c, :k].max(0).values,
                                h[c, :k].mean(0)]))
    assert worst <= TOL, worst
    emb = scfoundation_cell_embedding(model, batch)
    assert emb.shape == (batch.n_cells, 4 * D)
    assert (emb - torch.stack(cells)).abs().max().item() <= TOL
    assert model.embed(batch).shape == (batch.n_cells, D)  # the tools' mean over genes


def test_decoder_parity_with_the_published_performer(tmp_path):
    """Expression prediction and gene embeddings over every gene of the panel, per cell."""
    ref = write_checkpoint(tmp_path)
    model = import_scfoundation(tmp_path / "models.ckpt", tmp_path / "genes.tsv").eval()
    assert model.config.decoder_attention == "performer"
    batch = model.tokenizer.tokenize(_load(PBMC3K)[cell_rows()[:3]].copy())
    n, special = len(genes()), len(model.vocab.special_tokens)
    every = np.arange(special, special + n)
    with torch.no_grad():
        out = model(**model.inputs(batch),
                    decoder_gene_ids=torch.from_numpy(np.tile(every, batch.n_cells)),
                    decoder_offsets=torch.arange(batch.n_cells + 1) * n)
    worst_pred = worst_hidden = 0.0
    for c in range(batch.n_cells):
        a, b = batch.offsets[c], batch.offsets[c + 1]
        full = torch.zeros(n + 2)  # scFoundation's input: every gene's value, then T, S
        full[batch.gene_ids[a:b] - special] = torch.from_numpy(batch.values[a:b])
        full[n:] = torch.tensor([batch.extras["depth_T"][c], batch.extras["depth_S"][c]])
        with torch.no_grad():
            hidden, pred = ref.decode(full)
        mine = slice(c * n, (c + 1) * n)
        worst_pred = max(worst_pred, (out["decoder_pred"][mine] - pred[:n]).abs().max().item())
        worst_hidden = max(worst_hidden, (out["decoder_hidden_state"][mine]
                                          - hidden[:n]).abs().max().item())
    assert worst_pred <= TOL, worst_pred
    assert worst_hidden <= TOL, worst_hidden
    assert out["decoder_pred"].std() > 0.01  # the comparison is not between constants
    # saved and loaded, the projections travel with the weights
    model.save_pretrained(tmp_path / "saved")
    again = CellModel.from_pretrained(tmp_path / "saved").eval()
    for ours, theirs in zip(model.decoder.blocks, again.decoder.blocks, strict=True):
        assert torch.equal(ours.attn.projection, theirs.attn.projection)


def test_without_the_decoder_the_encoder_alone(tmp_path):
    write_checkpoint(tmp_path)
    model = import_scfoundation(tmp_path / "models.ckpt", tmp_path / "genes.tsv",
                                decoder=False)
    assert model.decoder is None
    assert model.config.objective == "none"


@pytest.mark.parametrize(("edit", "match"), [
    (lambda sd: sd.pop("model.encoder.norm.weight"), r"missing \['encoder\.norm\.weight'\]"),
    (lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(2)),
     r"cannot place \['extra\.weight'\]"),
    (lambda sd: sd.__setitem__("model.token_emb.mlp2.weight", torch.zeros(3, 3)),
     r"token_emb\.mlp2\.weight has shape \(3, 3\), the config says \(10, 10\)"),
    (lambda sd: sd.pop("model.decoder.performer.net.layers.1.0.fn.fast_attention."
                       "projection_matrix"),
     r"missing \['decoder\.performer\.net\.layers\.1\.0\.fn\.fast_attention\."
     r"projection_matrix'\]"),
], ids=["missing", "extra", "wrong_shape", "missing_projection"])
def test_checkpoints_that_do_not_fit_are_refused(tmp_path, edit, match):
    write_checkpoint(tmp_path, edit=edit)
    with pytest.raises(InputError, match=match):
        import_scfoundation(tmp_path / "models.ckpt", tmp_path / "genes.tsv")


def test_a_pickled_object_is_refused(tmp_path):
    torch.save({"cell": nn.Linear(2, 2)}, tmp_path / "models.ckpt")
    with pytest.raises(InputError, match="weights_only"):
        import_scfoundation(tmp_path / "models.ckpt", tmp_path / "genes.tsv")


def test_a_new_performer_decoder_trains_and_each_cell_is_its_own():
    """Built fresh (not imported), the decoder draws orthogonal random features, passes
    gradients, and a cell's prediction does not depend on the cells packed with it (each
    cell's key sums are its own)."""
    from test_model_data import random_mask, tokens

    tok, batch = tokens("scfoundation", 4)
    torch.manual_seed(0)
    config = ModelConfig.preset("scfoundation", "tiny", vocab=tok.vocab,
                                decoder_attention="performer", decoder_features=24,
                                decoder_gene_embedding=True, value_head_layers=1)
    model = CellModel(config, tokenizer=tok)
    proj = model.decoder.blocks[0].attn.projection
    e = proj.shape[1]
    rows = proj[:e] / proj[:e].norm(dim=1, keepdim=True)
    assert len(proj) > e  # a full block of orthogonal rows, then part of another
    torch.testing.assert_close(rows @ rows.T, torch.eye(e), atol=1e-5, rtol=0)
    inputs, masked = model.inputs(batch), random_mask(batch, 0.2)
    out = model.train()(**inputs, masked=masked)
    F.mse_loss(out["pred"], inputs["values"][masked].float()).backward()
    assert model.decoder.blocks[0].attn.k.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        together = model(**inputs, masked=masked)["pred"]
        a, b = int(batch.offsets[0]), int(batch.offsets[1])
        first = model(inputs["gene_ids"][a:b], torch.tensor([0, b - a]),
                      inputs["values"][a:b], depth=inputs["depth"][:1],
                      masked=masked[a:b])["pred"]
    n_first = int(masked[a:b].sum())
    assert n_first > 0
    torch.testing.assert_close(first, together[:n_first], atol=1e-5, rtol=0)
