"""Configs are checked before any work: model config.json files and pretraining YAML; every
error names the field, the valid values and the fix."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import sclcm
from sclcm import InputError
from sclcm.genes import GeneVocab
from sclcm.models import CellModel, ModelConfig
from sclcm.models._io import _sha256, config_digest

SHIPPED = Path(sclcm.__file__).parent / "models" / "pretrained" / "sclcm-small"
#: The shipped weights' digest: re-saving its config at a new format must keep them as they are.


@pytest.fixture
def relu_dir(tmp_path) -> Path:
    """A saved tiny ReLU model (not the default activation), 20 genes, no tokenizer."""
    vocab = GeneVocab([f"ENSG{i:011d}" for i in range(20)], species="homo_sapiens")
    config = ModelConfig.preset("geneformer", "tiny", vocab=vocab, activation="relu")
    torch.manual_seed(0)
    CellModel(config, vocab=vocab).save_pretrained(tmp_path)
    return tmp_path


def edit(directory: Path, change, *, rehash: bool = False) -> None:
    """Edit ``config.json``'s entries with ``change(meta)``; ``rehash`` records the new hash
    (as a file written by the code would have), so the check under test is the field one."""
    meta = json.loads((directory / "config.json").read_text())
    change(meta)
    if rehash:
        meta["config_sha256"] = config_digest(meta)
    (directory / "config.json").write_text(json.dumps(meta, indent=2))


# --- model config.json --------------------------------------------------------------
def test_missing_field_is_refused_not_defaulted(relu_dir):
    # it used to run as GELU, the dataclass default, without a word
    edit(relu_dir, lambda m: m["config"].pop("activation"), rehash=True)
    with pytest.raises(InputError, match=r"config\.json: missing field 'activation' \(one of "
                       r"'gelu', 'gelu_tanh', 'relu', 'silu'\).*restore the file"):
        CellModel.from_pretrained(relu_dir)


def test_misspelled_field_gets_a_suggestion(relu_dir):
    def rename(meta):
        meta["config"]["n_head"] = meta["config"].pop("n_heads")

    edit(relu_dir, rename, rehash=True)
    with pytest.raises(InputError, match=r"unknown field 'n_head' \(did you mean 'n_heads'\?\)"
                       ) as err:
        CellModel.from_pretrained(relu_dir)
    assert "newer" not in str(err.value)
    assert "upgrade" not in str(err.value)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("n_heads", "four", r"n_heads must be an integer, not 'four' \(str\)"),
    ("n_layers", 0, r"n_layers must be >= 1, not 0"),
    ("dropout", 1.5, r"dropout is a probability: it must lie in \[0, 1\], not 1\.5"),
    ("activation", "GELU", r"activation must be one of 'gelu', 'gelu_tanh', 'relu', 'silu', "
                           r"not 'GELU' \(did you mean 'gelu'\?\)"),
    ("embed_norm", "yes", r"embed_norm must be true or false"),
    ("recon_panel", [5, 6.5], r"recon_panel must be a list of integers"),
], ids=["type", "positive", "probability", "choice", "bool", "list"])
def test_wrong_types_and_ranges_are_named(relu_dir, field, value, match):
    edit(relu_dir, lambda m: m["config"].__setitem__(field, value), rehash=True)
    with pytest.raises(InputError, match=rf"Invalid model config in .*config\.json: {match}"):
        CellModel.from_pretrained(relu_dir)


def test_config_made_in_code_is_checked_too():
    with pytest.raises(InputError, match="n_heads must be an integer, not 'four'"):
        ModelConfig(vocab_size=10, n_heads="four")
    with pytest.raises(InputError, match=r"unknown field 'n_head' \(did you mean 'n_heads'\?\)"):
        ModelConfig.preset("geneformer", "tiny", vocab_size=10, n_head=2)
    with pytest.raises(InputError, match=r"Unknown size 'Tiny' \(did you mean 'tiny'\?\)"):
        ModelConfig.preset("geneformer", "Tiny")
    import numpy as np

    cfg = ModelConfig.preset("scgpt", "tiny", vocab_size=10, n_bins=np.int64(7))
    assert type(cfg.n_bins) is int  # numpy numbers become plain ones: the config stays JSON
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_invalid_json_names_the_file_and_line(relu_dir):
    path = relu_dir / "config.json"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rstrip(",")  # one comma lost in an edit
    path.write_text("\n".join(lines))
    with pytest.raises(InputError, match=r"config\.json is not valid JSON: Expecting ',' "
                       r"delimiter at line \d+, column \d+"):
        CellModel.from_pretrained(relu_dir)


def test_edited_config_is_refused(relu_dir):
    # a valid edit builds another model than the one the weights were trained as
    edit(relu_dir, lambda m: m["config"].__setitem__("activation", "gelu"))
    with pytest.raises(InputError, match=r"edited after the model was saved.*Restore the "
                       r"file as saved.*save_pretrained"):
        CellModel.from_pretrained(relu_dir)
    edit(relu_dir, lambda m: m.__setitem__("weights_dtype", "float16"))
    with pytest.raises(InputError, match="edited after the model was saved"):
        CellModel.from_pretrained(relu_dir)
    edit(relu_dir, lambda m: m.pop("config_sha256"))
    with pytest.raises(InputError, match="missing entry 'config_sha256'"):
        CellModel.from_pretrained(relu_dir)


def test_top_level_entries_are_checked(relu_dir):
    def rename(meta):
        meta["weight_dtype"] = meta.pop("weights_dtype")

    edit(relu_dir, rename, rehash=True)
    with pytest.raises(InputError, match=r"unknown entry 'weight_dtype' \(did you mean "
                       r"'weights_dtype'\?\); missing entry 'weights_dtype'"):
        CellModel.from_pretrained(relu_dir)


def test_format_1_configs_load_with_the_documented_defaults(relu_dir):
    model = CellModel.from_pretrained(relu_dir)

    def as_format_1(meta):  # as the first sclcm wrote them: no hash, no head, no dtype
        meta["format_version"] = 1
        for key in ("config_sha256", "weights_dtype"):
            del meta[key]
        del meta["config"]["recon_panel"]

    edit(relu_dir, as_format_1)
    old = CellModel.from_pretrained(relu_dir)
    assert old.config == model.config
    assert old.config.recon_panel == []
    # only what format 1 predates has a default: its other fields are still required
    edit(relu_dir, lambda m: m["config"].pop("activation"))
    with pytest.raises(InputError, match="missing field 'activation'"):
        CellModel.from_pretrained(relu_dir)


def test_shipped_model_is_written_by_this_code(tmp_path):
    """The shipped config is at the current format, its hash and checksums hold, and
    re-saving it reproduces every file: the same JSON, vocabulary and tokenizer, and the
    same float16 tensors and metadata (safetensors orders its header's metadata keys as it
    likes, so the weights file's bytes, and the checksum recorded for them, may differ)."""
    from safetensors import safe_open

    meta = json.loads((SHIPPED / "config.json").read_text())
    assert meta["config_sha256"] == config_digest(meta)
    for name, digest in meta["sha256"].items():
        assert _sha256(SHIPPED / name) == digest, name
    model = CellModel.from_pretrained(SHIPPED)
    model.save_pretrained(tmp_path, dtype="float16")
    again = json.loads((tmp_path / "config.json").read_text())
    weights = "model.safetensors"
    without = lambda m: {**m, "sha256": {k: v for k, v in m["sha256"].items() if k != weights},  # noqa: E731
                         "config_sha256": None}
    assert without(again) == without(meta)
    for name in meta["sha256"]:
        if name != weights:
            assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name
    with safe_open(SHIPPED / weights, "pt") as a, safe_open(tmp_path / weights, "pt") as b:
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():  # noqa: SIM118 - safe_open is not a mapping
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype, key
            assert torch.equal(x, y), key


def test_shipped_model_copy_refuses_an_edit(tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(SHIPPED, copy)
    edit(copy, lambda m: m["config"].pop("activation"))
    with pytest.raises(InputError, match="missing field 'activation'"):
        CellModel.from_pretrained(copy)


# --- pretraining YAML ---------------------------------------------------------------
@pytest.fixture
def no_prepare(monkeypatch):
    """Fails the test if a run reaches data preparation."""
    from sclcm.train import _run

    def prepare(cfg):
        raise AssertionError("data preparation started before the config was checked")

    monkeypatch.setattr(_run, "prepare", prepare)


def run_config(tmp_path, **sections) -> dict:
    cfg = {"data": {"h5ad": ["cells.h5ad"]}, "out_dir": str(tmp_path / "run")}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


@pytest.mark.parametrize(("sections", "match"), [
    ({"model": {"size": "Tiny"}},
     r"model\.size must be one of 'tiny', 'small', 'base', not 'Tiny' \(did you mean 'tiny'\?\)"),
    ({"model": {"overrides": {"n_head": 2}}},
     r"model\.overrides: unknown field 'n_head' \(did you mean 'n_heads'\?\)"),
    ({"model": {"overrides": {"activation": "relu6"}}},
     r"model\.overrides do not make a valid geneformer small model: activation must be one "
     r"of 'gelu', 'gelu_tanh', 'relu', 'silu', not 'relu6'"),
    ({"model": {"overrides": {"n_heads": 3}}}, r"d_model=256 must be a multiple of n_heads=3"),
    ({"model": {"overrides": {"vocab_size": 100}}},
     r"'vocab_size' is set by the vocabulary \(vocab\.\*\); remove it"),
    ({"trainer": {"accelerator": "GPU"}},
     r"trainer\.accelerator must be one of 'auto', 'cpu', 'gpu', .*not 'GPU' \(did you mean "
     r"'gpu'\?\)"),
    ({"trainer": {"precision": "bf16_mixed"}},
     r"trainer\.precision must be one of .*'bf16-mixed'.*\(did you mean 'bf16-mixed'\?\)"),
    ({"trainer": {"strategy": "dpp"}}, r"trainer\.strategy .*\(did you mean 'ddp'\?\)"),
    ({"trainer": {"precison": "32"}},
     r"Unknown key trainer\.precison \(did you mean 'precision'\?\) in trainer; known keys"),
    ({"tokenizer": {"options": {"maxlen": 64}}},
     r"GeneformerTokenizer takes no option 'maxlen' \(did you mean 'max_len'\?\)"),
    ({"vocab": {"biotypes": ["protein-coding"]}},
     r"vocab\.biotypes entries must be among .*\(did you mean 'protein_coding'\?\)"),
    ({"data": {"orthologs": "one_to_one"}},
     r"data\.orthologs must be one of 'one2one', 'all', not 'one_to_one'"),
    ({"model": {"start": "sclcm-small", "overrides": {"n_layers": 2}},
      "tokenizer": {"options": {"max_len": 64}}},
     r"model\.start continues 'sclcm-small' with its own architecture, vocabulary and "
     r"tokenizer: leave out model\.overrides, tokenizer\.options\."),
], ids=["size", "override-name", "override-value", "override-consistency", "override-vocab",
        "accelerator", "precision", "strategy", "key", "tokenizer-option", "biotype",
        "orthologs", "start-with-overrides"])
def test_pretrain_config_is_checked_before_any_work(tmp_path, no_prepare, sections, match):
    from sclcm.train import ConfigError, pretrain

    with pytest.raises(ConfigError, match=match):
        pretrain(run_config(tmp_path, **sections))
    assert not (tmp_path / "run").exists()


# ids: a test keyed "gpu" is skipped on machines without one, and this one is for those
@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "mps"],
                         ids=["absent-GPU", "absent-CUDA", "absent-MPS"])
def test_missing_accelerator_is_named_before_data_preparation(tmp_path, no_prepare,
                                                              monkeypatch, accelerator):
    from sclcm.train import ConfigError, pretrain

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=rf"trainer\.accelerator is '{accelerator}', but .*"
                       r"Set trainer\.accelerator to 'cpu'"):
        pretrain(run_config(tmp_path, trainer={"accelerator": accelerator}))


def test_config_error_is_a_clean_cli_message(tmp_path, no_prepare):
    from sclcm.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(tmp_path, model={"size": "Tiny"})))
    with pytest.raises(SystemExit, match=r"sclcm pretrain: model\.size must be one of .*"
                       r"\(did you mean 'tiny'\?\)"):
        main(["pretrain", "--config", str(path)])


# --- what a run prints ----------------------------------------------------------------
class _Endless(torch.utils.data.IterableDataset):
    """A stream with no length, as a run's is."""

    def __iter__(self):
        while True:
            yield torch.ones(4)


class _Toy(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_progress_shows_steps_of_max_steps_and_no_tips(tmp_path, capsys, caplog, monkeypatch):
    from sclcm.train import load_config
    from sclcm.train._run import build_trainer

    monkeypatch.setattr(sclcm.settings, "progress", True)
    cfg = load_config(run_config(tmp_path, optim={"max_steps": 7},
                                 trainer={"checkpoint_every": 0, "log_every": 1}))
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and log intervals
        trainer = build_trainer(cfg, tmp_path, validate=False)
        trainer.fit(_Toy(), train_dataloaders=torch.utils.data.DataLoader(_Endless(),
                                                                          batch_size=2))
    out = capsys.readouterr().out
    assert trainer.global_step == 7
    assert "Training steps" in out
    assert "7/7" in out
    assert "-2" not in out
    assert "v_num" not in out
    assert not [r for r in caplog.records if "Tip" in r.getMessage()]


def test_docs_continuing_yaml_is_valid():
    """The continued-pretraining YAML of docs/pretraining.md passes the config check, and
    the keys model.start refuses are refused in it."""
    from test_readme import code_blocks

    from sclcm.train import ConfigError, load_config

    page = Path(__file__).resolve().parents[1] / "docs" / "pretraining.md"
    (block,) = [b for b in code_blocks(page) if b.lang == "yaml" and "start:" in b.code]
    raw = yaml.safe_load(block.code)
    cfg = load_config(raw)
    assert cfg.model.start == "sclcm-small"
    assert cfg.objectives.reconstruction == 100.0
    with pytest.raises(ConfigError, match=r"leave out vocab\.path"):
        load_config({**raw, "vocab": {"path": "vocab.json"}})
