"""sclcm.tl.attention and sclcm.tl.gene_network on real cells (Kang 2018 IFN-beta PBMC)."""

from __future__ import annotations

import tracemalloc

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import KANG_IFNB, PBMC3K, assert_unchanged, data_path, snapshot
from scipy import sparse
from test_tl_embed import FAMILIES, tiny_model

import sclcm
import sclcm.tl._attention as attention_mod
from sclcm.tl._attention import top_edges

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ISGS = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1"]


@pytest.fixture(scope="module")
def model():
    """The shipped model: trained attention is far from uniform, so a wrong gene or cell
    in the aggregation shows (a random model attends nearly evenly)."""
    return sclcm.tl.get_model().eval()


@pytest.fixture(scope="module")
def kang():
    """60 control and 60 stimulated cells, every gene."""
    adata = ad.read_h5ad(data_path(KANG_IFNB))
    rng = np.random.default_rng(0)
    cond = adata.obs["condition"].astype(str).to_numpy()
    rows = np.concatenate([rng.choice(np.flatnonzero(cond == c), 60, replace=False)
                           for c in ("ctrl", "stim")])
    return adata[np.sort(rows)].copy()


@pytest.fixture(scope="module")
def genes(kang, model):
    """40 genes of the vocabulary expressed in many of the cells, and the ISGs."""
    report = sclcm.genes.resolve(kang, count_coverage=False)
    in_vocab = model.tokenizer.column_map(kang, report=report).slot >= 0
    frac = np.asarray((kang.X > 0).mean(0)).ravel() * in_vocab
    top = [g for g in kang.var_names[np.argsort(-frac)] if g not in ISGS][:35]
    return ISGS + top


def explicit_attention(model, adata, genes, layers, heads):
    """Mean over cells of softmax(q k^T / sqrt(d)) over each cell's own tokens, computed one
    cell at a time in float64 from the inputs of each layer (no hooks, no packing)."""
    tok = model.tokenizer
    cmap = tok.column_map(adata)
    vocab_id = {int(cmap.token_ids[cmap.slot[c]]): i
                for i, c in enumerate(adata.var_names.get_indexer(genes))}
    G = len(genes)
    sums, counts = np.zeros((G, G)), np.zeros((G, G))
    for r in range(adata.n_obs):
        sums, counts = _add_cell(model, tok.encode(adata.X[r:r + 1], cmap, start=r), vocab_id,
                                 layers, heads, sums, counts)
    with np.errstate(invalid="ignore"):
        mean = sums / counts
    np.fill_diagonal(mean, np.nan)
    np.fill_diagonal(counts, 0)
    return mean, counts


@torch.no_grad()
def _add_cell(model, batch, vocab_id, layers, heads, sums, counts):
    """Add one cell's attention among the genes of ``vocab_id`` to the sums."""
    ids = batch.gene_ids.astype(np.int64)
    out = model(**model.inputs(batch), heads=False, output_hidden_states=True)
    p = 0
    for layer in layers:
        block = model.encoder.blocks[layer]
        x = out["hidden_states"][layer]  # the block's input
        x = block.ln_1(x) if block.pre_norm else x
        q, k, _ = block.attn.qkv(x).double().view(len(x), 3, model.config.n_heads,
                                                   -1).unbind(1)
        s = torch.einsum("ihd,jhd->hij", q, k) / q.shape[-1] ** 0.5
        p = p + s.softmax(-1)[heads].mean(0).numpy() / len(layers)
    # the encoder puts scFoundation's two read-depth tokens before each cell's genes
    n_prefix = 2 if model.config.depth_tokens else 0
    pos = [t for t, i in enumerate(ids) if int(i) in vocab_id]
    where = [vocab_id[int(ids[t])] for t in pos]
    enc = [t + n_prefix for t in pos]
    sums[np.ix_(where, where)] += p[np.ix_(enc, enc)]
    counts[np.ix_(where, where)] += 1
    return sums, counts


@pytest.mark.slow
@pytest.mark.parametrize(("layers", "heads"), [(None, None), ([0, -1], [1, 3])],
                         ids=["last-all-heads", "two-layers-two-heads"])
def test_attention_equals_per_cell_softmax(kang, genes, model, layers, heads):
    sub = kang[::3].copy()  # 20 cells of each condition
    sclcm.tl.attention(sub, model, layers=layers, heads=heads, groupby="condition",
                       genes=genes, top_k=None, min_cells=1)
    rec = sub.uns["sclcm_attention"]
    lay = [model.config.n_layers - 1] if layers is None else [0, model.config.n_layers - 1]
    hds = list(range(model.config.n_heads)) if heads is None else heads
    cond = sub.obs["condition"].astype(str).to_numpy()
    for group in ("ctrl", "stim"):
        want, n_pairs = explicit_attention(model, sub[cond == group], genes, lay, hds)
        got = rec["directed"][group].toarray()
        seen = np.isfinite(want)
        assert seen.sum() > 200  # most pairs of these genes share cells
        # float32 products and softmax against float64: ~1e-7 per probability
        np.testing.assert_allclose(got[seen], want[seen], rtol=1e-4, atol=2e-6)
        assert (got[~seen] == 0).all()
        sym = rec["symmetric"][group].toarray()
        np.testing.assert_allclose(sym[seen], ((want + want.T) / 2)[seen], rtol=1e-4,
                                   atol=2e-6)
        assert rec["n_cells"][group] == (cond == group).sum()
        np.testing.assert_array_equal(rec["n_pairs"][group].toarray(), n_pairs)
    assert rec["params"]["layers"] == lay
    assert rec["params"]["heads"] == hds
    # the attention is far from even: a test that a uniform map would not pass
    assert got[seen].std() > 0.2 * got[seen].mean()


@pytest.fixture(scope="module")
def pbmc30():
    return ad.read_h5ad(data_path(PBMC3K))[:30].copy()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_per_cell_every_family(family, pbmc30):
    """Each family's token layout (scGPT's <cls>, scBERT's full panel, scFoundation's
    read-depth tokens before the genes) maps to the right genes; tiny random models."""
    model = tiny_model(family)
    adata = pbmc30.copy()
    slot = model.tokenizer.column_map(adata).slot
    cols = np.flatnonzero(slot >= 0)
    frac = np.asarray((adata.X[:, cols] > 0).mean(0)).ravel()
    genes = list(adata.var_names[cols[np.argsort(-frac, kind="stable")[:15]]])
    sclcm.tl.attention(adata, model, genes=genes, top_k=None, min_cells=1)
    last = [model.config.n_layers - 1]
    want, _ = explicit_attention(model, adata, genes, last,
                                 list(range(model.config.n_heads)))
    got = adata.uns["sclcm_attention"]["directed"]["all"].toarray()
    seen = np.isfinite(want)
    assert seen.sum() > 100
    np.testing.assert_allclose(got[seen], want[seen], rtol=1e-4, atol=2e-6)


@pytest.mark.slow
def test_backed_streams_in_constant_memory(genes, model, tmp_path, monkeypatch):
    cells = ad.read_h5ad(data_path(KANG_IFNB))[:960].copy()  # both conditions
    path = tmp_path / "kang.h5ad"
    cells.write_h5ad(path)
    monkeypatch.setattr(attention_mod, "BLOCK_CELLS", 16)  # 60 blocks of cells
    read = []
    real = attention_mod.CellTokens.batches

    def spy(self, **kw):
        for first, batch, empty in real(self, **kw):
            read.append(batch.n_cells)
            yield first, batch, empty

    # in memory first: it also compiles the tokenizer's kernels and fills the gene tables'
    # caches, which would otherwise count in the peak below
    mem = cells.copy()
    sclcm.tl.attention(mem, model, layers=0, genes=genes, groupby="condition")
    monkeypatch.setattr(attention_mod.CellTokens, "batches", spy)
    backed = ad.read_h5ad(path, backed="r")
    tracemalloc.start()
    # the first layer only: the blocks after it are not run, and memory is what counts here
    sclcm.tl.attention(backed, model, layers=0, genes=genes, groupby="condition")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert backed.isbacked
    assert max(read) == 16
    assert sum(read) == cells.n_obs
    # what Python holds at most: a block of cells and the 40 x 40 sums, less than the
    # file's X would take once loaded (2.9 MB of CSR; 1.2 MB peak measured)
    x_bytes = cells.X.data.nbytes + cells.X.indices.nbytes + cells.X.indptr.nbytes
    assert peak < x_bytes
    for group in ("ctrl", "stim"):
        a, b = backed.uns["sclcm_attention"]["symmetric"][group], \
            mem.uns["sclcm_attention"]["symmetric"][group]
        np.testing.assert_allclose(a.toarray(), b.toarray(), rtol=1e-5, atol=1e-7)
    backed.file.close()


def test_coexpression_equals_numpy(kang, genes):
    adata = kang.copy()
    sclcm.tl.gene_network(adata, method="coexpression", groupby="condition", genes=genes,
                          top_k=None)
    rec = adata.uns["sclcm_network_coexpression"]
    cols = adata.var_names.get_indexer(genes)
    X = adata.X.toarray().astype(np.float64)
    y = np.log1p(X[:, cols] / X.sum(1, keepdims=True) * 1e4)
    cond = adata.obs["condition"].astype(str).to_numpy()
    for group in ("ctrl", "stim"):
        yg = y[cond == group]
        with np.errstate(invalid="ignore", divide="ignore"):
            want = np.corrcoef(yg, rowvar=False)
        got = rec["weights"][group].toarray()
        const = yg.std(0) == 0  # NumPy gives NaN there, the network no edge
        off = ~np.eye(len(genes), dtype=bool) & ~const[:, None] & ~const[None, :]
        # float32 storage of values in [-1, 1]
        np.testing.assert_allclose(got[off], want[off], atol=1e-6)
        assert (got[const] == 0).all()
        # the table lists the strongest correlations of each gene, strongest first
        table = rec["neighbours"].query("group == @group and gene == 'ISG15'")
        w = np.where(off, want, -np.inf)[0]
        assert table["neighbour"].iloc[0] == genes[int(np.argmax(w))]
        assert table["weight"].is_monotonic_decreasing


@pytest.mark.slow
def test_interferon_programme_and_difference():
    """On all 1,556 cells, the core interferon-stimulated genes are one co-expression
    programme in the stimulated cells and correlate more there; the difference table holds
    the pairs that change most."""
    adata = ad.read_h5ad(data_path(KANG_IFNB))
    frac = np.asarray((adata.X > 0).mean(0)).ravel()
    genes = list(adata.var_names[frac > 0.2])
    sclcm.tl.gene_network(adata, method="coexpression", groupby="condition", genes=genes,
                          top_k=None, compare=("ctrl", "stim"), n_changed=30)
    rec = adata.uns["sclcm_network_coexpression"]
    stim = rec["programmes"]["stim"]
    assert stim[ISGS].nunique() == 1
    assert (stim == stim["ISG15"]).sum() < 0.5 * len(genes)  # a programme, not everything
    idx = [genes.index(g) for g in ISGS]
    w = {g: rec["weights"][g].toarray() for g in ("ctrl", "stim")}
    pairs = np.triu_indices(len(ISGS), 1)
    isg = {g: w[g][np.ix_(idx, idx)][pairs].mean() for g in w}
    assert isg["stim"] > 2 * isg["ctrl"]  # measured 0.27 vs 0.10 over 1,205 genes
    diff = rec["difference"]
    change = w["stim"] - w["ctrl"]
    np.testing.assert_allclose(diff["change"], diff["weight_stim"] - diff["weight_ctrl"],
                               atol=1e-6)
    assert abs(diff["change"].iloc[0]) == pytest.approx(np.abs(change).max(), abs=1e-6)
    assert diff["change"].abs().is_monotonic_decreasing


@pytest.fixture(scope="module")
def networked(kang, genes, model):
    """The 120 cells with attention and the three networks, per condition."""
    adata = kang.copy()
    sclcm.tl.attention(adata, model, genes=genes, groupby="condition", top_k=10)
    for method in ("attention", "embedding", "coexpression"):
        sclcm.tl.gene_network(adata, method=method, model=model, groupby="condition",
                              genes=genes, n_neighbors=5, top_k=10, compare=("ctrl", "stim"),
                              n_changed=20)
    return adata


@pytest.mark.slow
def test_keys_complete_and_h5ad_roundtrip(networked, genes, tmp_path):
    adata = networked.copy()
    att = adata.uns["sclcm_attention"]
    assert set(att) == {"genes", "groups", "directed", "symmetric", "n_pairs", "n_cells",
                        "model", "params"}
    assert list(att["genes"]) == genes
    assert list(att["groups"]) == ["ctrl", "stim"]
    for g in ("ctrl", "stim"):
        d, s = att["directed"][g], att["symmetric"][g]
        assert (np.diff(d.indptr) <= 10).all()
        assert (d.diagonal() == 0).all()
        assert abs(s - s.T).max() == 0
        assert (att["n_pairs"][g].data >= 5).all()  # min_cells
    for method in ("attention", "embedding", "coexpression"):
        rec = adata.uns[f"sclcm_network_{method}"]
        assert set(rec) == {"genes", "groups", "weights", "graph", "programmes", "hubs",
                            "neighbours", "difference", "params"}
        assert rec["programmes"].shape == (len(genes), 2)
        # a gene's hub count is how often it is a neighbour in the table
        counts = rec["neighbours"].query("group == 'stim'")["neighbour"].value_counts()
        assert rec["hubs"]["stim"].to_dict() == counts.reindex(genes, fill_value=0).to_dict()
        assert len(rec["neighbours"]) <= 2 * 5 * len(genes)
        assert list(rec["difference"].columns) == ["gene_1", "gene_2", "weight_ctrl",
                                                   "weight_stim", "change"]
        assert rec["params"]["method"] == method
    path = tmp_path / "networks.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    for key in ("sclcm_attention", "sclcm_network_embedding"):
        a, b = adata.uns[key], back.uns[key]
        assert set(a) == set(b)
        m = "symmetric" if key == "sclcm_attention" else "weights"
        assert sparse.issparse(b[m]["stim"])
        np.testing.assert_array_equal(a[m]["stim"].toarray(), b[m]["stim"].toarray())
    assert back.uns["sclcm_network_embedding"]["programmes"].equals(
        adata.uns["sclcm_network_embedding"]["programmes"])


def _not_in_vocab(adata, model):
    report = sclcm.genes.resolve(adata, count_coverage=False)
    slot = model.tokenizer.column_map(adata, report=report).slot
    return adata.var_names[np.flatnonzero(slot < 0)[0]]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"layers": [4]}, r"layers=\[4\]: the model has 4 layers"),
    ({"layers": -5}, "the model has 4 layers"),
    ({"heads": [0, 4]}, "the model has 4 heads"),
    ({"groupby": "condition", "groups": ["stim", "unknown"]}, r"No cell has .*\['unknown'\]"),
    ({"groupby": "nope"}, "groupby 'nope' is not a column"),
    ({"genes": ["ISG15", "NOT_A_GENE"]}, "not in adata.var_names"),
    ({"genes": "VOCAB"}, "not in the model's vocabulary"),
    ({"top_k": 0}, "top_k must be a positive integer"),
], ids=["layer", "negative-layer", "head", "empty-group", "groupby", "var-names", "vocab",
        "top-k"])
def test_bad_input_leaves_adata_unchanged(kang, model, kwargs, match):
    adata = kang[::6].copy()
    if kwargs.get("genes") == "VOCAB":
        kwargs = {"genes": ["ISG15", _not_in_vocab(adata, model)]}
    before = snapshot(adata)
    with pytest.raises(sclcm.InputError, match=match):
        sclcm.tl.attention(adata, model, **kwargs)
    assert_unchanged(adata, before)


def test_gene_network_bad_input(kang, model):
    adata = kang[::6].copy()
    before = snapshot(adata)
    with pytest.raises(sclcm.InputError, match=r"run sclcm.tl.attention\(adata"):
        sclcm.tl.gene_network(adata)
    with pytest.raises(sclcm.InputError, match="method must be one of"):
        sclcm.tl.gene_network(adata, method="pearson")
    with pytest.raises(sclcm.InputError, match="compare= must name two different groups"):
        sclcm.tl.gene_network(adata, method="coexpression", groupby="condition",
                              genes=ISGS, compare=("ctrl", "IFN"))
    with pytest.raises(sclcm.InputError, match=r"No cell has .*\['IFN'\]"):
        sclcm.tl.gene_network(adata, method="embedding", model=model, groupby="condition",
                              groups=["IFN"])
    assert_unchanged(adata, before)
    bad = adata.copy()
    bad.X = bad.X.copy()
    bad.X.data[0] = -1
    before = snapshot(bad)
    with pytest.raises(sclcm.InputError, match="negative values"):
        sclcm.tl.gene_network(bad, method="coexpression", genes=ISGS)
    assert_unchanged(bad, before)


def test_top_edges_keeps_the_strongest():
    w = np.random.default_rng(0).normal(size=(30, 30))
    np.fill_diagonal(w, np.nan)
    m = top_edges(w, 4).toarray()
    assert (np.count_nonzero(m, axis=1) == 4).all()
    for i in range(30):
        assert set(np.flatnonzero(m[i])) == set(np.argsort(-np.nan_to_num(w[i],
                                                                          nan=-9))[:4])


@pytest.mark.slow
def test_plots(networked, tmp_path):
    import matplotlib.pyplot as plt

    rec = networked.uns["sclcm_network_embedding"]
    ax = sclcm.pl.gene_network(networked, "ISG15", key="sclcm_network_embedding",
                               group="stim", n_neighbors=6, show=False)
    labels = {t.get_text() for t in ax.texts}
    row = rec["weights"]["stim"].getrow(list(rec["genes"]).index("ISG15")).toarray().ravel()
    strongest = set(np.asarray(rec["genes"])[np.argsort(-row)[:6]])
    assert labels == strongest | {"ISG15"}
    with pytest.raises(ValueError, match="pass group= one of them"):
        sclcm.pl.gene_network(networked, "ISG15", key="sclcm_network_embedding")
    with pytest.raises(KeyError, match=r"run sclcm.tl.gene_network\(adata"):
        sclcm.pl.gene_network(networked, "ISG15", key="nothing")
    path = tmp_path / "heatmap.png"
    axes = sclcm.pl.attention(networked, ISGS, save=str(path), show=False)
    assert path.stat().st_size > 0
    assert [a.get_title() for a in axes] == ["ctrl", "stim"]
    shown = axes[1].images[0].get_array()
    att = networked.uns["sclcm_attention"]["directed"]["stim"].toarray()
    idx = [list(networked.uns["sclcm_attention"]["genes"]).index(g) for g in ISGS]
    want = att[np.ix_(idx, idx)]
    np.testing.assert_allclose(np.ma.filled(shown, 0), want, rtol=1e-6)
    plt.close("all")


def test_copy_returns_a_new_object(kang, model):
    adata = kang[::6].copy()
    before = snapshot(adata)
    out = sclcm.tl.attention(adata, model, genes=ISGS, copy=True)
    assert_unchanged(adata, before)
    assert set(out.uns["sclcm_attention"]["groups"]) == {"all"}
    net = sclcm.tl.gene_network(out, method="coexpression", genes=ISGS, copy=True)
    assert "sclcm_network_coexpression" in net.uns
    assert "sclcm_network_coexpression" not in out.uns
