"""CellModel: presets on real tokenized cells, embeddings, checkpoints that refuse tampering."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_model_data import random_mask, tokens

from sclcm.genes import GeneVocab
from sclcm.models import CellModel, ModelConfig
from sclcm.models._io import _sha256, config_digest

PRESETS = ["geneformer", "scgpt", "scbert", "scfoundation"]
N_CELLS = 12  # the 4 shortest and 4 longest pbmc3k cells, and 4 others


def build(name: str, n_cells: int = N_CELLS, *, seed: int = 0, tok_kwargs=None, **overrides):
    tok, batch = tokens(name, n_cells, **(tok_kwargs or {}))
    torch.manual_seed(seed)
    config = ModelConfig.preset(name, "tiny", vocab=tok.vocab, **overrides)
    return CellModel(config, tokenizer=tok), batch


def loss_of(model: CellModel, out: dict, inputs: dict) -> torch.Tensor:
    """The objective's loss at the predicted tokens (as a training loop would compute it)."""
    target = out["target_index"]
    ids, values = inputs["gene_ids"][target], inputs["values"][target]
    loss = {"mlm": lambda: F.cross_entropy(out["logits"], ids),
            "bin": lambda: F.cross_entropy(out["logits"], values.long()),
            "value": lambda: F.mse_loss(out["pred"], values),
            "depth_value": lambda: F.mse_loss(out["pred"], values)}[model.config.objective]()
    if "mvc_pred" in out:
        loss = loss + F.mse_loss(out["mvc_pred"], values)
    if "class_logits" in out:
        loss = loss + out["class_logits"].logsumexp(-1).mean()
    return loss


# --- presets ---------------------------------------------------------------------------
def test_presets_follow_published_shapes():
    shape = {(name, size): (c.n_layers, c.d_model, c.n_heads, c.d_ff)
             for name in PRESETS for size in ("small", "base")
             for c in [ModelConfig.preset(name, size, vocab_size=100)]}
    assert shape["geneformer", "small"] == (6, 256, 4, 512)  # gf-6L-30M
    assert shape["geneformer", "base"] == (12, 768, 12, 3072)  # Geneformer V2-104M
    assert shape["scgpt", "base"] == (12, 512, 8, 512)  # scGPT whole-human
    assert shape["scbert", "base"][:3] == (6, 200, 10)  # scBERT
    assert shape["scfoundation", "base"][:3] == (12, 768, 12)  # scFoundation 100M encoder
    sf = ModelConfig.preset("scfoundation", "base", vocab_size=100)
    assert (sf.decoder_layers, sf.decoder_d_model, sf.decoder_heads) == (6, 512, 8)
    gf = ModelConfig.preset("geneformer", "small", vocab_size=100)
    assert (gf.norm, gf.activation, gf.max_position, gf.value_encoder, gf.objective) == \
        ("post", "relu", 2048, "none", "mlm")
    assert ModelConfig.preset("scbert", "tiny", vocab_size=9).norm == "pre"
    assert ModelConfig.preset("scgpt", "tiny", vocab_size=9).max_position == 0  # no order


def test_config_validation_and_json():
    cfg = ModelConfig.preset("scgpt", "small", vocab_size=1000, n_classes=5)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="Unknown preset 'gpt'"):
        ModelConfig.preset("gpt")
    with pytest.raises(ValueError, match="Unknown size 'huge'"):
        ModelConfig.preset("scgpt", "huge")
    with pytest.raises(ValueError, match="multiple of n_heads"):
        ModelConfig.preset("scgpt", "tiny", vocab_size=9, n_heads=3)
    with pytest.raises(ValueError, match="needs a <cls> token"):
        ModelConfig.preset("scgpt", "tiny", vocab_size=9, cls_id=-1)
    with pytest.raises(ValueError, match="unknown field 'rotary'"):
        ModelConfig.from_dict({**cfg.to_dict(), "rotary": True})
    with pytest.raises(ValueError, match="vocab_size is not set"):
        CellModel(ModelConfig.preset("scgpt", "tiny"))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_on_real_cells(name):
    """Forward and backward in training mode: every parameter gets a finite gradient."""
    # no dropout here: on CPU it sends SDPA to its slow path (see test_dropout_in_training)
    model, batch = build(name, n_classes=3, dropout=0.0, attn_dropout=0.0)
    model.train()
    inputs = model.inputs(batch)
    masked = random_mask(batch, 0.1)
    out = model(**inputs, masked=masked)
    n_masked, d = int(masked.sum()), model.config.d_model
    assert out["cell_embedding"].shape == (batch.n_cells, d)
    assert out["class_logits"].shape == (batch.n_cells, 3)
    assert torch.equal(out["target_index"], masked.nonzero()[:, 0])
    if name == "geneformer":
        assert out["logits"].shape == (n_masked, len(model.vocab))
    elif name == "scbert":
        assert out["logits"].shape == (n_masked, 6)
    else:
        assert out["pred"].shape == (n_masked,)
    loss_of(model, out, inputs).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_dropout_in_training_only(backend):
    model, batch = build("scgpt", 3)  # dropout 0.2, as scGPT
    inputs = dict(model.inputs(batch), attn_implementation=backend)
    model.train()
    assert not torch.equal(model(**inputs)["cell_embedding"], model(**inputs)["cell_embedding"])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs)["cell_embedding"], model(**inputs)["cell_embedding"])


def test_scgpt_continuous_values():
    model, batch = build("scgpt", tok_kwargs={"binned": False}, value_encoder="continuous")
    out = model(**model.inputs(batch), masked=random_mask(batch, 0.1))
    out["pred"].sum().backward()
    assert model.embed_tokens.values.mask.grad is not None
    binned, _ = build("scgpt")
    with pytest.raises(ValueError, match=r"must be bin indices 0..50"):
        binned(**binned.inputs(batch))


def test_scfoundation_asymmetric_layout():
    """The encoder sees the unmasked non-zero genes and two read-depth tokens per cell; the
    decoder sees them scattered among more genes, masked genes entering as masked."""
    model, batch = build("scfoundation", 2)
    model.eval()
    inputs = model.inputs(batch)
    masked = random_mask(batch, 0.2)
    out = model(**inputs, masked=masked)
    assert len(out["last_hidden_state"]) == batch.n_tokens - int(masked.sum()) + 2 * 2
    # decoder over each cell's genes plus 50 of the genes it does not express
    rng = np.random.default_rng(0)
    dec_ids, dec_len = [], []
    for i in range(batch.n_cells):
        ids = batch.cell(i)[0]
        zeros = rng.choice(np.setdiff1d(np.arange(4, len(model.vocab)), ids), 50, replace=False)
        dec_ids.append(rng.permutation(np.concatenate([ids, zeros])))
        dec_len.append(len(dec_ids[-1]))
    dec = torch.from_numpy(np.concatenate(dec_ids))
    dec_off = torch.from_numpy(np.concatenate([[0], np.cumsum(dec_len)]))
    big = model(**inputs, masked=masked, decoder_gene_ids=dec, decoder_offsets=dec_off)
    assert big["decoder_pred"].shape == (len(dec),)
    # the prediction of a masked gene is the decoder's output at that gene
    t = big["target_index"][0]
    cell = int(np.searchsorted(batch.offsets, int(t), side="right") - 1)
    pos = int(dec_off[cell]) + int(np.flatnonzero(dec_ids[cell] == int(inputs["gene_ids"][t]))[0])
    assert big["pred"][0] == big["decoder_pred"][pos]
    # read-depth aware: asking for another target depth T changes the prediction
    depth = inputs["depth"].clone().requires_grad_()
    model(**dict(inputs, depth=depth), masked=masked)["pred"].sum().backward()
    assert (depth.grad != 0).all()  # both T and S of every cell reach the predictions
    with pytest.raises(ValueError, match="must include every masked gene"):
        model(**inputs, masked=masked, decoder_gene_ids=dec[dec_len[0]:],
              decoder_offsets=torch.tensor([0, 0, dec_len[1]]))


# --- embeddings --------------------------------------------------------------------------
def test_embed_returns_cell_embeddings_without_grad():
    model, batch = build("geneformer", 24)
    model.train()
    emb = model.embed(batch, batch_size=5)
    assert model.training  # mode restored
    assert emb.shape == (24, model.config.d_model)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(model.embed(batch, batch_size=24), emb, atol=1e-5, rtol=1e-5)
    # each cell's embedding is its own: alone or among others
    np.testing.assert_allclose(model.embed(batch[[3]]), emb[[3]], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        out = model.eval()(**model.inputs(batch), output_hidden_states=[0, -1])
    # mean over gene tokens of the last layer, <cls>/<eos> excluded
    h, s = out["hidden_states"][model.config.n_layers], slice(batch.offsets[2] + 1,
                                                              batch.offsets[3] - 1)
    np.testing.assert_allclose(emb[2], h[s].mean(0).numpy(), atol=1e-5, rtol=1e-5)
    layer0 = model.embed(batch, layer=0)
    h0 = out["hidden_states"][0]
    np.testing.assert_allclose(layer0[2], h0[s].mean(0).numpy(), atol=1e-5, rtol=1e-5)


def test_cls_pooling():
    model, batch = build("scgpt")
    with torch.no_grad():
        out = model.eval()(**model.inputs(batch))
    first = torch.from_numpy(batch.offsets[:-1])
    assert torch.equal(out["cell_embedding"], out["last_hidden_state"][first])


def test_bad_inputs_get_clear_errors():
    model, batch = build("scgpt", 2)
    inputs = model.inputs(batch)
    with pytest.raises(ValueError, match=r"gene_ids must lie in 0..27833"):
        model(**dict(inputs, gene_ids=inputs["gene_ids"] + 10**6))
    with pytest.raises(ValueError, match="offsets must rise from 0"):
        model(**dict(inputs, offsets=inputs["offsets"] + 1))
    with pytest.raises(ValueError, match=r"values .one per token. are required"):
        model(inputs["gene_ids"], inputs["offsets"])
    with pytest.raises(ValueError, match="masked must be a bool tensor"):
        model(**inputs, masked=torch.zeros(3, dtype=torch.bool))
    sf, sf_batch = build("scfoundation", 2)
    with pytest.raises(ValueError, match=r"depth .n_cells x 2"):
        sf(**dict(sf.inputs(sf_batch), depth=None))
    tok, gf_batch = tokens("geneformer", 2)  # cells of up to 4,096 tokens
    config = ModelConfig.preset("geneformer", "tiny", vocab=tok.vocab, max_position=64)
    with pytest.raises(ValueError, match=r"model has 64 positions.*max_len=64"):
        CellModel(config, tokenizer=tok)  # refused when attached, before any cell
    gf = CellModel(config, vocab=tok.vocab)
    with pytest.raises(ValueError, match="more than the model's 64 positions"):
        gf(**gf.inputs(gf_batch))


def test_vocab_and_tokenizer_must_fit():
    model, _ = build("scgpt", 2)
    tok_gf, _ = tokens("geneformer", 2)
    small = GeneVocab(list(model.vocab.genes[:10]), species="human")
    with pytest.raises(ValueError, match="does not fit the model"):
        CellModel(model.config, vocab=small)
    with pytest.raises(ValueError, match="'geneformer' tokenizer cannot feed a 'scgpt'"):
        model.attach_tokenizer(tok_gf)
    tok_sb, _ = tokens("scbert", 2)
    with pytest.raises(ValueError, match="does not fit the model"):
        model.attach_tokenizer(type(model.tokenizer)(tok_sb.vocab))


def test_num_params_weight_decay_groups_and_scaled_init():
    model, _ = build("geneformer", 2, n_layers=4)
    unique = {id(p): p for p in model.parameters()}
    assert model.get_num_params() == sum(p.numel() for p in unique.values())
    emb = model.embed_tokens
    assert model.get_num_params(non_embedding=True) == model.get_num_params() - \
        emb.genes.weight.numel() - emb.positions.weight.numel()
    decay, no_decay = model.param_groups(0.1)
    assert {id(p) for p in decay["params"]} | {id(p) for p in no_decay["params"]} == set(unique)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0
    assert model.head.decoder.weight is emb.genes.weight  # tied, counted once
    torch.manual_seed(0)
    wide = CellModel(ModelConfig.preset("geneformer", "small", vocab=model.vocab))
    proj = torch.cat([b.attn.proj.weight.flatten() for b in wide.encoder.blocks])
    qkv = torch.cat([b.attn.qkv.weight.flatten() for b in wide.encoder.blocks])
    assert proj.std().item() == pytest.approx(0.02 / np.sqrt(2 * 6), rel=0.02)
    assert qkv.std().item() == pytest.approx(0.02, rel=0.02)


# --- checkpoints ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_save_and_load_bit_for_bit(name, tmp_path, monkeypatch):
    model, batch = build(name, 4, seed=1)
    model.eval().save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors",
                                                    "vocab.json", "tokenizer"}

    def no_pickle(*args, **kwargs):
        raise AssertionError("a checkpoint load must never unpickle")

    for fn in ("load", "loads"):
        monkeypatch.setattr(pickle, fn, no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = CellModel.from_pretrained(tmp_path).eval()
    monkeypatch.undo()
    assert loaded.config == model.config
    assert loaded.vocab == model.vocab
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
               for k in before)
    # the directory alone tokenizes and runs: same tokens, same outputs, bit for bit
    assert loaded.tokenizer.to_dict() == model.tokenizer.to_dict()
    from test_model_data import cell_rows, pbmc

    again = loaded.tokenizer.tokenize(pbmc()[0][cell_rows()[:4]])
    assert np.array_equal(again.gene_ids, batch.gene_ids)
    assert np.array_equal(again.values, batch.values)
    masked = random_mask(batch, 0.2)
    with torch.no_grad():
        a, b = model(**model.inputs(batch), masked=masked), loaded(**loaded.inputs(again),
                                                                   masked=masked)
    for key in ("last_hidden_state", "cell_embedding", "logits", "pred", "mvc_pred"):
        if key in a:
            assert torch.equal(a[key], b[key]), key
    if name == "geneformer":
        assert loaded.head.decoder.weight is loaded.embed_tokens.genes.weight  # re-tied


@pytest.fixture
def saved(tmp_path):
    model, _ = build("geneformer", 2)
    model.save_pretrained(tmp_path)
    return tmp_path


def _rewrite(directory, tensors):
    """Write new weights and record their checksum, as a careless converter would."""
    save_file(tensors, directory / "model.safetensors")
    meta = json.loads((directory / "config.json").read_text())
    meta["sha256"]["model.safetensors"] = _sha256(directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(meta))


def test_tampered_weights_are_refused(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the checksum recorded"):
        CellModel.from_pretrained(saved)


def test_missing_or_extra_tensors_are_refused(saved):
    tensors = load_file(saved / "model.safetensors")
    name = "encoder.blocks.1.mlp.fc2.weight"
    _rewrite(saved, {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(ValueError, match=rf"missing tensors \['{name}'\]"):
        CellModel.from_pretrained(saved)
    _rewrite(saved, {**tensors, "encoder.blocks.9.mlp.fc2.weight": tensors[name].clone()})
    with pytest.raises(ValueError, match=r"unexpected tensors \['encoder.blocks.9"):
        CellModel.from_pretrained(saved)
    _rewrite(saved, {**tensors, name: tensors[name][:, :3].contiguous()})
    with pytest.raises(ValueError, match=rf"{name} has shape \(64, 3\), the config says"):
        CellModel.from_pretrained(saved)


def test_broken_directories_are_refused(saved):
    meta = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99, newer than"):
        CellModel.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({**meta, "format": "transformers"}))
    with pytest.raises(ValueError, match="import_geneformer"):
        CellModel.from_pretrained(saved)
    edited = {**meta, "config": {**meta["config"], "n_layers": 3}}
    (saved / "config.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="edited after the model was saved"):
        CellModel.from_pretrained(saved)
    # with its hash recorded (a config written by other code), the weights must still fit
    edited["config_sha256"] = config_digest(edited)
    (saved / "config.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="missing tensors"):
        CellModel.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps(meta))
    (saved / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab.json is missing"):
        CellModel.from_pretrained(saved)
    with pytest.raises(FileNotFoundError, match=r"config.json is missing"):
        CellModel.from_pretrained(saved / "nowhere")


def test_save_needs_a_vocabulary(tmp_path):
    model = CellModel(ModelConfig.preset("scgpt", "tiny", vocab_size=50))
    with pytest.raises(ValueError, match="must hold its vocabulary"):
        model.save_pretrained(tmp_path)
