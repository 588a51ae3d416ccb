"""import_geneformer: parity with transformers' BertForMaskedLM on real cells, and pickles
that are read without ever running code."""

from __future__ import annotations

import codecs
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from test_model_data import cell_rows, pbmc, random_mask

from sclcm.models import CellModel, import_geneformer, load_plain_dict

transformers = pytest.importorskip("transformers")

SMALL = dict(num_hidden_layers=6, hidden_size=256, num_attention_heads=4,
             intermediate_size=512, max_position_embeddings=2048)  # Geneformer gf-6L-30M
TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=2048)


def write_checkpoint(directory, tokens: dict[str, int], *, shape: dict, seed: int = 0,
                     medians: dict | None = None):
    """A random BertForMaskedLM saved by transformers, plus Geneformer's two pickles."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(tokens), hidden_act="relu",
                                     layer_norm_eps=1e-12, pad_token_id=0, **shape)
    hf = transformers.BertForMaskedLM(config).eval()
    hf.save_pretrained(directory)
    if medians is None:
        _, _, vocab, med = pbmc()
        # numpy scalars, as Geneformer's own dictionary holds them
        medians = {g: np.float64(m) for g, m in zip(vocab.genes, med, strict=True)}
    with (directory / "token_dictionary.pkl").open("wb") as fh:
        pickle.dump(tokens, fh)
    with (directory / "gene_median_dictionary.pkl").open("wb") as fh:
        pickle.dump(medians, fh)
    return hf


def v2_tokens() -> dict[str, int]:
    return {t: i for i, t in enumerate(pbmc()[2].tokens)}  # <pad> <mask> <cls> <eos> genes


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    directory = tmp_path_factory.mktemp("geneformer_small")
    hf = write_checkpoint(directory, v2_tokens(), shape=SMALL)
    return directory, hf, import_geneformer(directory)


def hf_forward(hf, batch, masked, hf_ids):
    """transformers on the padded batch; hidden states of real tokens, logits at masked."""
    lengths = torch.from_numpy(batch.lengths)
    valid = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    ids = torch.zeros(valid.shape, dtype=torch.long)
    ids[valid] = torch.where(masked, 1, hf_ids)  # <mask> is token 1 in Geneformer
    with torch.no_grad():
        out = hf.bert(input_ids=ids, attention_mask=valid.long(), output_hidden_states=True)
        hidden = [h[valid] for h in out.hidden_states]
        return hidden, hf.cls(hidden[-1][masked])


@pytest.fixture(scope="module")
def reference(small):
    """Real cells through transformers, once: 12 pbmc3k cells, some cut at 2,048 tokens."""
    _, hf, model = small
    batch = model.tokenizer.tokenize(pbmc()[0][cell_rows()[:12]])
    assert batch.lengths.max() == 2048
    assert batch.lengths.min() < 300
    masked = random_mask(batch, 0.15)
    hidden, logits = hf_forward(hf, batch, masked, torch.from_numpy(batch.gene_ids).long())
    return batch, masked, hidden, logits


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_parity_with_transformers_on_real_cells(small, reference, backend):
    model = small[2]
    batch, masked, hidden, logits = reference
    with torch.no_grad():
        out = model.eval()(**model.inputs(batch), masked=masked, output_hidden_states=True,
                           attn_implementation=backend)
    for layer, h in out["hidden_states"].items():
        assert (h - hidden[layer]).abs().max() < 1e-4, layer
    assert (out["last_hidden_state"] - hidden[-1]).abs().max() < 1e-4
    assert out["logits"].shape == (int(masked.sum()), len(model.vocab))
    assert (out["logits"] - logits).abs().max() < 1e-4


def test_imported_model_is_a_complete_model_directory(small, tmp_path):
    _, _, model = small
    assert model.config.tokenizer == "geneformer"
    assert model.tokenizer.special_tokens
    assert model.tokenizer.max_len == 2048
    assert model.config.pooling == "mean"
    model.save_pretrained(tmp_path)
    loaded = CellModel.from_pretrained(tmp_path)
    cells = pbmc()[0][cell_rows()[:4]]
    a = model.embed(model.tokenizer.tokenize(cells))
    b = loaded.embed(loaded.tokenizer.tokenize(cells))
    assert np.array_equal(a, b)


def test_pytorch_model_bin_and_old_key_names(small, tmp_path):
    """``pytorch_model.bin`` (a torch zip, read with weights_only) with the key names of
    older transformers (LayerNorm gamma/beta, position_ids, explicit decoder) imports to
    the same weights."""
    directory, hf, model = small
    for name in ("config.json", "token_dictionary.pkl", "gene_median_dictionary.pkl"):
        shutil.copy(directory / name, tmp_path / name)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                       "LayerNorm.beta"): v
             for k, v in hf.state_dict().items()}
    state["bert.embeddings.position_ids"] = torch.arange(2048)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    old = import_geneformer(tmp_path)
    new_state, old_state = model.state_dict(), old.state_dict()
    assert new_state.keys() == old_state.keys()
    assert all(torch.equal(new_state[k], old_state[k]) for k in new_state)


def test_v1_layout_with_shuffled_token_ids(tmp_path):
    """Geneformer V1 has only <pad> and <mask>; token ids in any order are remapped so that
    sclcm's vocabulary puts special tokens first, and the results stay the same."""
    _, _, vocab, _ = pbmc()
    rng = np.random.default_rng(0)
    names = ["<pad>", "<mask>", *vocab.genes]
    tokens = dict(zip(names, rng.permutation(len(names)).tolist(), strict=True))
    hf = write_checkpoint(tmp_path, tokens, shape=TINY)
    model = import_geneformer(tmp_path)
    assert model.vocab.special_tokens == ("<pad>", "<mask>")
    assert not model.tokenizer.special_tokens
    assert model.config.cls_id == -1
    batch = model.tokenizer.tokenize(pbmc()[0][cell_rows()[:4]])
    masked = random_mask(batch, 0.15)
    hf_ids = torch.tensor([tokens[t] for t in model.vocab.decode(batch.gene_ids)])
    hidden, _logits = hf_forward(hf, batch, torch.zeros_like(masked), hf_ids)
    with torch.no_grad():
        out = model.eval()(**model.inputs(batch))
    assert (out["last_hidden_state"] - hidden[-1]).abs().max() < 1e-4
    # logits come in sclcm's token order: column j is checkpoint token tokens[vocab[j]]
    with torch.no_grad():
        hf_logits = hf.cls(hidden[-1][:50])
    perm = torch.tensor([tokens[t] for t in model.vocab.tokens])
    assert (out["logits"][:50] - hf_logits[:, perm]).abs().max() < 1e-4


# --- pickles ---------------------------------------------------------------------------
class Call:
    """Pickles as a call of ``fn(*args)``, made when the pickle is loaded."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def mkdir_payload(path):  # a pickle that would create a directory when loaded
    return Call(os.mkdir, str(path))


class Plain:
    pass


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_plain_dicts(tmp_path, protocol):
    path = tmp_path / "d.pkl"
    d = {"ENSG1": np.float64(1.5), "ENSG2": np.int64(3), "x": 2}
    path.write_bytes(pickle.dumps(d, protocol=protocol))
    assert load_plain_dict(path) == {"ENSG1": 1.5, "ENSG2": 3, "x": 2}


@pytest.mark.parametrize("obj", [
    pytest.param(lambda p: mkdir_payload(p / "pwned"), id="function-reference"),
    pytest.param(lambda p: {"a": Plain()}, id="class-instance"),
    pytest.param(lambda p: {"a": print}, id="builtin-function"),
    pytest.param(lambda p: {"a": np.array([1.0])}, id="numpy-array"),
    pytest.param(lambda p: {"a": np.dtype("O")}, id="object-dtype"),
    pytest.param(lambda p: {"a": Call(codecs.encode, "x", "rot13")}, id="codecs-misuse"),
    pytest.param(lambda p: [("a", 1)], id="list"),
    pytest.param(lambda p: {"a": {"b": 1}}, id="nested"),
    pytest.param(lambda p: {1: 1}, id="non-string-key"),
])
def test_restricted_unpickler_refuses_everything_else(tmp_path, obj):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(obj(tmp_path)))
    with pytest.raises(ValueError, match=r"not a plain dictionary pickle|must hold a dict"):
        load_plain_dict(path)
    assert not (tmp_path / "pwned").exists()  # nothing was executed


def test_import_refuses_a_malicious_token_dictionary(tmp_path):
    write_checkpoint(tmp_path, {"<pad>": 0, "<mask>": 1, "G": 2}, shape=TINY, medians={"G": 1.0})
    (tmp_path / "token_dictionary.pkl").write_bytes(pickle.dumps(mkdir_payload(tmp_path / "pwned")))
    with pytest.raises(ValueError, match=r"refusing to load posix.mkdir|refusing to load os"):
        import_geneformer(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_import_errors(tmp_path):
    tokens = {"<pad>": 0, "<mask>": 1, "G1": 2, "G2": 3}
    write_checkpoint(tmp_path, tokens, shape=TINY, medians={"G1": 1.0, "G2": 2.0})
    assert import_geneformer(tmp_path).vocab.n_genes == 2
    (tmp_path / "gene_median_dictionary.pkl").write_bytes(pickle.dumps({"G1": 1.0}))
    with pytest.raises(ValueError, match="lacks 1 genes of the token dictionary"):
        import_geneformer(tmp_path)
    (tmp_path / "token_dictionary.pkl").write_bytes(pickle.dumps({**tokens, "G3": 4}))
    with pytest.raises(ValueError, match=r"match the checkpoint's vocab_size .4."):
        import_geneformer(tmp_path)
    (tmp_path / "token_dictionary_v2.pkl").write_bytes(pickle.dumps(tokens))
    with pytest.raises(FileNotFoundError, match="Found 2 token_dictionary files"):
        import_geneformer(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    with pytest.raises(ValueError, match="holds a 'roberta' model"):
        import_geneformer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "gene_median_dictionary.pkl").write_bytes(pickle.dumps({"G1": 1.0, "G2": 2.0}))
    v2 = tmp_path / "token_dictionary_v2.pkl"
    assert import_geneformer(tmp_path, token_dictionary=v2).vocab.n_genes == 2
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"No model.safetensors or pytorch_model.bin"):
        import_geneformer(tmp_path, token_dictionary=v2)
