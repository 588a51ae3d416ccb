"""The four tokenizers: hand-computed examples and invariants on real cells.

Each family is checked against a per-cell reference written here the plain way (a loop
over cells with numpy), on real pbmc3k and Kang cells.
"""

from __future__ import annotations

from fractions import Fraction

import anndata as ad
import numpy as np
import pytest
from conftest import KANG_CTRL, PBMC3K, data_path
from scipy import sparse

import sclcm
from sclcm.genes import GeneVocab, resolve
from sclcm.tokenizers import (
    ColumnMap,
    GeneformerTokenizer,
    ScBERTTokenizer,
    ScFoundationTokenizer,
    ScGPTTokenizer,
    TokenBatch,
    downsample_counts,
    load_tokenizer,
)
from sclcm.tokenizers._kernels import uniform

N_CELLS = 300


# --- hand-computed examples ---------------------------------------------------------
def cmap(n):
    return ColumnMap.from_token_ids(np.arange(4, 4 + n))


VOCAB5 = GeneVocab(["g0", "g1", "g2", "g3", "g4"])  # ids 4..8


def test_geneformer_hand_example_ties_truncation_v1():
    medians = np.array([1.0, 2.0, 1.0, 0.5, np.nan])  # g4 has no median: never a token
    X = sparse.csr_matrix(np.array([[10, 20, 10, 0, 50],   # total 90: g0=g1=g2 after median
                                    [0, 0, 0, 3, 1]]))
    tok = GeneformerTokenizer(VOCAB5, medians)
    b = tok.encode(X, cmap(5))
    # cell 0: g0, g1, g2 tie (10/90e4/1 = 20/90e4/2) -> token id order; g4 dropped
    assert b.cell(0)[0].tolist() == [2, 4, 5, 6, 3]
    assert b.cell(1)[0].tolist() == [2, 7, 3]
    np.testing.assert_allclose(b.cell(1)[1], [0, 3 / 4 * 1e4 / 0.5, 0], rtol=1e-6)
    short = GeneformerTokenizer(VOCAB5, medians, max_len=4).encode(X, cmap(5))
    assert short.cell(0)[0].tolist() == [2, 4, 5, 3]  # truncated to max_len - 2 genes
    v1 = GeneformerTokenizer.v1(VOCAB5, medians).encode(X, cmap(5))
    assert v1.cell(0)[0].tolist() == [4, 5, 6]
    assert v1.lengths.tolist() == [3, 1]


def test_scgpt_hand_example_bins_and_ties():
    # 6 non-zero values with n_bins=4: edges = quantiles at 0, .5, 1 = 1, 3.5, 9
    X = sparse.csr_matrix(np.array([[1, 2, 3, 4, 8, 9, 0]], dtype=np.float32))
    vocab = GeneVocab([f"g{i}" for i in range(7)])
    tok = ScGPTTokenizer(vocab, n_bins=4)
    b = tok.encode(X, ColumnMap.from_token_ids(np.arange(4, 11)))
    # digitize: 1 sits on edge 1 (bins 0|1 -> random in {1}), 2,3 -> 1; 4,8 -> 2; 9 on the
    # last edge -> 3
    assert b.gene_ids.tolist() == [2, 4, 5, 6, 7, 8, 9]
    assert b.values.tolist() == [0, 1, 1, 1, 2, 2, 3]
    zeros = ScGPTTokenizer(vocab, n_bins=4, include_zero_genes=True).encode(
        X, ColumnMap.from_token_ids(np.arange(4, 11)))
    assert zeros.gene_ids.tolist() == [2, 4, 5, 6, 7, 8, 9, 10]
    assert zeros.values[-1] == 0


def test_scgpt_tie_on_an_edge_is_random_between_the_two_bins():
    # all values equal: every edge equals the value; left = n_bins-1, right = 0 -> 1..n-1
    X = sparse.csr_matrix(np.full((200, 1), 5.0, dtype=np.float32))
    tok = ScGPTTokenizer(GeneVocab(["g"]), n_bins=5, seed=3)
    bins = tok.encode(X, ColumnMap.from_token_ids(np.array([4]))).values[1::2]
    assert set(bins.tolist()) == {1.0, 2.0, 3.0, 4.0}


def test_scbert_and_scfoundation_hand_examples():
    X = sparse.csr_matrix(np.array([[0, 30, 70, 0, 0]]))  # total 100
    b = ScBERTTokenizer(VOCAB5).encode(X, cmap(5))
    # log2(1 + 3000) = 11.55 -> 5; log2(1 + 7000) = 12.8 -> 5
    assert b.gene_ids.tolist() == [4, 5, 6, 7, 8]
    assert b.values.tolist() == [0, 5, 5, 0, 0]
    X = sparse.csr_matrix(np.array([[0, 1, 0, 0, 9999]]))
    # 1 of 10,000 counts normalizes to 1: log2(1 + 1) = 1
    assert ScBERTTokenizer(VOCAB5).encode(X, cmap(5)).values.tolist() == [0, 1, 0, 0, 5]
    X = sparse.csr_matrix(np.array([[1, 0, 3, 0, 6]]))  # total 10
    f = ScFoundationTokenizer(VOCAB5, depth_fold=10).encode(X, cmap(5))
    assert f.gene_ids.tolist() == [4, 6, 8]
    np.testing.assert_allclose(f.values, np.log1p([1000, 3000, 6000]), rtol=1e-6)
    assert f.extras["depth_S"].tolist() == [1.0]
    assert f.extras["depth_T"].tolist() == [2.0]


def test_duplicated_columns_are_summed():
    X = sparse.csr_matrix(np.array([[3, 4, 1]]))
    m = ColumnMap.from_token_ids(np.array([5, 5, 4]))  # two columns are one gene
    b = ScFoundationTokenizer(VOCAB5).encode(X, m)
    np.testing.assert_allclose(b.values, np.log1p(np.array([1, 7]) / 8 * 1e4), rtol=1e-6)


def test_empty_cells_dropped_or_kept():
    X = sparse.csr_matrix(np.array([[1, 0], [0, 0], [0, 7]]))
    m = ColumnMap.from_token_ids(np.array([4, -1]))  # second column not in the vocabulary
    tok = ScGPTTokenizer(VOCAB5)
    dropped = tok.encode(X, m)
    assert dropped.cell_index.tolist() == [0]
    kept = tok.encode(X, m, keep_empty=True)
    assert kept.cell_index.tolist() == [0, 1, 2]
    assert kept.cell(2)[0].tolist() == [VOCAB5.cls_id]


# --- real cells ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def pbmc():
    adata = ad.read_h5ad(data_path(PBMC3K))[:N_CELLS].copy()
    return adata, resolve(adata)


@pytest.fixture(scope="module")
def vocab():
    return GeneVocab.from_reference("human")


@pytest.fixture(scope="module")
def geneformer(pbmc, vocab):
    adata, report = pbmc
    return GeneformerTokenizer(vocab).fit(adata, report=report)


def dense_over_vocab(adata, report, vocab):
    """Cells x vocabulary genes (summed duplicates), and totals over all genes."""
    ids = vocab.lookup(adata, report=report)
    X = sparse.csr_matrix(adata.X, dtype=np.float64)
    cols = np.flatnonzero(ids >= 0)
    M = sparse.csr_matrix((np.ones(len(cols)), (cols, ids[cols])),
                          shape=(adata.n_vars, len(vocab)))
    return (X @ M).toarray(), np.asarray(X.sum(axis=1)).ravel()


def test_geneformer_rank_order_equals_normalized_order(pbmc, vocab, geneformer):
    adata, report = pbmc
    batch = sclcm.pp.tokenize(adata, geneformer, report=report)
    counts, totals = dense_over_vocab(adata, report, vocab)
    inv = geneformer._inverse_medians()
    for i in range(0, N_CELLS, 7):
        norm = (counts[i].astype(np.float32) * np.float32(1e4 / totals[i])) * inv
        genes = np.flatnonzero(norm > 0)
        expected = genes[np.lexsort((genes, -norm[genes]))][:4094]
        ids, vals = batch.cell(i)
        assert ids[0] == vocab.cls_id
        assert ids[-1] == vocab.eos_id
        np.testing.assert_array_equal(ids[1:-1], expected)
        np.testing.assert_allclose(vals[1:-1], norm[expected], rtol=1e-6)
        assert (np.diff(vals[1:-1]) <= 0).all()


def test_geneformer_truncation_keeps_the_top_genes(pbmc, geneformer):
    adata, report = pbmc
    full = sclcm.pp.tokenize(adata, geneformer, report=report)
    short_tok = GeneformerTokenizer(geneformer.vocab, geneformer.medians, max_len=64)
    short = sclcm.pp.tokenize(adata, short_tok, report=report)
    assert short.lengths.max() == 64
    for i in (0, 100, 299):
        np.testing.assert_array_equal(short.cell(i)[0][1:-1], full.cell(i)[0][1:63])


def test_geneformer_medians_exact_and_streaming(pbmc, vocab, geneformer):
    adata, report = pbmc
    counts, totals = dense_over_vocab(adata, report, vocab)
    norm = (counts.astype(np.float32) * (np.float32(1e4) / totals[:, None]).astype(np.float32))
    n_special = len(vocab.special_tokens)
    for token in np.flatnonzero((counts > 0).sum(axis=0) > 3)[:50]:
        col = norm[:, token]
        assert geneformer.medians[token - n_special] == pytest.approx(
            np.median(col[col > 0]), rel=1e-6)
    approx = GeneformerTokenizer(vocab).fit(adata, report=report, method="histogram")
    ok = np.isfinite(geneformer.medians)
    assert np.array_equal(ok, np.isfinite(approx.medians))
    rel = np.abs(approx.medians[ok] / geneformer.medians[ok] - 1)
    # documented bound: within one log-spaced bin of the exact median (0.9% each side,
    # and the two middle values of an even count may straddle a bin)
    assert np.quantile(rel, 0.99) < 0.02
    assert np.median(rel) < 0.01


def test_geneformer_fit_from_a_stream_of_blocks(pbmc, vocab, geneformer):
    adata, _ = pbmc
    tok = GeneformerTokenizer(vocab)
    # two sources whose columns differ (the second has them reversed): each block comes
    # with its own column map onto the one vocabulary
    first = adata[:150].copy()
    second = adata[150:, ::-1].copy()
    blocks = []
    for part in (first, second):
        cmap = tok.column_map(part)
        blocks += [(part.X[i:i + 64], cmap) for i in range(0, part.n_obs, 64)]
    tok.fit_blocks(blocks, method="exact")
    np.testing.assert_allclose(tok.medians, geneformer.medians, rtol=1e-6)


def test_scgpt_zero_genes_on_real_cells(pbmc, vocab):
    adata, report = pbmc
    tok = ScGPTTokenizer(vocab, include_zero_genes=True, max_len=100_000)
    b = sclcm.pp.tokenize(adata[:20], tok, report=report)
    n_genes = len(tok.column_map(adata, report=report).token_ids)
    assert (b.lengths == n_genes + 1).all()  # every gene of the data, and <cls>
    counts, _ = dense_over_vocab(adata[:20], report, vocab)
    ids, vals = b.cell(5)
    np.testing.assert_array_equal(vals[1:] == 0, counts[5, ids[1:]] == 0)


def scgpt_reference(values, n_bins, u, *, exact):
    """scGPT's binning of one cell's non-zero values, written the plain way.

    ``exact``: quantile edges in rational arithmetic (the definition); otherwise
    ``np.quantile`` in floating point, as scGPT computes them.
    """
    if exact:
        s, n, D = sorted(Fraction(float(v)) for v in values), len(values), n_bins - 2
        edges = []
        for k in range(n_bins - 1):
            lo, rem = divmod(k * (n - 1), D)
            hi = min(lo + 1, n - 1)
            edges.append(s[lo] + (s[hi] - s[lo]) * Fraction(rem, D))
        vals = [Fraction(float(v)) for v in values]
        left = np.array([sum(e <= v for e in edges) for v in vals])
        right = np.array([sum(e < v for e in edges) for v in vals])
    else:
        edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
        left = np.digitize(values, edges)
        right = np.digitize(values, edges, right=True)
    return np.ceil(u * (right - left) + left)


@pytest.mark.parametrize("n_bins", [51, 11])
def test_scgpt_bins_equal_the_reference(pbmc, vocab, n_bins):
    adata, report = pbmc
    tok = ScGPTTokenizer(vocab, n_bins=n_bins, max_len=10_000, seed=7)
    batch = sclcm.pp.tokenize(adata, tok, report=report)
    counts, totals = dense_over_vocab(adata, report, vocab)
    agree = total = 0
    for i in range(0, N_CELLS, 23):
        genes = np.flatnonzero(counts[i])
        u = uniform(tok.seed * 2, np.full(len(genes), i), genes)
        ids, vals = batch.cell(i)
        assert ids[0] == vocab.cls_id
        assert vals[0] == 0
        np.testing.assert_array_equal(ids[1:], genes)
        # exactly the bins of the definition, on counts ...
        np.testing.assert_array_equal(vals[1:], scgpt_reference(counts[i, genes], n_bins, u,
                                                                exact=True))
        # ... which per-cell monotone transforms leave unchanged: scGPT's own binning of
        # log1p(normalized) values in floating point agrees but for rounding at edges
        logn = np.log1p(counts[i, genes] / totals[i] * 1e4).astype(np.float32)
        agree += (vals[1:] == scgpt_reference(logn, n_bins, u, exact=False)).sum()
        total += len(genes)
        assert vals[1:].min() >= 1
        assert vals[1:].max() == n_bins - 1
    assert agree / total > 0.999


def test_scgpt_subsampling_seed_and_block_size(pbmc, vocab):
    adata, report = pbmc
    tok = ScGPTTokenizer(vocab, max_len=200, seed=1)
    a = sclcm.pp.tokenize(adata, tok, report=report, block_size=64)
    b = sclcm.pp.tokenize(adata, tok, report=report, block_size=1000)
    assert_same(a, b)  # counter-based randomness: independent of how cells are blocked
    assert a.lengths.max() == 200
    full = sclcm.pp.tokenize(adata, ScGPTTokenizer(vocab, max_len=10_000, seed=1),
                             report=report)
    for i in (0, 50, 299):
        ids, vals = a.cell(i)
        fids, fvals = full.cell(i)
        assert (np.diff(ids[1:]) > 0).all()  # vocabulary order kept
        assert np.isin(ids, fids).all()
        # a subsampled gene keeps the bin it has among all the cell's genes
        np.testing.assert_array_equal(vals, fvals[np.isin(fids, ids)])
    other = sclcm.pp.tokenize(adata, ScGPTTokenizer(vocab, max_len=200, seed=2),
                              report=report)
    assert not np.array_equal(a.gene_ids, other.gene_ids)


def test_scgpt_continuous_values(pbmc, vocab):
    adata, report = pbmc
    b = sclcm.pp.tokenize(adata[:20], ScGPTTokenizer(vocab, binned=False), report=report)
    counts, totals = dense_over_vocab(adata[:20], report, vocab)
    genes = np.flatnonzero(counts[3])
    np.testing.assert_allclose(b.cell(3)[1][1:], np.log1p(counts[3, genes] / totals[3] * 1e4),
                               rtol=1e-5)


def test_scbert_levels(pbmc):
    adata, report = pbmc
    panel = GeneVocab.from_reference("human", biotypes=["protein_coding"])
    tok = ScBERTTokenizer(panel)
    b = sclcm.pp.tokenize(adata[:30], tok, report=report)
    assert (b.lengths == panel.n_genes).all()
    counts, totals = dense_over_vocab(adata[:30], report, panel)
    expected = np.minimum(np.floor(np.log2(1 + (counts[:, 4:].astype(np.float32) * (
        np.float32(1e4) / totals[:, None]).astype(np.float32)))), 5)
    np.testing.assert_array_equal(b.values.reshape(30, -1), expected)
    assert set(np.unique(b.values)) <= {0, 1, 2, 3, 4, 5}


def test_scfoundation_values_and_depth(pbmc, vocab):
    adata, report = pbmc
    b = sclcm.pp.tokenize(adata, ScFoundationTokenizer(vocab), report=report)
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    np.testing.assert_allclose(b.extras["depth_S"], np.log10(totals), rtol=1e-6)
    np.testing.assert_array_equal(b.extras["depth_T"], b.extras["depth_S"])
    thin = downsample_counts(adata.X, 0.25, seed=0)
    assert thin.sum() == pytest.approx(adata.X.sum() * 0.25, rel=0.01)
    tok = ScFoundationTokenizer(vocab)
    m = tok.column_map(adata, report=report)
    aug = tok.encode(thin, m, target_totals=totals)
    np.testing.assert_allclose(aug.extras["depth_T"], np.log10(totals), rtol=1e-6)
    assert (aug.extras["depth_S"] < aug.extras["depth_T"]).all()


# --- the compiled kernels against plain NumPy, on every cell -------------------------
@pytest.mark.parametrize(("max_len", "special_tokens"), [(4096, True), (300, False)])
def test_geneformer_equals_numpy_on_every_cell(pbmc, vocab, geneformer, max_len,
                                               special_tokens):
    adata, report = pbmc
    tok = GeneformerTokenizer(vocab, geneformer.medians, max_len=max_len,
                              special_tokens=special_tokens)
    batch = sclcm.pp.tokenize(adata, tok, report=report, block_size=128)
    counts, totals = dense_over_vocab(adata, report, vocab)  # duplicated genes summed
    inv = tok._inverse_medians()
    n_keep = max_len - 2 * special_tokens
    for i in range(N_CELLS):
        # as documented: float32 counts x (10,000 / total) x 1 / median, ties by token id
        norm = (counts[i].astype(np.float32) * np.float32(1e4 / totals[i])) * inv
        genes = np.flatnonzero(norm > 0)
        expected = genes[np.lexsort((genes, -norm[genes]))][:n_keep]
        ids, vals = batch.cell(i)
        if special_tokens:
            assert ids[0] == vocab.cls_id
            assert ids[-1] == vocab.eos_id
            ids, vals = ids[1:-1], vals[1:-1]
        np.testing.assert_array_equal(ids, expected)
        np.testing.assert_array_equal(vals, norm[expected])


def test_geneformer_many_ties_in_any_column_order():
    # 400 genes with one median and counts 1 or 2: long runs of equal values whose
    # columns come in descending token order, the worst case of the sort's tie pass
    n = 400
    vocab = GeneVocab([f"g{i}" for i in range(n)])
    rng = np.random.default_rng(0)
    X = sparse.csr_matrix(np.vstack([np.ones(n), 1 + np.arange(n) % 2,
                                     rng.integers(0, 3, n)]).astype(np.float32))
    ids = np.arange(4 + n - 1, 3, -1)  # column j is token 4 + n - 1 - j
    batch = GeneformerTokenizer(vocab, np.ones(n), special_tokens=False).encode(
        X, ColumnMap.from_token_ids(ids))
    for i in range(3):
        tokens, values = ids[X[i].indices], X[i].data
        order = np.lexsort((tokens, -values))
        np.testing.assert_array_equal(batch.cell(i)[0], tokens[order])


def scgpt_bins(values, n_bins, u):
    """scGPT's bins of one cell's non-zero integer values, with NumPy's sort and search."""
    s, n, D = np.sort(values).astype(np.int64), len(values), n_bins - 2
    lo, rem = np.divmod(np.arange(n_bins - 1) * (n - 1), D)
    edges = s[lo] * D + (s[np.minimum(lo + 1, n - 1)] - s[lo]) * rem  # x D, exact
    x = values.astype(np.int64) * D
    left = np.searchsorted(edges, x, side="right")  # edges <= value
    right = np.searchsorted(edges, x, side="left")  # edges < value
    return left - np.floor(u * (left - right))


@pytest.mark.parametrize("scale", [1, 2**20, None])
def test_scgpt_bins_equal_numpy_on_every_cell(pbmc, vocab, scale):
    adata, report = pbmc
    unique = report.collapse(adata)  # no duplicated genes: scaling commutes
    counts = unique.X.toarray()
    other = unique.copy()
    # large integers (exact in float32) and log values have the bins of the counts, as
    # bins follow the order; they take the kernel's radix path, the counts its counting
    other.X = sparse.csr_matrix(np.log1p(counts) if scale is None else counts * scale)
    tok = ScGPTTokenizer(vocab, max_len=10_000, seed=5)
    batch = sclcm.pp.tokenize(other, tok)
    token_of = vocab.lookup(unique)
    for i in range(N_CELLS):
        cols = np.flatnonzero(counts[i] * (token_of >= 0))
        cols = cols[np.argsort(token_of[cols])]
        u = uniform(tok.seed * 2, np.full(len(cols), i), token_of[cols])
        ids, vals = batch.cell(i)
        np.testing.assert_array_equal(ids[1:], token_of[cols])
        np.testing.assert_array_equal(vals[1:], scgpt_bins(counts[i, cols], 51, u))


@pytest.mark.parametrize("include_zero_genes", [False, True])
def test_scgpt_subsampling_equals_numpy(pbmc, vocab, include_zero_genes):
    adata, report = pbmc
    n_cells = 20 if include_zero_genes else N_CELLS
    tok = ScGPTTokenizer(vocab, max_len=150, seed=3, include_zero_genes=include_zero_genes)
    full = ScGPTTokenizer(vocab, max_len=100_000, seed=3,
                          include_zero_genes=include_zero_genes)
    batch = sclcm.pp.tokenize(adata[:n_cells], tok, report=report)
    every = sclcm.pp.tokenize(adata[:n_cells], full, report=report)
    for i in range(n_cells):
        ids, vals = every.cell(i)
        ids, vals = ids[1:], vals[1:]
        if len(ids) > 149:
            # the 149 smallest float32 draws, ties by token id; kept in vocabulary order
            u = uniform(tok.seed * 2 + 1, np.full(len(ids), i), ids).astype(np.float32)
            keep = np.sort(np.lexsort((ids, u))[:149])
            ids, vals = ids[keep], vals[keep]
        np.testing.assert_array_equal(batch.cell(i)[0][1:], ids)
        np.testing.assert_array_equal(batch.cell(i)[1][1:], vals)


def test_kernel_constants_match_the_modules():
    from sclcm.tokenizers import _base, _compiled, _kernels

    assert _compiled.TARGET_SUM == _base.TARGET_SUM
    assert _compiled.SLOT_BITS == _kernels.SLOT_BITS


@pytest.mark.parametrize(("value", "match"), [(np.nan, "NaN or infinite"),
                                              (np.inf, "NaN or infinite"),
                                              (-1.0, "negative"), (0.5, "raw counts")])
def test_bad_values_are_clear_errors(value, match):
    X = np.ones((3, 5), dtype=np.float32)
    X[1, 2] = value
    m = cmap(5)
    toks = [GeneformerTokenizer(VOCAB5, np.ones(5)), ScFoundationTokenizer(VOCAB5),
            ScBERTTokenizer(VOCAB5), ScGPTTokenizer(VOCAB5, binned=False),
            ScGPTTokenizer(VOCAB5)]
    for tok in toks:
        if value == 0.5 and tok.name == "scgpt" and tok.binned:
            tok.encode(X, m)  # bins need only the order: normalized input is fine
            continue
        with pytest.raises(sclcm.InputError, match=match):
            tok.encode(X, m)
    X[0, 0] = -1.0  # reported in order NaN, non-integer, negative, wherever they are
    if match != "negative":
        with pytest.raises(sclcm.InputError, match=match):
            GeneformerTokenizer(VOCAB5, np.ones(5)).encode(X, m)


# --- same output for any input form ---------------------------------------------------
def assert_same(a: TokenBatch, b: TokenBatch) -> None:
    np.testing.assert_array_equal(a.gene_ids, b.gene_ids)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.cell_index, b.cell_index)
    assert set(a.extras) == set(b.extras)
    for k in a.extras:
        np.testing.assert_array_equal(a.extras[k], b.extras[k])


def tokenizers(vocab, geneformer):
    panel = GeneVocab.from_reference("human", biotypes=["protein_coding"])
    return [geneformer, ScGPTTokenizer(vocab, max_len=500), ScBERTTokenizer(panel),
            ScFoundationTokenizer(vocab)]


@pytest.mark.parametrize("form", ["dense", "csc", "float64", "int32", "backed"])
def test_identical_output_for_every_input_form(pbmc, vocab, geneformer, form, tmp_path):
    adata, report = pbmc
    adata = adata[:60].copy()
    other = adata.copy()
    if form == "dense":
        other.X = adata.X.toarray()
    elif form == "csc":
        other.X = sparse.csc_matrix(adata.X)
    elif form in ("float64", "int32"):
        other.X = adata.X.astype(form)
    else:
        adata.write_h5ad(tmp_path / "x.h5ad")
        other = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    for tok in tokenizers(vocab, geneformer):
        assert_same(sclcm.pp.tokenize(adata, tok, report=report, block_size=25),
                    sclcm.pp.tokenize(other, tok, report=report, block_size=25))


def test_tokenize_leaves_adata_unchanged_and_rejects_normalized(pbmc, vocab, geneformer):
    adata, report = pbmc
    adata = adata[:40].copy()
    before = adata.X.copy()
    sclcm.pp.tokenize(adata, geneformer, report=report)
    assert (before != adata.X).nnz == 0
    norm = adata.copy()
    norm.X = sparse.csr_matrix(np.log1p(norm.X.toarray()))
    with pytest.raises(sclcm.InputError, match="raw counts"):
        sclcm.pp.tokenize(norm, geneformer, report=report)
    # scGPT's bins do not change under per-cell monotone transforms: accepted, same tokens
    # (on unique genes: summing duplicated columns after log1p is not log1p of the sum)
    unique = resolve(adata).collapse(adata)
    logged = unique.copy()
    logged.X = sparse.csr_matrix(np.log1p(unique.X.toarray()))
    tok = ScGPTTokenizer(vocab)
    assert_same(sclcm.pp.tokenize(unique, tok), sclcm.pp.tokenize(logged, tok))


def test_no_vocabulary_overlap_is_a_clear_error(vocab):
    adata = ad.AnnData(np.ones((2, 2), dtype=np.float32))
    adata.var_names = ["Actb", "Gapdh"]
    mouse_vocab = GeneVocab(["ENSMUSG00000000001"], species="mouse")
    with pytest.raises(sclcm.InputError, match="vocabulary"):
        ScGPTTokenizer(mouse_vocab).column_map(adata)


def test_unfitted_geneformer(vocab):
    with pytest.raises(ValueError, match=r"call \.fit"):
        GeneformerTokenizer(vocab).encode(sparse.csr_matrix(np.ones((1, 1))),
                                          ColumnMap.from_token_ids(np.array([10])))


# --- state and corpus on disk -------------------------------------------------------
def test_save_load_round_trip(pbmc, vocab, geneformer, tmp_path):
    adata, report = pbmc
    for tok in tokenizers(vocab, geneformer):
        path = tmp_path / tok.name
        tok.save(path)
        assert not list(path.glob("*.pkl"))
        again = load_tokenizer(path)
        assert type(again) is type(tok)
        assert again.to_dict() == tok.to_dict()
        assert_same(sclcm.pp.tokenize(adata[:30], tok, report=report),
                    sclcm.pp.tokenize(adata[:30], again, report=report))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a sclcm tokenizer"):
        load_tokenizer(tmp_path / "bad")


def test_corpus_on_disk_equals_in_memory(pbmc, geneformer, tmp_path):
    adata, report = pbmc
    memory = sclcm.pp.tokenize(adata, geneformer, report=report)
    corpus = sclcm.pp.tokenize(adata, geneformer, report=report, out=tmp_path / "c",
                               block_size=70)
    assert len(corpus) == memory.n_cells
    assert_same(corpus[:], memory)
    assert_same(corpus[[5, 2, 299]], memory.select([5, 2, 299]))
    assert_same(TokenBatch.concat(list(corpus.iter_batches(128))), memory)
    assert isinstance(corpus.arrays["gene_ids"], np.memmap)
    assert corpus.tokenizer.to_dict() == geneformer.to_dict()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sclcm.pp.tokenize(adata, geneformer, report=report, out=tmp_path / "c")


def test_kang_ensembl_input(load, vocab):
    adata = load(KANG_CTRL)[:200].copy()
    tok = GeneformerTokenizer(vocab).fit(adata)
    b = sclcm.pp.tokenize(adata, tok)
    assert b.n_cells == 200
    assert (b.gene_ids[b.offsets[:-1]] == vocab.cls_id).all()
