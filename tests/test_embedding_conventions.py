"""Which layer and which tokens a cell embedding reads: sclcm's default and Geneformer's
``emb_layer`` conventions, against transformers' hidden states on real cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_geneformer_import import TINY, v2_tokens, write_checkpoint
from test_model_data import cell_rows, pbmc

from sclcm.models import import_geneformer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def geneformer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gf_tiny")
    hf = write_checkpoint(directory, v2_tokens(), shape=TINY)
    model = import_geneformer(directory)
    batch = model.tokenizer.tokenize(pbmc()[0][cell_rows()[:10]])
    lengths = torch.from_numpy(batch.lengths)
    valid = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    ids = torch.zeros(valid.shape, dtype=torch.long)
    ids[valid] = torch.from_numpy(batch.gene_ids).long()
    with torch.no_grad():
        hidden = hf.bert(input_ids=ids, attention_mask=valid.long(),
                         output_hidden_states=True).hidden_states
    return model, batch, hidden, valid, ids


def _mean(h, keep):
    w = keep.to(h.dtype)[..., None]
    return ((h * w).sum(1) / w.sum(1)).numpy()


def test_default_is_the_last_layer_without_cls_and_eos(geneformer):
    """sclcm (and Helical): last layer, gene tokens only (Geneformer's emb_layer=0 with its
    special tokens left out)."""
    model, batch, hidden, valid, ids = geneformer
    genes = valid & (ids >= len(model.vocab.special_tokens))
    np.testing.assert_allclose(model.embed(batch), _mean(hidden[-1], genes), atol=1e-5)


def test_geneformer_second_to_last_layer_over_all_tokens(geneformer):
    """Geneformer's EmbExtractor default (emb_layer=-1: the second-to-last layer), with its
    mean over every non-padding token, <cls> and <eos> included."""
    model, batch, hidden, valid, _ = geneformer
    ours = model.embed(batch, layer=-2, special_tokens=True)
    np.testing.assert_allclose(ours, _mean(hidden[-2], valid), atol=1e-5)
    assert not np.allclose(ours, model.embed(batch), atol=1e-3)  # the conventions differ


def test_special_tokens_needs_mean_pooling(tmp_path):
    from test_scgpt_import import write_scgpt

    from sclcm.models import import_scgpt

    write_scgpt(tmp_path)
    model = import_scgpt(tmp_path)
    with pytest.raises(ValueError, match="mean pooling"):
        model.embed(model.tokenizer.tokenize(pbmc()[0][:2]), special_tokens=True)
