"""import_scgpt: parity with a reference built from torch's own layers in scGPT's key layout,
on real cells tokenized by sclcm; strict refusal of checkpoints that do not fit."""

from __future__ import annotations

import json
import os
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PBMC3K, _load
from test_model_data import cell_rows
from torch import nn

from sclcm import InputError
from sclcm.models import CellModel, import_scgpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# scGPT's published shapes are 12 x 512, 8 heads, d_hid 512; a smaller model checks the same
# mapping (d_hid != d_model, so that linear1 / linear2 cannot be swapped unseen)
SHAPE = dict(embsize=64, nheads=4, d_hid=96, nlayers=3, n_layers_cls=3)
N_CLS = 5
TOL = 1e-5


class ScGPTReference(nn.Module):
    """scGPT's TransformerModel (no batch labels), from torch's layers and scGPT's module
    names: GeneEncoder (embedding, layer norm), ContinuousValueEncoder (linear1, ReLU,
    linear2, layer norm, values clamped at 512), torch's post-norm TransformerEncoder,
    ExprDecoder (3 linear layers, leaky ReLU), ClsDecoder and the inner-product MVCDecoder."""

    def __init__(self, n_tokens: int, pad_id: int, *, mvc: bool, n_cls: int) -> None:
        super().__init__()
        d, h, ff, n = SHAPE["embsize"], SHAPE["nheads"], SHAPE["d_hid"], SHAPE["nlayers"]
        self.encoder = nn.Module()
        self.encoder.embedding = nn.Embedding(n_tokens, d, padding_idx=pad_id)
        self.encoder.enc_norm = nn.LayerNorm(d)
        self.value_encoder = nn.Module()
        self.value_encoder.linear1, self.value_encoder.linear2 = nn.Linear(1, d), nn.Linear(d, d)
        self.value_encoder.norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(d, h, ff, dropout=0.2, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, n, enable_nested_tensor=False)
        self.decoder = nn.Module()
        self.decoder.fc = nn.Sequential(nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d),
                                        nn.LeakyReLU(), nn.Linear(d, 1))
        self.cls_decoder = nn.Module()
        self.cls_decoder._decoder = nn.ModuleList()
        for _ in range(SHAPE["n_layers_cls"] - 1):
            self.cls_decoder._decoder.extend([nn.Linear(d, d), nn.ReLU(), nn.LayerNorm(d)])
        self.cls_decoder.out_layer = nn.Linear(d, n_cls)
        self.mvc = mvc
        if mvc:
            self.mvc_decoder = nn.Module()
            self.mvc_decoder.gene2query = nn.Linear(d, d)
            self.mvc_decoder.W = nn.Linear(d, d, bias=False)
        with torch.no_grad():  # random, not torch's init: every tensor has to count
            for p in self.parameters():
                p.normal_(0, 0.3)

    def forward(self, ids, values, pad):
        genes = self.encoder.enc_norm(self.encoder.embedding(ids))
        v = self.value_encoder
        x = v.norm(v.linear2(F.relu(v.linear1(values.clamp(max=512)[..., None]))))
        h = self.transformer_encoder(genes + x, src_key_padding_mask=pad)
        cell = h[:, 0]
        c = cell
        for layer in self.cls_decoder._decoder:
            c = layer(c)
        out = {"hidden": h, "cell": cell, "pred": self.decoder.fc(h)[..., 0],
               "cls": self.cls_decoder.out_layer(c)}
        if self.mvc:
            q = torch.sigmoid(self.mvc_decoder.gene2query(genes))
            out["mvc"] = torch.bmm(self.mvc_decoder.W(q), cell[:, :, None])[..., 0]
        return out


@cache
def scgpt_vocab() -> dict[str, int]:
    """scGPT's layout: gene symbols first, the special tokens last (as whole-human's)."""
    adata = _load(PBMC3K)
    expressed = np.asarray((adata.X[cell_rows()] > 0).sum(0)).ravel() > 0
    genes = list(dict.fromkeys(adata.var_names[expressed]))
    return {t: i for i, t in enumerate([*genes, "<pad>", "<cls>", "<eoc>"])}


LAYOUTS = {"in_proj": "self_attn.in_proj_", "Wqkv": "self_attn.Wqkv.",
           "impl_Wqkv": "self_attn._impl.Wqkv."}


def write_scgpt(directory, *, layout="in_proj", input_style="binned", mvc=True,
                n_cls=N_CLS, seed=0, edit=None):
    """A random reference saved as scGPT publishes it: best_model.pt, vocab.json, args.json."""
    tokens = scgpt_vocab()
    torch.manual_seed(seed)
    ref = ScGPTReference(len(tokens), tokens["<pad>"], mvc=mvc, n_cls=n_cls).eval()
    sd = {}
    for k, v in ref.state_dict().items():
        k = k.replace("self_attn.in_proj_", LAYOUTS[layout])
        if layout == "impl_Wqkv":
            k = k.replace("self_attn.out_proj.", "self_attn._impl.out_proj.")
        sd[k] = v
    if edit is not None:
        edit(sd)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(sd, directory / "best_model.pt")
    (directory / "vocab.json").write_text(json.dumps(tokens))
    args = dict(SHAPE, dropout=0.2, pad_token="<pad>", pad_value=-2, mask_value=-1,
                n_bins=51, input_style=input_style, input_emb_style="continuous",
                max_seq_len=1200, MVC=mvc, fast_transformer=layout != "in_proj")
    (directory / "args.json").write_text(json.dumps(args))
    return ref


@cache
def cells():
    return _load(PBMC3K)[cell_rows()].copy()


def compare(ref, model, *, masked_fraction=0.0):
    """Max abs differences of sclcm's packed forward from the reference on padded cells."""
    batch = model.tokenizer.tokenize(cells())
    ids, values, mask = batch.to_padded(pad_id=scgpt_vocab()["<pad>"], pad_value=-2)
    inp = model.inputs(batch)
    masked = None
    if masked_fraction:
        g = torch.Generator().manual_seed(1)
        masked = torch.rand(batch.n_tokens, generator=g) < masked_fraction
        masked[torch.from_numpy(batch.offsets[:-1])] = False
        values = values.copy()
        values[mask] = np.where(masked.numpy(), -1.0, values[mask])  # scGPT's mask_value
    ids = ids.copy()
    ids[mask] = scgpt_ids(model)[batch.gene_ids]
    with torch.no_grad():
        r = ref(torch.from_numpy(ids).long(), torch.from_numpy(values).float(),
                torch.from_numpy(~mask))
        out = model.eval()(**inp, masked=masked)
    m = torch.from_numpy(mask)
    cell = F.normalize(r["cell"], dim=-1) if model.config.normalize_embedding else r["cell"]
    target = out["target_index"]
    diff = {"cell": (out["cell_embedding"] - cell).abs().max().item(),
            "pred": (out["pred"] - r["pred"][m][target]).abs().max().item(),
            "hidden": (out["last_hidden_state"] - r["hidden"][m]).abs().max().item()}
    if "mvc" in r:
        diff["mvc"] = (out["mvc_pred"] - r["mvc"][m][target]).abs().max().item()
    if "class_logits" in out:
        diff["cls"] = (out["class_logits"] - r["cls"]).abs().max().item()
    return diff, batch


def scgpt_ids(model) -> np.ndarray:
    """scGPT's id of each sclcm token: the special tokens, then the genes in scGPT's order."""
    tokens = scgpt_vocab()
    genes = [t for t in sorted(tokens, key=tokens.__getitem__) if not t.startswith("<")]
    return np.array([tokens.get(t, -1) for t in model.vocab.special_tokens]
                    + [tokens[g] for g in genes])


@pytest.mark.parametrize("input_style", ["binned", "log1p"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mvc", [True, False], ids=["mvc", "no_mvc"])
def test_parity_with_the_torch_reference(tmp_path, layout, input_style, mvc):
    ref = write_scgpt(tmp_path, layout=layout, input_style=input_style, mvc=mvc)
    model = import_scgpt(tmp_path, normalize=False)
    assert model.tokenizer.binned == (input_style == "binned")
    assert model.config.mvc == mvc
    assert model.config.n_classes == N_CLS
    assert "ENSG00000198851" in model.vocab  # CD3E: symbols resolved to Ensembl IDs
    diff, batch = compare(ref, model)
    assert int(batch.lengths.max()) == 1200  # the longest cells are cut to scGPT's length
    assert max(diff.values()) <= TOL, diff


def test_masked_values_enter_as_scgpts_mask_value(tmp_path):
    ref = write_scgpt(tmp_path)
    diff, _ = compare(ref, import_scgpt(tmp_path, normalize=False), masked_fraction=0.3)
    assert max(diff.values()) <= TOL, diff


def test_l2_normalised_cls_embedding_by_default(tmp_path):
    ref = write_scgpt(tmp_path, mvc=False, n_cls=1)
    model = import_scgpt(tmp_path)
    assert model.config.normalize_embedding
    assert model.config.n_classes == 0
    assert model.tokenizer.cls_value == -2
    assert model.tokenizer.n_bins == 51
    diff, batch = compare(ref, model)
    assert max(diff.values()) <= TOL, diff
    emb = model.embed(batch)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_imported_model_round_trips_through_save_pretrained(tmp_path):
    write_scgpt(tmp_path / "scgpt")
    model = import_scgpt(tmp_path / "scgpt")
    model.save_pretrained(tmp_path / "sclcm")
    again = CellModel.from_pretrained(tmp_path / "sclcm")
    batch = model.tokenizer.tokenize(cells()[:6])
    np.testing.assert_array_equal(again.embed(batch), model.embed(batch))
    assert again.tokenizer.to_dict() == model.tokenizer.to_dict()


# --- refusals ------------------------------------------------------------------------------
def _del(name):
    return lambda sd: sd.pop(name)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda sd: sd.__setitem__("transformer_encoder.layers.1.linear1.weight",
                               torch.zeros(7, SHAPE["embsize"])),
     r"transformer_encoder\.layers\.1\.linear1\.weight has shape \(7, 64\), args\.json says "
     r"\(96, 64\)"),
    (_del("decoder.fc.2.bias"), r"missing tensors \['decoder\.fc\.2\.bias'\]"),
    (_del("transformer_encoder.layers.2.self_attn.in_proj_weight"),
     r"missing tensors \['transformer_encoder\.layers\.2\.self_attn\.in_proj_weight'\]"),
    (lambda sd: sd.__setitem__("decoder.zero_logit.0.weight", torch.zeros(64, 64)),
     r"cannot place \['decoder\.zero_logit\.0\.weight'\].*zero-probability head.*drop="),
    (lambda sd: sd.__setitem__("pos_encoder.pe", torch.zeros(3)),
     r"cannot place \['pos_encoder\.pe'\]"),
], ids=["wrong_shape", "missing", "missing_attention", "extra_known", "extra_unknown"])
def test_checkpoints_that_do_not_fit_are_refused_naming_the_tensor(tmp_path, edit, match):
    write_scgpt(tmp_path, edit=edit)
    with pytest.raises(InputError, match=match):
        import_scgpt(tmp_path)


def test_a_known_extra_module_is_left_out_only_when_asked(tmp_path):
    write_scgpt(tmp_path, edit=lambda sd: sd.update(
        {"decoder.zero_logit.0.weight": torch.zeros(64, 64),
         "decoder.zero_logit.0.bias": torch.zeros(64)}))
    model = import_scgpt(tmp_path, drop=["decoder.zero_logit"])
    assert not any("zero_logit" in k for k in model.state_dict())


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SCLCM_PWNED']}",))


@pytest.mark.parametrize("kind", ["module", "code", "not_a_dict"])
def test_a_pickle_that_is_not_a_plain_state_dict_is_refused_unrun(tmp_path, monkeypatch, kind):
    write_scgpt(tmp_path)
    flag = tmp_path / "pwned"
    monkeypatch.setenv("SCLCM_PWNED", str(flag))
    path = tmp_path / "best_model.pt"
    if kind == "module":  # a whole model pickled: classes torch's safe loader refuses
        torch.save(nn.Linear(2, 2), path)
    elif kind == "code":
        torch.save({"encoder.embedding.weight": _Payload()}, path)
    else:
        torch.save([torch.zeros(2)], path)
    match = "must hold a state dict" if kind == "not_a_dict" else "not a plain state dict"
    with pytest.raises(InputError, match=match) as info:
        import_scgpt(tmp_path)
    assert "best_model.pt" in str(info.value)
    assert not flag.exists()
    with path.open("rb") as fh:  # the payload really was a pickle that runs code
        assert kind != "code" or b"system" in fh.read()


def test_missing_file_and_unsupported_args_are_named(tmp_path):
    write_scgpt(tmp_path)
    args = json.loads((tmp_path / "args.json").read_text())
    (tmp_path / "args.json").write_text(json.dumps({**args, "input_emb_style": "category"}))
    with pytest.raises(InputError, match=r"input_emb_style='category'"):
        import_scgpt(tmp_path)
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab\.json is missing"):
        import_scgpt(tmp_path)
