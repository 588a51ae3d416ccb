"""MaskingCollator: masking statistics on real cells, and the model trains on its output."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import PBMC3K, data_path

import sclcm
from sclcm.data import MaskingCollator
from sclcm.genes import GeneVocab, resolve
from sclcm.models import CellModel, ModelConfig
from sclcm.tokenizers import (
    GeneformerTokenizer,
    ScBERTTokenizer,
    ScFoundationTokenizer,
    ScGPTTokenizer,
)


@pytest.fixture(scope="module")
def cells():
    adata = ad.read_h5ad(data_path(PBMC3K))[:40].copy()
    report = resolve(adata)
    return adata, report, GeneVocab.from_report(report)


def tokens(cells, family):
    adata, report, vocab = cells
    tok = {"geneformer": lambda: GeneformerTokenizer(vocab, max_len=256).fit(adata,
                                                                              report=report),
           "scgpt": lambda: ScGPTTokenizer(vocab, max_len=256),
           "scbert": lambda: ScBERTTokenizer(GeneVocab(vocab.genes[:300])),
           "scfoundation": lambda: ScFoundationTokenizer(vocab, max_len=256)}[family]()
    return sclcm.pp.tokenize(adata[:8], tok, report=report), tok.vocab


def test_mlm_masking_statistics(cells):
    batch, vocab = tokens(cells, "geneformer")
    cfg = ModelConfig.preset("geneformer", "tiny", vocab=vocab)
    out = MaskingCollator(cfg, seed=1)(batch, step=3)
    ids, masked = batch.gene_ids.astype(np.int64), out["masked"].numpy()
    new = out["gene_ids"].numpy()
    genes = ids >= cfg.n_special_tokens
    assert not masked[~genes].any()  # <cls>, <eos> never chosen
    share = masked.sum() / genes.sum()
    assert abs(share - 0.15) < 4 * np.sqrt(0.15 * 0.85 / genes.sum())
    np.testing.assert_array_equal(new[~masked], ids[~masked])  # the rest untouched
    np.testing.assert_array_equal(out["labels"].numpy(), ids[masked])
    is_mask = new[masked] == cfg.mask_id
    kept = new[masked] == ids[masked]
    assert 0.7 < is_mask.mean() < 0.9
    assert 0.03 < kept.mean() < 0.2  # 10% kept, plus random draws of the same gene
    assert out["replace_masked"] is False
    again = MaskingCollator(cfg, seed=1)(batch, step=3)
    assert torch.equal(again["masked"], out["masked"])
    assert torch.equal(again["gene_ids"], out["gene_ids"])
    other = MaskingCollator(cfg, seed=1)(batch, step=4)
    assert not torch.equal(other["masked"], out["masked"])


@pytest.mark.parametrize(("family", "generative"), [("geneformer", False), ("scbert", False),
                                                     ("scgpt", False), ("scgpt", True),
                                                     ("scfoundation", False)])
def test_model_trains_on_collated_batches(cells, family, generative):
    batch, vocab = tokens(cells, family)
    cfg = ModelConfig.preset(family, "tiny", vocab=vocab, dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    model = CellModel(cfg, vocab=vocab)
    inputs = MaskingCollator(cfg, mask_prob=0.3, generative=generative)(batch, step=0)
    labels = inputs.pop("labels")
    out = model(**inputs)
    assert torch.equal(out["target_index"], inputs["masked"].nonzero()[:, 0])
    if cfg.objective in ("mlm", "bin"):
        loss = torch.nn.functional.cross_entropy(out["logits"], labels)
    elif cfg.objective == "value":
        loss = torch.nn.functional.mse_loss(out["pred"].squeeze(-1), labels)
    else:
        assert "decoder_pred" in out
        loss = out["decoder_pred"].float().pow(2).mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_options():
    cfg = ModelConfig.preset("geneformer", "tiny", vocab_size=50)
    with pytest.raises(ValueError, match="mask_prob"):
        MaskingCollator(cfg, mask_prob=0)
    with pytest.raises(ValueError, match="summing to 1"):
        MaskingCollator(cfg, corrupt=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="scGPT"):
        MaskingCollator(cfg, generative=True)
