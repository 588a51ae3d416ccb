"""The README's code runs as written (on real cells): its snippets are what new users paste."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import PBMC3K

import sclcm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title: str) -> str:
    """The Python code blocks of the README section ``## title``."""
    text = README.read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL))


def test_tokenizer_and_model_snippets_run_as_written(load, tmp_path, monkeypatch):
    """Tokenize real pbmc3k cells, build the small Geneformer model, embed, save, reload and
    embed through ``tl.embed``: the snippet once failed (4,096-token cells for a model of
    2,048 positions, and a saved directory without its tokenizer)."""
    adata = load(PBMC3K)[:60].copy()
    monkeypatch.chdir(tmp_path)
    scope = {"sclcm": sclcm, "adata": adata,
             "vocab": sclcm.genes.GeneVocab.from_reference("human")}
    exec(_section_code("Tokenizers"), scope)
    exec(_section_code("Models"), scope)
    assert scope["emb"].shape == (60, scope["model"].config.d_model)
    assert (tmp_path / "gf-small" / "tokenizer" / "tokenizer.json").is_file()
    # the saved directory embeds the same cells as the model it was saved from
    np.testing.assert_allclose(adata.obsm["X_sclcm"], scope["emb"], atol=1e-4, rtol=1e-4)


def test_attach_tokenizer_refuses_cells_longer_than_the_positions(load):
    vocab = sclcm.genes.GeneVocab.from_reference("human")
    model = sclcm.models.CellModel(sclcm.models.ModelConfig.preset(
        "geneformer", "small", vocab=vocab), vocab=vocab)
    tok = sclcm.tokenizers.GeneformerTokenizer(vocab)  # 4,096 tokens by default
    with pytest.raises(ValueError, match="max_len=2048"):
        model.attach_tokenizer(tok)
