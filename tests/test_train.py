"""sclcm.train on real pbmc3k cells: every preset learns, a killed run resumes exactly,
non-finite losses stop training, the CLI runs, bad configs get clear errors."""

from __future__ import annotations

import json
from functools import cache

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from conftest import DATA, PBMC3K, _load, data_path

import sclcm
from sclcm.models import CellModel
from sclcm.tokenizers import TokenBatch
from sclcm.train import (
    ConfigError,
    MicroBatchLoader,
    NonFiniteLossError,
    group_by_length,
    load_config,
    micro_batches,
    pretrain,
    split_further,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(out, preset: str, **over) -> dict:
    """A tiny model on pbmc3k: 64 tokens a cell, genes detected in >= 300 cells."""
    tokenizer = {"panel_size": 64} if preset == "scbert" else {"options": {"max_len": 64}}
    cfg = {"data": {"h5ad": [str(data_path(PBMC3K))], "block_size": 256,
                    "held_out_fraction": 0.1, "held_out_max_cells": 270},
           "tokenizer": tokenizer, "vocab": {"min_cells": 300},
           "model": {"preset": preset, "size": "tiny"},
           "optim": {"lr": 3e-3, "warmup_steps": 20, "max_steps": 300, "max_tokens": 1024},
           "trainer": {"val_every": 0, "checkpoint_every": 0, "log_every": 20},
           "out_dir": str(out)}
    for key, value in over.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


# --- batching and the data position (synthetic, fast) ------------------------------
def packed(lengths) -> TokenBatch:
    lengths = np.asarray(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    return TokenBatch(np.arange(n, dtype=np.int32) % 50 + 4, np.zeros(n, np.float32), offsets,
                      np.arange(len(lengths), dtype=np.int64))


def test_micro_batches_respect_the_budget_and_group_by_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, 500)
    block = packed(lengths)
    parts = micro_batches(block, 1000, rng=np.random.default_rng(1))
    assert sorted(np.concatenate([p.cell_index for p in parts]).tolist()) == list(range(500))
    padded = [p.n_cells * p.lengths.max() for p in parts]
    assert max(padded) <= 1000
    # sorted by length: little padding
    assert sum(padded) < 1.1 * lengths.sum()
    again = micro_batches(block, 1000, rng=np.random.default_rng(1))
    assert [p.cell_index.tolist() for p in again] == [p.cell_index.tolist() for p in parts]
    assert group_by_length(np.array([50, 3]), 10)[0].tolist() == [0]  # too long: alone


def test_split_further_equalizes_and_refuses_the_impossible():
    groups = split_further([np.arange(7), np.arange(7, 9)], 5)
    assert len(groups) == 5
    assert sorted(np.concatenate(groups).tolist()) == list(range(9))
    with pytest.raises(ValueError, match="micro-batches to match the other ranks"):
        split_further([np.array([0]), np.array([1])], 3)


def test_loader_resumes_at_its_position():
    rng = np.random.default_rng(0)
    blocks = [packed(rng.integers(5, 100, 64)) for _ in range(4)]
    full = [mb.tokens.cell_index.tolist() for mb in MicroBatchLoader(blocks, max_tokens=500)]
    loader = MicroBatchLoader(blocks, max_tokens=500)
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = loader.state_dict()
    assert state["batches"] == 7
    resumed = MicroBatchLoader(blocks, max_tokens=500)
    resumed.load_state_dict(state)
    rest = [mb.tokens.cell_index.tolist() for mb in resumed]
    assert rest == full[7:]
    assert [mb.index for mb in MicroBatchLoader(blocks, max_tokens=500)][:3] == [0, 1, 2]
    # saved after the epoch's last batch: the next iteration is the next epoch, from its start
    assert not state["finished"]
    list(it)
    state = loader.state_dict()
    assert state["finished"]
    after = MicroBatchLoader(blocks, max_tokens=500)
    after.load_state_dict(state)
    assert [mb.epoch for mb in after] == [1] * len(full)


# --- configs ------------------------------------------------------------------------
def test_config_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"Unknown key optim\.learning_rate .* known keys: lr"):
        load_config({"data": {"h5ad": ["a.h5ad"]}, "optim": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match=r"names no data: set data\.h5ad"):
        load_config({"model": {"preset": "scgpt"}})
    with pytest.raises(ConfigError, match=r"optim\.max_steps must be int"):
        load_config({"data": {"h5ad": ["a.h5ad"]}, "optim": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match="held_out_filter"):
        load_config({"data": {"census": {"uri": "c"}, "held_out_fraction": 0.1}})
    with pytest.raises(ConfigError, match="shipped presets"):
        load_config("no_such_preset")
    monkeypatch.delenv("SCLCM_NOT_SET", raising=False)
    with pytest.raises(ConfigError, match="SCLCM_NOT_SET, which is not set"):
        pretrain({"data": {"h5ad": ["${SCLCM_NOT_SET}/x.h5ad"]}, "out_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="no file"):
        pretrain({"data": {"h5ad": ["missing.h5ad"]}, "out_dir": str(tmp_path)})
    # the shipped presets load (and 1e-4 written as YAML 1.1 would read it is a number)
    for preset in ("geneformer", "scgpt", "scbert", "scfoundation"):
        cfg = load_config(preset, overrides={"optim.lr": "1e-4"})
        assert cfg.model.preset == preset
        assert cfg.optim.lr == 1e-4


# --- every preset learns ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["geneformer", "scgpt", "scbert", "scfoundation"])
def test_preset_learns_on_pbmc3k(tmp_path, preset):
    steps = {"geneformer": 600}.get(preset, 200)  # gene identity takes longest to learn
    model, m = pretrain(tiny_config(tmp_path, preset, optim__max_steps=steps))
    print(preset, {k: m[k] for k in ("loss_step0", "loss_end", "baseline", "vocab_genes")})
    assert m["steps"] == steps
    assert m["held_out_cells"] > 200
    assert m["loss_end"] < 0.9 * m["loss_step0"]
    assert m["loss_end"] < 0.95 * m["baseline"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["loss_end"] == m["loss_end"]
    again = CellModel.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(again.state_dict(), model.state_dict())
    assert again.tokenizer is not None


# --- exact resume -------------------------------------------------------------------
class Killed(RuntimeError):
    pass


class Kill(L.Callback):
    """Stops the run with an error once ``step`` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise Killed


class Recorder(L.Callback):
    """The cells of every training batch, in order."""

    def __init__(self) -> None:
        self.batches: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((batch.epoch, batch.index, tuple(batch.tokens.cell_index)))


@cache
def small_h5ad(tmp_dir: str) -> str:
    path = f"{tmp_dir}/pbmc_200.h5ad"
    _load(PBMC3K)[:200].copy().write_h5ad(path)
    return path


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = small_h5ad(str(tmp))

    # 200 cells at 16 a step: ~13 steps an epoch; 30 steps cross two epoch boundaries.
    # Dropout stays on (0.02): its masks are seeded per step too.
    def cfg(out):
        return tiny_config(out, "geneformer", data__h5ad=[data], data__block_size=64,
                           data__held_out_fraction=0, vocab__min_cells=20,
                           optim__max_steps=30, trainer__checkpoint_every=1)

    full_rec = Recorder()
    full, _ = pretrain(cfg(tmp / "full"), callbacks=[full_rec])
    epochs = [b[0] for b in full_rec.batches]
    assert set(epochs) == {0, 1, 2}
    epoch_end = epochs.index(1)  # the checkpoint after the last batch of epoch 0

    with pytest.raises(Killed):
        pretrain(cfg(tmp / "killed"), callbacks=[Kill(epoch_end + 5)])
    # the killed run's checkpoints load into a model that embeds (its tokenizer attached)
    from sclcm.train import model_from_checkpoint

    killed = model_from_checkpoint(str(tmp / "killed" / "checkpoints" / "last.ckpt"))
    assert killed.tokenizer is not None
    assert sclcm.tl.embed(_load(PBMC3K)[:5].copy(), killed, copy=True).obsm["X_sclcm"].shape \
        == (5, killed.config.d_model)
    # resume mid-epoch 1, and from the end of epoch 0
    for step, in_epoch in ((epoch_end + 2, 2), (epoch_end, epoch_end)):
        ckpt = tmp / "killed" / "checkpoints" / f"step-{step:07d}.ckpt"
        loops = torch.load(ckpt, weights_only=True)["loops"]
        position = loops["fit_loop"]["state_dict"]["combined_loader"][0]
        assert position["batches"] == in_epoch
        assert position["finished"] == (step == epoch_end)
        resumed_rec = Recorder()
        resumed, _ = pretrain(cfg(tmp / "killed"), callbacks=[resumed_rec],
                              overrides={"trainer.resume": str(ckpt)})
        assert resumed_rec.batches == full_rec.batches[step:]
        torch.testing.assert_close(resumed.state_dict(), full.state_dict())


def test_pretraining_continues_a_saved_model(tmp_path):
    """model.start: the run takes the start model's vocabulary, tokenizer and weights (at a
    learning rate of ~0 it ends where it started; a fresh model of the same seed would not)
    and trains them (at 3e-3 they move), and the start directory is left as it was."""
    data = small_h5ad(str(tmp_path))
    first, _ = pretrain(tiny_config(tmp_path / "first", "geneformer", data__h5ad=[data],
                                    data__block_size=64, data__held_out_fraction=0,
                                    vocab__min_cells=20, optim__max_steps=5))
    start = tmp_path / "first" / "model"
    files = {p: p.read_bytes() for p in start.rglob("*") if p.is_file()}

    def cont(name: str, lr: float) -> tuple[CellModel, dict]:
        return pretrain({"data": {"h5ad": [str(data_path(PBMC3K))], "block_size": 64,
                                  "held_out_fraction": 0.1, "held_out_max_cells": 100},
                         "model": {"preset": "geneformer", "start": str(start)},
                         "optim": {"lr": lr, "warmup_steps": 0, "max_steps": 3,
                                   "max_tokens": 1024},
                         "trainer": {"val_every": 0, "checkpoint_every": 0},
                         "out_dir": str(tmp_path / name)})

    still, m = cont("still", 1e-12)
    assert m["start"] == str(start)
    assert m["steps"] == 3
    assert still.vocab.genes.tolist() == first.vocab.genes.tolist()
    assert (tmp_path / "still" / "model" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (start / "tokenizer" / "tokenizer.json").read_bytes()
    torch.testing.assert_close(still.state_dict(), first.state_dict(), rtol=0, atol=1e-7)
    moved, _ = cont("moved", 3e-3)
    w0, w1 = first.state_dict(), moved.state_dict()
    assert max(float((w0[k] - w1[k]).abs().max()) for k in w0) > 1e-3
    assert {p: p.read_bytes() for p in start.rglob("*") if p.is_file()} == files


@pytest.mark.slow
def test_census_source_trains(tmp_path):
    import cellxgene_census
    from test_data_inputs import local_census

    uri = local_census()
    with cellxgene_census.open_soma(uri=uri) as census:
        obs = census["census_data"]["homo_sapiens"].obs.read(
            column_names=["dataset_id"]).concat().to_pandas()
    held = obs["dataset_id"].value_counts().index[-1]  # the smaller human dataset
    cfg = tiny_config(tmp_path, "scfoundation", optim__max_steps=3)
    cfg["data"] = {"census": {"uri": uri, "organism": "Homo sapiens"}, "block_size": 128,
                   "held_out_filter": f"dataset_id == '{held}'", "held_out_max_cells": 50}
    _, m = pretrain(cfg)
    assert m["held_out_cells"] == 50
    assert m["train_cells"] == (obs["dataset_id"] != held).sum()
    assert np.isfinite(m["loss_end"])


# --- the non-finite guard -----------------------------------------------------------
class InjectNaN(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 3:
            with torch.no_grad():
                pl_module.model.embed_tokens.genes.weight.fill_(float("nan"))


def test_non_finite_loss_stops_with_a_hint(tmp_path):
    cfg = tiny_config(tmp_path, "scfoundation", data__held_out_fraction=0,
                      optim__max_steps=10, vocab__min_cells=1000)
    with pytest.raises(NonFiniteLossError, match=r"nan .* at step 3 .*Lower the learning rate"):
        pretrain(cfg, callbacks=[InjectNaN()])
    absurd = tiny_config(tmp_path / "lr", "scfoundation", data__held_out_fraction=0,
                         optim__max_steps=50, optim__lr=1e12, optim__warmup_steps=0,
                         optim__grad_clip=None, vocab__min_cells=1000)
    with pytest.raises(NonFiniteLossError, match="check the input"):
        pretrain(absurd)


# --- the command line ---------------------------------------------------------------
def test_cli_pretrain_then_load(tmp_path, monkeypatch, capsys):
    from sclcm.cli import main

    monkeypatch.setenv("SCLCM_DATA", str(DATA))
    cfg = tiny_config("unused", "scgpt", optim__max_steps=5, vocab__min_cells=1000,
                      data__held_out_max_cells=40)
    cfg["data"]["h5ad"] = [f"${{SCLCM_DATA}}/{PBMC3K}.h5ad"]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["pretrain", "--config", str(path), "--out", str(tmp_path / "run"),
          "--set", "optim.lr=1e-3", "--set", "trainer.log_every=1"])
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{\n"):])  # the metrics, printed last
    assert printed["steps"] == 5
    assert printed["loss_end"] > 0
    model = CellModel.from_pretrained(tmp_path / "run" / "model")
    assert model.config.tokenizer == "scgpt"
    adata = _load(PBMC3K)[:8]
    emb = model.embed(model.tokenizer.tokenize(adata))
    assert emb.shape == (8, model.config.d_model)
    assert np.isfinite(emb).all()
    logs = list((tmp_path / "run" / "logs").rglob("metrics.csv"))
    header = logs[0].read_text().splitlines()[0]
    assert {"train/loss", "train/lr", "train/tokens_per_s"} <= set(header.split(","))


# --- two CPU ranks (DDP over gloo) --------------------------------------------------
class RankLog(L.Callback):
    """Writes the (epoch, index) of each rank's batches and its cells at the end."""

    def __init__(self, out: str) -> None:
        self.out, self.steps, self.cells = out, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append((batch.epoch, batch.index))
        if batch.epoch == 0:
            self.cells.append(batch.tokens.cell_index.copy())

    def on_fit_end(self, trainer, pl_module) -> None:
        np.savez(f"{self.out}/rank{trainer.global_rank}.npz", steps=np.array(self.steps),
                 cells=np.concatenate(self.cells))


@pytest.mark.slow
def test_two_ranks_train_in_step(tmp_path):
    from sclcm.data import AnnDataStream
    from sclcm.train import PretrainDataModule, PretrainModule
    from sclcm.train._prepare import prepare
    from sclcm.train._run import build_model

    path = tmp_path / "pbmc_40.h5ad"
    _load(PBMC3K)[:40].copy().write_h5ad(path)
    # whole cells (up to ~2,000 tokens) under a 1,200-token budget: the ranks' blocks need
    # different numbers of micro-batches, which the DataModule evens out
    cfg = load_config(tiny_config(tmp_path, "scgpt", data__h5ad=[str(path)],
                                  tokenizer__options={"max_len": 2048}, vocab__min_cells=5,
                                  data__held_out_fraction=0))
    prep = prepare(cfg)
    stream = AnnDataStream(path, block_size=10, chunk_size=5, seed=1)
    tokens = stream.tokenize(prep.tokenizer)
    per_rank = []
    for rank in (0, 1):
        stream.set_shard(rank, 2)
        per_rank.append([len(group_by_length(b.lengths, 1200)) for b in tokens])
    assert per_rank[0] != per_rank[1]

    data = PretrainDataModule(tokens, max_tokens=1200, seed=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=24,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[RankLog(str(tmp_path))])
    trainer.fit(PretrainModule(build_model(cfg, prep.vocab, prep.tokenizer), lr=1e-3),
                datamodule=data)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    steps = [r["steps"] for r in ranks]
    assert len(steps[0]) == 24
    np.testing.assert_array_equal(steps[0], steps[1])  # same epoch and batch at every step
    assert set(steps[0][:, 0]) == {0, 1}  # across an epoch boundary
    a, b = (r["cells"] for r in ranks)
    assert len(a) == len(b) == 20  # each rank its half of the 40 cells in epoch 0
    assert not set(a) & set(b)


def test_checkpoint_written_before_a_config_field_existed_loads(tmp_path):
    """A checkpoint's config lacks the fields added after it was written (as that of a run
    started before scGPT's options existed): it loads with their documented defaults, and
    the model is the one that was trained."""
    from sclcm.models import ModelConfig
    from sclcm.models._io import ADDED_FIELDS
    from sclcm.train import model_from_checkpoint

    vocab = sclcm.genes.GeneVocab(["CD3E", "CD14", "MS4A1", "NKG7", "LYZ"], species="human")
    torch.manual_seed(0)
    model = CellModel(ModelConfig.preset("geneformer", "tiny", vocab=vocab), vocab=vocab)
    config = model.config.to_dict()
    added = [k.removeprefix("config.") for k in ADDED_FIELDS[2] if k.startswith("config.")]
    old = {k: v for k, v in config.items() if k not in added}
    assert len(old) == len(config) - len(added)
    path = tmp_path / "old.ckpt"
    torch.save({"sclcm": {"model_config": old, "vocab": vocab.to_dict()},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded = model_from_checkpoint(str(path))
    assert loaded.config.to_dict() == config
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
