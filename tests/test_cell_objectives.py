"""Cell-level pretraining objectives: each loss equals its written-out definition on a
hand-made batch, the panel and its targets follow their stated rule on real counts, a tiny
model trained with each objective beats its step-0 held-out loss, and compact weights embed
as float32 ones do."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KANG_CTRL, PAPALEXI, PBMC3K, _load, data_path
from scipy import sparse

from sclcm.data import AnnDataStream
from sclcm.models import CellModel, ModelConfig
from sclcm.tokenizers import GeneformerTokenizer, TokenBatch
from sclcm.train import (
    ConfigError,
    ObjectivesConfig,
    PanelTargets,
    info_nce,
    load_config,
    pretrain,
    reconstruction_loss,
    total_loss,
)
from sclcm.train._cell_objectives import ExpressionMoments, choose_panel, gene_subset_views

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the losses, against their definitions ----------------------------------------------
def test_reconstruction_loss_is_squared_error_over_measured_genes():
    pred = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    target = torch.tensor([[1.5, float("nan"), 1.0], [0.5, 2.0, float("nan")]])
    total, count = reconstruction_loss(pred, target)
    # by hand: (1 - 1.5)^2 + (3 - 1)^2 + (0.5 - 0.5)^2 + (0 - 2)^2 over 4 measured values
    assert count == 4
    assert float(total) == pytest.approx(0.25 + 4.0 + 0.0 + 4.0, rel=1e-6)


def test_info_nce_is_nt_xent_by_hand():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 5))  # 3 cells, two views each: rows i and i + 3 are twins
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    tau, losses = 0.2, []
    for i in range(6):
        twin = (i + 3) % 6
        logits = np.array([unit[i] @ unit[j] / tau for j in range(6) if j != i])
        others = [j for j in range(6) if j != i]
        losses.append(-logits[others.index(twin)] + math.log(np.exp(logits).sum()))
    got = info_nce(torch.tensor(z, dtype=torch.float32), tau)
    assert float(got) == pytest.approx(float(np.mean(losses)), rel=1e-5)


def test_twin_views_score_lower_than_unrelated_pairs():
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    twins = torch.cat([z, z + 0.01 * torch.randn_like(z)])
    strangers = torch.cat([z, torch.randn_like(z)])
    assert info_nce(twins, 0.1) < info_nce(strangers, 0.1)


def test_total_loss_weighs_each_term_by_its_mean():
    terms = {"objective": (torch.tensor(12.0), 4.0), "reconstruction": (torch.tensor(3.0), 6.0),
             "contrastive": (torch.tensor(8.0), 2.0)}
    obj = ObjectivesConfig(token=1.0, reconstruction=10.0, contrastive=0.5)
    assert float(total_loss(terms, obj)) == pytest.approx(12 / 4 + 10 * 3 / 6 + 0.5 * 8 / 2)


def test_gene_subset_views_keep_specials_and_at_least_one_gene():
    ids = np.array([2, 10, 11, 12, 13, 2, 14, 3], dtype=np.int32)  # <cls> genes; <cls> gene <eos>
    batch = TokenBatch(ids, np.arange(8, dtype=np.float32), np.array([0, 5, 8]),
                       np.array([7, 9]), {"panel": np.ones((2, 3), np.float32)})
    for seed in range(20):
        views = gene_subset_views(batch, 0.3, np.random.default_rng(seed), n_special=4)
        assert views.n_cells == 4
        assert views.cell_index.tolist() == [7, 9, 7, 9]
        assert views.extras["panel"].shape == (4, 3)
        for i in range(4):
            g, v = views.cell(i)
            assert g[0] == 2  # <cls> stays, in front
            assert (g >= 4).sum() >= 1
            # every kept token is one of its cell's, in the cell's order (values follow)
            src = batch.cell(i % 2)
            assert np.isin(v, src[1]).all()
            assert (np.diff(v) > 0).all()
        assert 3 in views.cell(1)[0]
        assert 3 in views.cell(3)[0]


# --- the panel and its targets, on real counts ----------------------------------------
def pbmc_tokenizer(max_len=64):
    from sclcm.genes import GeneVocab

    adata = _load(PBMC3K)
    vocab = GeneVocab.from_reference("human")
    return adata, GeneformerTokenizer(vocab, max_len=max_len).fit(adata)


def test_panel_targets_are_log1p_cp10k_of_each_cell():
    adata, tok = pbmc_tokenizer()
    sub = adata[:50].copy()
    stream = AnnDataStream([sub], block_size=50, shuffle=False)
    block = next(iter(stream))
    cmap = block.column_map(tok)
    cols = np.flatnonzero(cmap.slot >= 0)[:300:7]  # some genes of pbmc3k
    panel = np.sort(cmap.token_ids[cmap.slot[cols]])
    targets = PanelTargets(panel, tok)
    batch = targets(block, block.tokenize(tok))
    X = sub.X.toarray().astype(np.float64)
    col_of = {int(cmap.token_ids[cmap.slot[c]]): c for c in np.flatnonzero(cmap.slot >= 0)}
    rows = batch.cell_index  # stream ids are rows of sub
    want = np.log1p(1e4 * X[np.ix_(rows, [col_of[int(t)] for t in panel])]
                    / X[rows].sum(1, keepdims=True))
    np.testing.assert_allclose(batch.extras["panel"], want, rtol=1e-5, atol=1e-5)
    assert (batch.extras["panel"] == 0).any()  # zeros are targets too


def test_genes_a_dataset_lacks_are_missing_not_zero():
    adata, tok = pbmc_tokenizer()
    papalexi = _load(PAPALEXI)[:40].copy()
    pbmc_block = next(iter(AnnDataStream([adata[:20].copy()], block_size=20, shuffle=False)))
    cmap = pbmc_block.column_map(tok)
    panel = np.unique(cmap.token_ids[cmap.slot[cmap.slot >= 0]])[:500]
    block = next(iter(AnnDataStream([papalexi], block_size=40, shuffle=False)))
    batch = PanelTargets(panel, tok)(block, block.tokenize(tok))
    measured = np.isfinite(batch.extras["panel"])
    assert measured.any()
    assert not measured.all()
    assert (measured == measured[0]).all()  # a property of the dataset, not of the cell


def test_duplicate_entries_add_up_in_targets_and_moments():
    adata, tok = pbmc_tokenizer()
    sub = adata[:5].copy()
    X = sparse.csr_matrix(sub.X)
    # the same counts with every entry stored twice, halved (valid, non-canonical CSR)
    n = np.diff(X.indptr)
    rows = np.repeat(np.arange(X.shape[0]), n)
    order = np.argsort(np.concatenate([rows, rows]), kind="stable")
    dup = sparse.csr_matrix((np.concatenate([X.data, X.data])[order] / 2,
                             np.concatenate([X.indices, X.indices])[order],
                             np.concatenate([[0], np.cumsum(2 * n)])), shape=X.shape)
    assert dup.nnz == 2 * X.nnz
    block = next(iter(AnnDataStream([sub], block_size=5, shuffle=False)))
    cmap = block.column_map(tok)
    col_tok = cmap.column_token_ids
    a, b = ExpressionMoments(len(tok.vocab)), ExpressionMoments(len(tok.vocab))
    a.add(sub.X, col_tok)
    b.add(dup, col_tok)
    np.testing.assert_allclose(a.sum, b.sum, rtol=1e-9)
    np.testing.assert_allclose(a.sum_sq, b.sum_sq, rtol=1e-9)


def test_panel_is_seurat_most_variable_genes_on_kang():
    import scanpy as sc

    kang = _load(KANG_CTRL)[:2000].copy()
    from sclcm.genes import GeneVocab

    vocab = GeneVocab.from_reference("human")
    tok = GeneformerTokenizer(vocab, max_len=64).fit(kang)
    block = next(iter(AnnDataStream([kang], block_size=2000, shuffle=False)))
    cmap = block.column_map(tok)
    col_tok = cmap.column_token_ids
    m = ExpressionMoments(len(vocab))
    m.add(block.X, col_tok)
    panel = choose_panel(m, np.unique(col_tok[col_tok >= 0]), 300)
    # scanpy's seurat flavour on the same cells and genes
    ref = kang[:, col_tok >= 0].copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=300)
    theirs = set(col_tok[col_tok >= 0][ref.var["highly_variable"].to_numpy()])
    overlap = len(theirs & set(panel)) / 300
    assert len(panel) == 300
    assert overlap > 0.9, overlap  # same rule; scanpy's bin edges and variance differ slightly


# --- configuration -------------------------------------------------------------------
def test_objective_config_errors_say_what_to_change(tmp_path):
    base = {"data": {"h5ad": [str(data_path(PBMC3K))]}}
    with pytest.raises(ConfigError, match="Every objective has weight 0"):
        load_config({**base, "objectives": {"token": 0}})
    with pytest.raises(ConfigError, match="weight >= 0"):
        load_config({**base, "objectives": {"reconstruction": -1}})
    with pytest.raises(ConfigError, match="view_keep"):
        load_config({**base, "objectives": {"contrastive": 1, "view_keep": 1.5}})
    with pytest.raises(ConfigError, match=r"Unknown key objectives\.recon"):
        load_config({**base, "objectives": {"recon": 1}})


def test_module_refuses_reconstruction_without_a_head():
    from sclcm.train import PretrainModule

    model = CellModel(ModelConfig.preset("geneformer", "tiny", vocab_size=50))
    with pytest.raises(ValueError, match="recon_panel"):
        PretrainModule(model, objectives={"reconstruction": 1.0})


# --- each objective learns on real cells ------------------------------------------------
def tiny(out, objectives: dict, steps: int = 120) -> dict:
    return {"data": {"h5ad": [str(data_path(PBMC3K))], "block_size": 256,
                     "held_out_fraction": 0.1, "held_out_max_cells": 270},
            "tokenizer": {"options": {"max_len": 64}}, "vocab": {"min_cells": 300},
            "model": {"preset": "geneformer", "size": "tiny"},
            "optim": {"lr": 3e-3, "warmup_steps": 10, "max_steps": steps, "max_tokens": 1024},
            "objectives": {"panel_size": 200, **objectives},
            "trainer": {"val_every": 0, "checkpoint_every": 0, "log_every": 20},
            "out_dir": str(out)}


@pytest.mark.slow
@pytest.mark.parametrize("objectives", [
    {"token": 0.0, "reconstruction": 1.0},
    {"token": 0.0, "contrastive": 1.0},
    {"token": 1.0, "reconstruction": 10.0, "contrastive": 1.0},
], ids=["reconstruction", "contrastive", "all three"])
def test_each_objective_beats_its_step0_held_out_loss(tmp_path, objectives):
    model, m = pretrain(tiny(tmp_path, objectives))
    terms = {"reconstruction": "reconstruction", "contrastive": "contrastive", "token": "loss"}
    for name, key in terms.items():
        if objectives.get(name, 0) > 0:
            assert m[f"{key}_end"] < 0.95 * m[f"{key}_step0"], (name, m)
    if "reconstruction" in objectives:
        # below the mean-panel baseline: the cell embedding tells cells apart
        assert m["reconstruction_end"] < m["reconstruction_baseline"]
        assert m["panel_size"] == 200 == len(model.config.recon_panel)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["objectives"]["token"] == objectives["token"]  # the recipe travels
    again = CellModel.from_pretrained(tmp_path / "model")
    assert again.config.recon_panel == model.config.recon_panel
    torch.testing.assert_close(again.state_dict(), model.state_dict())


# --- compact weights -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compact_weights_embed_like_float32(tmp_path, dtype):
    from sclcm.tl import get_model

    model = get_model(None)
    model.save_pretrained(tmp_path / "m", dtype=dtype)
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["weights_dtype"] == dtype
    again = CellModel.from_pretrained(tmp_path / "m")
    assert all(p.dtype == torch.float32 for p in again.parameters())
    import sclcm

    cells = _load(KANG_CTRL)[:300].copy()
    batch = sclcm.pp.tokenize(cells, model.tokenizer)
    a, b = model.embed(batch), again.embed(batch)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    # fp16 keeps 11 significant bits (relative error 2^-11 per weight), bf16 8 (2^-8): the
    # embeddings move by about that much relative to their size
    tol = {"float16": 2e-3, "bfloat16": 2e-2}[dtype]
    assert np.abs(a - b).max() < tol * np.abs(a).max()
    assert cos.min() > 1 - tol


def test_reconstruction_head_starts_at_the_training_mean():
    from sclcm.train._prepare import prepare
    from sclcm.train._run import build_model

    cfg = load_config(tiny("unused", {"token": 0.0, "reconstruction": 1.0}))
    prep = prepare(cfg)
    model = build_model(cfg, prep.vocab, prep.tokenizer, prep.panel, prep.panel_mean)
    assert model.config.recon_panel == prep.panel.tolist()
    # the mean target over training cells, from the batches' own targets
    batches = [b for b, _ in zip(prep.train.tokenize(prep.tokenizer,
                                                     targets=prep.targets(prep.train)),
                                 range(100), strict=False)]
    panel = np.concatenate([b.extras["panel"] for b in batches])
    np.testing.assert_allclose(model.recon_head.bias.detach().numpy(), panel.mean(0),
                               rtol=1e-4, atol=1e-5)


#: float32 embeddings of 40 Kang ctrl cells (rows 0, 200, ...) by the shipped default model
#: before its weights were stored in float16 (written when the model was shipped).
FLOAT32_REFERENCE = Path(__file__).with_name("data") / "default_model_float32_embeddings.npy"


def test_shipped_fp16_weights_embed_like_their_float32_originals():
    import sclcm
    from sclcm.tl import get_model

    model = get_model(None, device="cpu")
    meta = json.loads((sclcm.tl._model_ref.PRETRAINED_DIR / sclcm.tl.DEFAULT_MODEL
                       / "config.json").read_text())
    assert meta["weights_dtype"] == "float16"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # cast back on load
    cells = _load(KANG_CTRL)[::200][:40].copy()
    got = model.embed(sclcm.pp.tokenize(cells, model.tokenizer))
    want = np.load(FLOAT32_REFERENCE)
    # fp16 rounds each weight by at most 2^-11 (4.9e-4) of itself; through 4 blocks the
    # embeddings moved by 7.9e-4 of their largest entry when shipped (scripts/ship_model.py)
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()
