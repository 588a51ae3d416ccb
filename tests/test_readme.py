"""The code in README.md and docs/*.md runs as written (on real cells): its snippets are what
new users paste.

Every fenced code block there carries a marker on the line before it: ``<!-- run: NAME -->``
when a test below executes it (``doc_code("NAME")``: the blocks of that name, in order), or
``<!-- not run: REASON -->`` when it cannot run here (a GPU, the network, hours of
training). The first test checks that no block is left without one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import CHAI_MOUSE, KANG_CTRL, KANG_IFNB, PBMC3K, data_path

import sclcm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*(run|not run):\s*(.*?)\s*-->$")
FENCE = re.compile(r"^(```+|~~~+)(.*)$")


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    marker: tuple[str, str] | None  # ("run", name) or ("not run", reason)


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page; MyST directives (```` ```{toctree} ````)
    are not code and are left out."""
    lines = path.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(m.group(1)))
        info = m.group(2).strip()
        if not info.startswith("{"):
            mark = MARKER.match(lines[i - 1].strip()) if i else None
            blocks.append(Block(path, i + 1, info, "\n".join(lines[i + 1:end]) + "\n",
                                mark.groups() if mark else None))
        i = end + 1
    return blocks


def doc_blocks(name: str) -> list[str]:
    """The code of each block marked ``<!-- run: name -->``, in page order."""
    code = [b.code for p in PAGES for b in code_blocks(p) if b.marker == ("run", name)]
    assert code, f"no block is marked <!-- run: {name} -->"
    return code


def doc_code(name: str) -> str:
    """The blocks marked ``<!-- run: name -->`` as one program."""
    return "\n".join(doc_blocks(name))


def test_every_code_block_runs_in_a_test_or_says_why_not():
    names_used = set(re.findall(r'doc_(?:code|blocks)\("([^"]+)"\)', Path(__file__).read_text()))
    unmarked, unused = [], set()
    for page in PAGES:
        for b in code_blocks(page):
            where = f"{b.path.relative_to(ROOT)}:{b.line}"
            if b.marker is None:
                unmarked.append(where)
            elif b.marker[0] == "not run":
                assert len(b.marker[1]) > 10, f"{where}: say why it is not run"
            elif b.marker[1] not in names_used:
                unused.add(f"{where} ({b.marker[1]})")
    assert not unmarked, ("code blocks without <!-- run: NAME --> (and a test calling "
                          "doc_code(NAME)) or <!-- not run: REASON --> on the line before: "
                          + ", ".join(unmarked))
    assert not unused, f"marked run but no test runs them: {sorted(unused)}"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder where the files the snippets name are the real datasets (links)."""
    for name, source in [("pbmc3k_raw.h5ad", PBMC3K), (f"{KANG_CTRL}.h5ad", KANG_CTRL),
                         (f"{PBMC3K}.h5ad", PBMC3K), (f"{KANG_IFNB}.h5ad", KANG_IFNB)]:
        (tmp_path / name).symlink_to(data_path(source))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def kang_subset(tmp_path_factory):
    """300 Kang 2018 ctrl cells as a file, for the snippets that name a file of their own."""
    import anndata as ad

    adata = ad.read_h5ad(data_path(KANG_CTRL))
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, 300, replace=False))
    path = tmp_path_factory.mktemp("kang") / "kang2018_ctrl.h5ad"
    adata[rows].copy().write_h5ad(path)
    return path


@pytest.fixture
def mouse_adata(load):
    return load(CHAI_MOUSE)[:200].copy()


@pytest.mark.slow
def test_gene_identity_snippets_run_as_written(workdir, mouse_adata):
    scope = {"mouse_adata": mouse_adata}
    exec(doc_code("readme-genes"), scope)
    assert isinstance(scope["report"], sclcm.genes.GeneReport)
    assert scope["ens"].var_names.str.startswith("ENSG").all()
    assert 0.5 < scope["human"].ortholog_coverage <= 1
    assert (workdir / "vocab.json").is_file()
    scope = {"mouse_adata": mouse_adata}
    exec(doc_code("genes"), scope)
    assert (scope["ids"] >= -1).all()
    assert (scope["ids"] >= 0).mean() > 0.5
    assert scope["every"].n_vars > scope["human"].n_matched  # "all": one-to-many carried
    assert scope["every"].uns["sclcm_orthologs"]["count_inflation"] >= 1


def test_tokenizer_and_model_snippets_run_as_written(load, tmp_path, monkeypatch):
    """Tokenize real pbmc3k cells, build the small Geneformer model, embed, save, reload and
    embed through ``tl.embed``: the snippet once failed (4,096-token cells for a model of
    2,048 positions, and a saved directory without its tokenizer)."""
    adata = load(PBMC3K)[:60].copy()
    monkeypatch.chdir(tmp_path)
    scope = {"sclcm": sclcm, "adata": adata,
             "vocab": sclcm.genes.GeneVocab.from_reference("human")}
    exec(doc_code("readme-tokenizers"), scope)
    exec(doc_code("readme-models"), scope)
    assert scope["emb"].shape == (60, scope["model"].config.d_model)
    assert (tmp_path / "gf-small" / "tokenizer" / "tokenizer.json").is_file()
    # the saved directory embeds the same cells as the model it was saved from
    np.testing.assert_allclose(adata.obsm["X_sclcm"], scope["emb"], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_tokenizer_and_model_pages_run_as_written(workdir):
    scope: dict = {}
    exec(doc_code("tokenizers"), scope)
    assert len(scope["corpus"]) == 2700
    assert (workdir / "tok").is_dir()
    scope = {}
    exec(doc_code("models"), scope)
    assert scope["emb"].shape == (64, 256)
    assert (workdir / "gf-small-fp16" / "config.json").is_file()


@pytest.mark.slow
def test_embedding_checks_and_settings_snippets_run_as_written(load):
    import scanpy as sc

    adata = load(KANG_CTRL)[:80].copy()
    scope = {"sclcm": sclcm, "sc": sc, "adata": adata}
    exec(doc_code("readme-embed"), scope)
    assert adata.obsm["X_sclcm"].shape[0] == 80
    assert "neighbors" in adata.uns
    exec(doc_code("checks"), scope)  # raw counts: no error
    old = (sclcm.settings.verbosity, sclcm.settings.progress, sclcm.settings.device)
    try:
        exec(doc_code("readme-settings"), scope)
        assert sclcm.settings.verbosity == "info"
        assert sclcm.settings.progress is False
    finally:
        sclcm.settings.verbosity, sclcm.settings.progress, sclcm.settings.device = old


@pytest.mark.slow
# scanpy's UMAP plot calls a matplotlib function that matplotlib will deprecate
@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")
def test_embedding_page_and_getting_started_run_as_written(workdir, kang_subset):
    import matplotlib.pyplot as plt

    (workdir / "kang2018_ctrl.h5ad").symlink_to(kang_subset)
    (workdir / "atlas.h5ad").symlink_to(kang_subset)
    embed, backed, judge = doc_blocks("embedding")
    scope: dict = {}
    try:
        exec(embed + judge, scope)  # the judging block scores the first block's cells
        exec(doc_code("getting-started"), {})
    finally:
        plt.close("all")
    table = scope["table"]
    assert {"X_sclcm", "HVG + PCA"} <= set(table.index)
    assert table.loc["X_sclcm", "AvgBIO"] > 0.3  # cell types of real PBMCs, kept apart
    scope = {"ad": scope["ad"], "sclcm": sclcm}
    exec(backed, scope)
    assert scope["emb"].shape == (300, 128)
    assert scope["adata"].isbacked


@pytest.mark.slow
def test_perturbation_page_runs_as_written(workdir):
    import matplotlib.pyplot as plt

    scope: dict = {}
    try:
        exec(doc_code("perturbation"), scope)
    finally:
        plt.close("all")
    table = scope["adata"].uns["sclcm_perturb"]["table"]
    assert set(table["gene"]) == {"CD74", "LYZ", "MALAT1", "S100A8"}
    assert scope["adata"].obsm["ko_all"].shape[0] == 300
    assert "mean_goal_shift" in scope["kang"].uns["sclcm_perturb"]["table"]


def test_pretraining_configs_are_valid():
    """The YAML of docs/pretraining.md is read and checked as `sclcm pretrain` reads it."""
    import yaml

    from sclcm.train import load_config

    for part in doc_blocks("pretraining-yaml"):
        cfg = yaml.safe_load(part)
        cfg.setdefault("data", {"h5ad": ["cells.h5ad"]})
        load_config(cfg)


def test_attach_tokenizer_refuses_cells_longer_than_the_positions(load):
    vocab = sclcm.genes.GeneVocab.from_reference("human")
    model = sclcm.models.CellModel(sclcm.models.ModelConfig.preset(
        "geneformer", "small", vocab=vocab), vocab=vocab)
    tok = sclcm.tokenizers.GeneformerTokenizer(vocab)  # 4,096 tokens by default
    with pytest.raises(ValueError, match="max_len=2048"):
        model.attach_tokenizer(tok)


API_MODULES = ["pp", "tl", "pl", "genes", "tokenizers", "models", "data", "train", "metrics"]


def test_api_reference_lists_every_public_function_and_class():
    """docs/api.md names every public function and class (``__all__``, or the module's own
    top-level names), so each gets its generated page; names that are no longer public
    are not listed."""
    import importlib
    import inspect

    api = (ROOT / "docs" / "api.md").read_text()
    listed = set(re.findall(r"^\s+(sclcm\.[\w.]+)\s*$", api, flags=re.MULTILINE))
    public = {"sclcm.settings", "sclcm.InputError"}
    for name in API_MODULES:
        module = importlib.import_module(f"sclcm.{name}")
        names = getattr(module, "__all__", None) or [
            n for n, o in vars(module).items() if not n.startswith("_")
            and getattr(o, "__module__", None) == module.__name__]
        public |= {f"sclcm.{name}.{n}" for n in names
                   if inspect.isclass(getattr(module, n)) or callable(getattr(module, n))}
    assert not public - listed, f"add to docs/api.md: {sorted(public - listed)}"
    assert not listed - public - {f"sclcm.{m}" for m in API_MODULES}, \
        f"not public (any more): {sorted(listed - public)}"
