"""import_scfoundation: parity of the encoder with a reference built from torch's own layers
in scFoundation's key layout, on real cells tokenized by sclcm."""

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
from sclcm.models import import_scfoundation, scfoundation_cell_embedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, HEADS, DEPTH, BINS = 32, 4, 2, 10
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
        self.decoder_embed, self.norm, self.to_final = nn.Linear(D, 16), nn.LayerNorm(16), \
            nn.Linear(16, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.3)

    def forward(self, values, pos_ids, pad):
        t = self.token_emb
        a = F.leaky_relu(t.mlp(values[..., None]), 0.1)
        x = (a + t.mlp2(a)).softmax(-1) @ t.emb.weight
        x = torch.where((values == PAD)[..., None], t.emb_pad.weight[0], x)
        x = x + self.pos_emb(pos_ids)
        for layer in self.encoder.transformer_encoder:
            x = layer(x, src_key_padding_mask=pad)
        return self.encoder.norm(x)


def write_checkpoint(tmp_path, *, edit=None):
    torch.manual_seed(0)
    ref = ScFoundationReference(len(genes())).eval()
    sd = {f"model.{k}": v for k, v in ref.state_dict().items()}
    sd["model.decoder.net.layers.0.0.fn.fn.to_q.weight"] = torch.zeros(16, 16)  # a Performer
    if edit is not None:
        edit(sd)
    config = {"model": "mae_autobin", "model_config": {"mae_autobin": {
        "encoder": {"hidden_dim": D, "depth": DEPTH, "heads": HEADS, "module_type": "transformer"},
        "decoder": {"hidden_dim": 16, "depth": 1, "heads": 2, "module_type": "performer"},
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


@pytest.mark.parametrize(("edit", "match"), [
    (lambda sd: sd.pop("model.encoder.norm.weight"), r"missing \['encoder\.norm\.weight'\]"),
    (lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(2)),
     r"cannot place \['extra\.weight'\]"),
    (lambda sd: sd.__setitem__("model.token_emb.mlp2.weight", torch.zeros(3, 3)),
     r"token_emb\.mlp2\.weight has shape \(3, 3\), the config says \(10, 10\)"),
], ids=["missing", "extra", "wrong_shape"])
def test_checkpoints_that_do_not_fit_are_refused(tmp_path, edit, match):
    write_checkpoint(tmp_path, edit=edit)
    with pytest.raises(InputError, match=match):
        import_scfoundation(tmp_path / "models.ckpt", tmp_path / "genes.tsv")


def test_a_pickled_object_is_refused(tmp_path):
    torch.save({"cell": nn.Linear(2, 2)}, tmp_path / "models.ckpt")
    with pytest.raises(InputError, match="weights_only"):
        import_scfoundation(tmp_path / "models.ckpt", tmp_path / "genes.tsv")
