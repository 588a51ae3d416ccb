"""sclcm.tl.perturb: token edits (by hand and on real cells), scores against a per-copy loop,
outputs, statistics, errors, and the plot."""

from __future__ import annotations

import math
from functools import cache

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PBMC3K, _load, assert_unchanged, snapshot
from scipy import sparse

import sclcm
from sclcm.genes import GeneVocab, resolve
from sclcm.models import CellModel, ModelConfig
from sclcm.tl._perturb._edit import CellIndex, Encoding, build, plan_all, plan_listed
from sclcm.tokenizers import (
    ColumnMap,
    GeneformerTokenizer,
    ScBERTTokenizer,
    ScFoundationTokenizer,
    ScGPTTokenizer,
    TokenBatch,
)

FAMILIES = ["geneformer", "scgpt", "scbert", "scfoundation"]
MODES = ["delete", "overexpress", "inhibit", "activate"]
N_CELLS, MAX_LEN = 30, 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- helpers -------------------------------------------------------------------------------
def edit(batch: TokenBatch, tok, genes: list[list[int]], mode: str, *, shift: float = 0.25,
         max_position: int = 0) -> dict[tuple[int, int], tuple[list, list]]:
    """Vectorized edits of ``batch``: ``{(cell, perturbation): (ids, values)}``."""
    enc = Encoding.of(tok, max_position=max_position)
    index = CellIndex(batch, enc, len(tok.vocab))
    offsets = np.r_[0, np.cumsum([len(g) for g in genes])].astype(np.int64)
    ids = np.concatenate([np.asarray(g, dtype=np.int64) for g in genes])
    cells = np.flatnonzero(index.n_expressed > 0)
    edits, _ = plan_listed(index, ids, offsets, mode, cells)
    out, _, _ = build(index, edits, np.arange(edits.n_copies), mode, shift)
    return {(int(c), int(p)): (i.tolist(), v.tolist()) for c, p, (i, v) in zip(
        edits.copy_cell, edits.copy_pert, (out.cell(k) for k in range(out.n_cells)),
        strict=True)}


def one_cell(tok, counts: list[int]) -> TokenBatch:
    n_special = len(tok.vocab.special_tokens)
    ids = np.arange(n_special, n_special + len(counts))
    return tok.encode(sparse.csr_matrix(np.array([counts])), ColumnMap.from_token_ids(ids))


def _vocab(n: int) -> GeneVocab:
    return GeneVocab([f"g{i}" for i in range(1, n + 1)])  # g1 = token 4, g2 = 5, ...


# --- token edits by hand -------------------------------------------------------------------
# Geneformer: g1..g6 are tokens 4..9; counts 40, 30, 0, 20, 10, 0 of 100 rank g1 g2 g4 g5
# (values 4000, 3000, 2000, 1000) between <cls> (2) and <eos> (3).
GF = [40, 30, 0, 20, 10, 0]
GF_CASES = [
    ("delete", [[5]], 0.25, [2, 4, 7, 8, 3], [0, 4000, 2000, 1000, 0]),
    ("delete", [[4, 5]], 0.25, [2, 7, 8, 3], [0, 2000, 1000, 0]),
    ("overexpress", [[7]], 0.25, [2, 7, 4, 5, 8, 3], [0, 4000, 4000, 3000, 1000, 0]),
    ("overexpress", [[6]], 0.25, [2, 6, 4, 5, 7, 8, 3], [0, 4000, 4000, 3000, 2000, 1000, 0]),
    ("overexpress", [[8, 6]], 0.25, [2, 8, 6, 4, 5, 7, 3],  # listed order on top
     [0, 4000, 4000, 4000, 3000, 2000, 0]),
    ("inhibit", [[4]], 0.5, [2, 5, 7, 4, 8, 3], [0, 3000, 2000, 2000, 1000, 0]),
    ("inhibit", [[8]], 0.25, [2, 4, 5, 7, 8, 3], [0, 4000, 3000, 2000, 1000, 0]),  # last
    ("activate", [[8]], 0.25, [2, 4, 5, 8, 7, 3], [0, 4000, 3000, 2000, 2000, 0]),
    ("activate", [[8]], 1.0, [2, 8, 4, 5, 7, 3], [0, 4000, 3000, 2000, 4000, 0][:0] or
     [0, 4000, 4000, 3000, 2000, 0]),
    # together: g1 and g2 both one rank down take ranks 1 and 2; g4 moves up to rank 0
    ("inhibit", [[4, 5]], 0.25, [2, 7, 4, 5, 8, 3], [0, 2000, 3000, 2000, 1000, 0]),
    # g4 and g5 both aim past the end: they keep the last two ranks, in their order
    ("inhibit", [[7, 8]], 0.5, [2, 4, 5, 7, 8, 3], [0, 4000, 3000, 1000, 1000, 0]),
]


@pytest.mark.parametrize(("mode", "genes", "shift", "ids", "values"), GF_CASES)
def test_geneformer_edits_by_hand(mode, genes, shift, ids, values):
    tok = GeneformerTokenizer(_vocab(6), medians=np.ones(6))
    batch = one_cell(tok, GF)
    assert batch.gene_ids.tolist() == [2, 4, 5, 7, 8, 3]
    assert edit(batch, tok, genes, mode, shift=shift) == {(0, 0): (ids, values)}


def test_geneformer_unexpressed_and_full_cells():
    tok = GeneformerTokenizer(_vocab(6), medians=np.ones(6))
    batch = one_cell(tok, GF)
    for mode in ("delete", "inhibit", "activate"):  # g3 is not expressed: no copy
        assert edit(batch, tok, [[6]], mode) == {}
    # a full cell (max_len 6) loses its last gene when one is inserted
    full = GeneformerTokenizer(_vocab(6), medians=np.ones(6), max_len=6)
    assert edit(one_cell(full, GF), full, [[6]], "overexpress") == {
        (0, 0): ([2, 6, 4, 5, 7, 3], [0, 4000, 4000, 3000, 2000, 0])}
    # the model's positions cap the length the same way
    assert edit(batch, tok, [[6]], "overexpress", max_position=6)[0, 0][0] == \
        [2, 6, 4, 5, 7, 3]


# scGPT (5 bins): a..e are tokens 4..8, counts 0 1 2 3 4 give bins 1..4 of b..e after <cls>.
SCGPT_CASES = [
    ("delete", [[6]], [2, 5, 7, 8], [0, 1, 3, 4]),
    ("overexpress", [[5]], [2, 5, 6, 7, 8], [0, 4, 2, 3, 4]),
    ("overexpress", [[4]], [2, 4, 5, 6, 7, 8], [0, 4, 1, 2, 3, 4]),  # inserted in id order
    ("inhibit", [[8]], [2, 5, 6, 7, 8], [0, 1, 2, 3, 3]),  # rank 0 -> 1 (of 4): bin 3
    ("activate", [[5]], [2, 5, 6, 7, 8], [0, 2, 2, 3, 4]),  # rank 3 -> 2: bin 2
    ("delete", [[5, 8]], [2, 6, 7], [0, 2, 3]),
]


@pytest.mark.parametrize(("mode", "genes", "ids", "values"), SCGPT_CASES)
def test_scgpt_edits_by_hand(mode, genes, ids, values):
    tok = ScGPTTokenizer(_vocab(5), n_bins=5)
    batch = one_cell(tok, [0, 1, 2, 3, 4])
    assert (batch.gene_ids.tolist(), batch.values.tolist()) == ([2, 5, 6, 7, 8],
                                                                [0, 1, 2, 3, 4])
    assert edit(batch, tok, genes, mode) == {(0, 0): (ids, values)}


def test_zero_valued_genes_are_unexpressed():
    """scGPT with include_zero_genes and scBERT's panel: delete sets 0, a 0 is skipped."""
    tok = ScGPTTokenizer(_vocab(5), n_bins=5, include_zero_genes=True)
    batch = one_cell(tok, [0, 1, 2, 3, 4])
    assert batch.values.tolist() == [0, 0, 1, 2, 3, 4]
    assert edit(batch, tok, [[6]], "delete") == {(0, 0): ([2, 4, 5, 6, 7, 8],
                                                          [0, 0, 1, 0, 3, 4])}
    assert edit(batch, tok, [[4]], "delete") == {}
    assert edit(batch, tok, [[4]], "overexpress") == {(0, 0): ([2, 4, 5, 6, 7, 8],
                                                               [0, 4, 1, 2, 3, 4])}
    # scBERT (levels 0..5): a b c d are 4..7; counts 9990 7 3 give levels 5 3 2, d is 0
    bert = ScBERTTokenizer(_vocab(4))
    batch = one_cell(bert, [9990, 7, 3, 0])
    assert batch.values.tolist() == [5, 3, 2, 0]
    cases = {("delete", 5): [5, 0, 2, 0], ("overexpress", 7): [5, 3, 2, 5],
             ("inhibit", 4): [3, 3, 2, 0], ("activate", 6): [5, 3, 3, 0]}
    for (mode, gene), values in cases.items():
        assert edit(batch, bert, [[gene]], mode) == {(0, 0): ([4, 5, 6, 7], values)}
    assert edit(batch, bert, [[7]], "delete") == {}


def test_scfoundation_edits_by_hand():
    tok = ScFoundationTokenizer(_vocab(3))
    batch = one_cell(tok, [0, 10, 90])  # b, c: log1p(1000), log1p(9000)
    b, c = (float(np.float32(np.log1p(x))) for x in (1000, 9000))
    assert edit(batch, tok, [[5]], "delete") == {(0, 0): ([6], [c])}
    assert edit(batch, tok, [[4]], "overexpress") == {(0, 0): ([4, 5, 6], [c, b, c])}
    assert edit(batch, tok, [[5]], "activate", shift=0.5) == {(0, 0): ([5, 6], [c, c])}
    enc = Encoding.of(tok)
    index = CellIndex(batch, enc, len(tok.vocab))
    edits, _ = plan_listed(index, np.array([4, 5]), np.array([0, 1, 2]), "overexpress",
                           np.array([0]))
    out, origin, edited = build(index, edits, np.arange(2), "overexpress", 0.25)
    assert out.extras["depth_S"].tolist() == [2.0, 2.0]  # read depth copied, not recomputed
    assert origin.tolist() == [-1, 0, 1, 0, 1]
    assert edited.tolist() == [1, 0, 0, 1, 0]


# --- real cells ----------------------------------------------------------------------------
@cache
def pbmc():
    """``(adata, report, vocab)``: 30 pbmc3k cells and the genes they express."""
    adata = _load(PBMC3K)[:N_CELLS].copy()
    adata = adata[:, np.asarray((adata.X > 0).sum(0)).ravel() > 0].copy()
    report = resolve(adata, count_coverage=False)
    return adata, report, GeneVocab.from_report(report)


@cache
def family(name: str, max_len: int = MAX_LEN):
    """``(tokenizer, model)`` of a family on the pbmc genes: cells cut to ``max_len`` tokens
    (scBERT: a panel of the 40 genes with most counts), a tiny random model."""
    adata, report, vocab = pbmc()
    if name == "geneformer":
        tok = GeneformerTokenizer(vocab, max_len=max_len).fit(adata, report=report)
    elif name == "scgpt":
        tok = ScGPTTokenizer(vocab, max_len=max_len)
    elif name == "scbert":
        ids = vocab.lookup(adata, report=report)
        counts = np.bincount(ids[ids >= 0], np.asarray(adata.X.sum(0)).ravel()[ids >= 0],
                             minlength=len(vocab))
        panel = np.sort(np.argsort(-counts)[:MAX_LEN])
        tok = ScBERTTokenizer(GeneVocab(vocab.decode(panel), species=vocab.species))
    else:
        tok = ScFoundationTokenizer(vocab, max_len=max_len)
    torch.manual_seed(0)
    # weights larger than the default init, so that a perturbation moves the embedding
    # by more than rounding (a random scGPT <cls> state barely moves otherwise)
    config = ModelConfig.preset(name, "tiny", vocab=tok.vocab, initializer_range=0.2)
    model = CellModel(config, tokenizer=tok)
    return tok, model.eval()


def cells_of(tok, adata=None) -> TokenBatch:
    """The tokens of ``adata`` (default: the pbmc cells), every cell kept, as perturb sees
    them."""
    adata = pbmc()[0] if adata is None else adata
    return tok.encode(adata.X, tok.column_map(adata, report=pbmc()[1]), keep_empty=True)


def naive(ids, values, targets, mode, tok, *, shift=0.25, max_position=0):
    """One cell edited by list operations (the reference); ``None`` when skipped."""
    n_special = len(tok.vocab.special_tokens)
    ids, values = list(map(int, ids)), list(map(float, values))
    n_pre = next(i for i, t in enumerate([*ids, n_special]) if t >= n_special)
    n_suf = next(i for i, t in enumerate([*ids[::-1], n_special]) if t >= n_special)
    pre, suf = ids[:n_pre], ids[len(ids) - n_suf:]
    genes = list(zip(ids[n_pre:len(ids) - n_suf], values[n_pre:len(ids) - n_suf],
                     strict=True))
    ranked = tok.name == "geneformer"
    zeros = tok.name == "scbert" or getattr(tok, "include_zero_genes", False)
    ranking = [g for g, _ in genes] if ranked else \
        [g for g, v in sorted(genes, key=lambda x: (-x[1], x[0])) if v > 0]
    value = dict(genes)
    hit = [t for t in targets if t in ranking]
    if mode != "overexpress" and not hit:
        return None
    if mode == "delete":
        genes = [(g, 0.0) if g in hit else (g, v) for g, v in genes] if zeros else \
            [(g, v) for g, v in genes if g not in hit]
    elif mode == "overexpress":
        top = {"scgpt": getattr(tok, "n_bins", 0) - 1, "scbert": getattr(tok, "max_level", 0)
               }.get(tok.name) or value[ranking[0]]
        if ranked:
            genes = [(t, top) for t in targets] + [(g, v) for g, v in genes if g not in targets]
            cap = max(min(c for c in (tok.max_len, max_position) if c), len(ids))
            genes = genes[:cap - n_pre - n_suf]
        else:
            value.update({t: top for t in targets})
            genes = sorted(value.items())
    else:
        (t,) = targets
        r, n = ranking.index(t), len(ranking)
        step = math.floor(shift * n + 0.5)
        r2 = min(r + step, n - 1) if mode == "inhibit" else max(r - step, 0)
        new = value[ranking[r2]]
        if ranked:
            order = [g for g in ranking if g != t]
            order.insert(r2, t)
            genes = [(g, new if g == t else value[g]) for g in order]
        else:
            genes = [(g, new if g == t else v) for g, v in genes]
    return pre + [g for g, _ in genes] + suf, [0.0] * n_pre + [v for _, v in genes] + \
        [0.0] * n_suf


def some_genes(tok, batch: TokenBatch) -> list[int]:
    """Token ids of three often, two rarely, and one never expressed gene of the cells
    (where there is one: scBERT's panel is the genes with most counts)."""
    genes = batch.gene_ids[(batch.gene_ids >= len(tok.vocab.special_tokens))
                           & ((batch.values > 0) | (tok.name == "geneformer"))]
    ids, n = np.unique(genes, return_counts=True)
    by_count = ids[np.argsort(-n, kind="stable")]
    never = np.setdiff1d(tok.column_map(pbmc()[0], report=pbmc()[1]).token_ids, ids)
    return [*by_count[:3].tolist(), *by_count[-2:].tolist(), *never[:1].tolist()]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FAMILIES)
def test_edits_match_per_cell_reference_on_real_cells(name, mode):
    tok, model = family(name)
    batch = cells_of(tok)
    genes = some_genes(tok, batch)
    got = edit(batch, tok, [[g] for g in genes], mode, shift=0.3,
               max_position=model.config.max_position)
    want = {}
    for c in range(batch.n_cells):
        for k, g in enumerate(genes):
            out = naive(*batch.cell(c), [g], mode, tok, shift=0.3,
                        max_position=model.config.max_position)
            if out is not None:
                want[c, k] = out
    assert got.keys() == want.keys()
    assert len(got) >= 10
    for key, (ids, values) in want.items():
        assert got[key][0] == ids, key
        np.testing.assert_array_equal(got[key][1], np.float32(values))
    if mode in ("delete", "overexpress"):  # several genes at once, too
        got = edit(batch, tok, [genes[:2] + genes[-1:]], mode)
        for c in range(batch.n_cells):
            out = naive(*batch.cell(c), genes[:2] + genes[-1:], mode, tok,
                        max_position=model.config.max_position)
            assert (got.get((c, 0)) is None) == (out is None)
            if out is not None:
                assert got[c, 0][0] == out[0]
                np.testing.assert_array_equal(got[c, 0][1], np.float32(out[1]))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_gene_deleted_in_turn(name):
    tok, model = family(name)
    batch = cells_of(tok)[:5]
    enc = Encoding.of(tok, max_position=model.config.max_position)
    index = CellIndex(batch, enc, len(tok.vocab))
    pert_of = np.arange(len(tok.vocab))
    edits = plan_all(index, pert_of, np.arange(5))
    out, _, _ = build(index, edits, np.arange(edits.n_copies), "delete", 0.25)
    n = 0
    for k in range(out.n_cells):
        c, g = int(edits.copy_cell[k]), int(edits.copy_pert[k])
        ids, values = naive(*batch.cell(c), [g], "delete", tok)
        assert out.cell(k)[0].tolist() == ids
        np.testing.assert_array_equal(out.cell(k)[1], np.float32(values))
        n += 1
    assert n == index.n_expressed.sum() > 5


def per_copy_shifts(model, tok, genes: list[int], mode: str, adata) -> np.ndarray:
    """The reference screen: one forward pass per perturbed copy, one cell at a time."""
    batch = cells_of(tok, adata)
    out = np.full((batch.n_cells, len(genes)), np.nan)
    for c in range(batch.n_cells):
        cell = batch[c]
        if not (batch.cell(c)[0] >= len(tok.vocab.special_tokens)).any():
            continue
        o = model.embed(cell)[0].astype(np.float64)
        for k, g in enumerate(genes):
            edited = naive(*batch.cell(c), [g], mode, tok,
                           max_position=model.config.max_position)
            if edited is None:
                continue
            ids, values = edited
            copy = TokenBatch(np.array(ids, np.int32), np.array(values, np.float32),
                              np.array([0, len(ids)]), cell.cell_index, cell.extras)
            p = model.embed(copy)[0].astype(np.float64)
            out[c, k] = 1 - o @ p / np.linalg.norm(o) / np.linalg.norm(p)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_scores_equal_per_copy_loop(name):
    tok, model = family(name)
    adata = pbmc()[0][:6].copy()
    genes = some_genes(tok, cells_of(tok, adata))
    names = tok.vocab.decode(genes)  # Ensembl IDs of the vocabulary are accepted too
    for mode in ("delete", "overexpress"):
        sclcm.tl.perturb(adata, names, mode=mode, model=model, n_null=2, batch_size=7)
        got = adata.obsm["sclcm_perturb"]
        want = per_copy_shifts(model, tok, genes, mode, adata)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert np.nanmax(want) > 1e-4  # the perturbations do move the embeddings
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)
    # every gene of 2 cells, in whatever passes the token budget makes
    small = adata[:2].copy()
    sclcm.tl.perturb(small, "all", model=model, n_null=2)
    names = list(small.uns["sclcm_perturb"]["names"])
    ids = tok.vocab.lookup(small, report=resolve(small, count_coverage=False))
    name_to_id = dict(zip(small.var_names, ids, strict=True))
    want = per_copy_shifts(model, tok, [int(name_to_id[n]) for n in names], "delete", small)
    np.testing.assert_allclose(small.obsm["sclcm_perturb"], want, rtol=1e-3, atol=1e-6)


# --- tool behaviour ------------------------------------------------------------------------
def _gene_names(name: str) -> tuple[list[str], str]:
    """Two often expressed genes of the pbmc cells and a gene with no token."""
    tok, _ = family(name)
    adata, report, _ = pbmc()
    ids = tok.vocab.lookup(adata, report=report)
    x = np.asarray((adata.X > 0).sum(0)).ravel()
    x[ids < 0] = -1
    top = adata.var_names[np.argsort(-x, kind="stable")[:2]].tolist()
    no_token = adata.var_names[np.flatnonzero(ids < 0)[0]]
    return top, no_token


def test_outputs_are_complete_and_written(tmp_path):
    _, model = family("geneformer")
    adata = pbmc()[0].copy()
    (a, b), no_token = _gene_names("geneformer")
    before = snapshot(adata)
    out = sclcm.tl.perturb(adata, [a, b, no_token], model=model, n_null=3, gene_shifts=True,
                           key_added="ko", copy=True)
    assert_unchanged(adata, before)  # copy=True leaves the input alone
    assert isinstance(out, ad.AnnData)
    shifts = out.obsm["ko"]
    assert shifts.shape == (N_CELLS, 2)
    assert shifts.dtype == np.float32
    rec = out.uns["ko"]
    assert list(rec["names"]) == [a, b]
    assert list(rec["not_in_vocab"]) == [no_token]
    assert rec["n_cells"] == N_CELLS
    assert rec["embedding_shift"].shape == (2, model.config.d_model)
    assert len(rec["null_genes"]) >= 3
    assert rec["params"]["mode"] == "delete"
    assert rec["params"]["n_null"] == 3
    assert list(rec["params"]["genes"]) == [a, b, no_token]
    table = rec["table"]
    assert list(table.columns) == ["gene", "mean_shift", "null_mean", "n_expressed",
                                   "n_perturbed", "expression_group", "statistic", "pvalue",
                                   "fdr"]
    assert sorted(table["gene"]) == sorted([a, b])
    assert table["mean_shift"].is_monotonic_decreasing
    row = table.set_index("gene").loc[a]
    assert row["n_perturbed"] == np.isfinite(shifts[:, 0]).sum() == row["n_expressed"]
    assert row["mean_shift"] == pytest.approx(np.nanmean(shifts[:, 0]), rel=1e-5)
    assert 0 <= row["pvalue"] <= row["fdr"] <= 1
    gs = rec["gene_shifts"]
    assert set(gs["perturbation"]) == {a, b}
    assert a not in set(gs.loc[gs["perturbation"] == a, "gene"])  # only the other genes
    assert (gs["mean_shift"] >= -1e-6).all()
    assert (gs["n_cells"] >= 1).all()
    out.write_h5ad(tmp_path / "perturbed.h5ad")  # no pickles: h5ad keeps it all
    back = ad.read_h5ad(tmp_path / "perturbed.h5ad")
    np.testing.assert_array_equal(back.obsm["ko"], shifts)
    pd.testing.assert_frame_equal(back.uns["ko"]["table"], table, check_dtype=False)
    # in place
    assert sclcm.tl.perturb(adata, [a], model=model, n_null=2) is None
    assert adata.obsm["sclcm_perturb"].shape == (N_CELLS, 1)


def test_unexpressed_genes_are_skipped_or_inserted():
    tok, model = family("scfoundation")
    adata = pbmc()[0].copy()
    batch = cells_of(tok, adata)
    ids = tok.column_map(adata, report=pbmc()[1]).token_ids
    expressed = np.isin(ids, batch.gene_ids)
    rare = tok.vocab.decode(ids[~expressed][:1])  # in the data, but in no cell's tokens
    sclcm.tl.perturb(adata, rare, model=model, n_null=2)
    assert np.isnan(adata.obsm["sclcm_perturb"]).all()
    assert adata.uns["sclcm_perturb"]["table"]["n_expressed"].tolist() == [0]
    sclcm.tl.perturb(adata, rare, mode="overexpress", model=model, n_null=2)
    assert np.isfinite(adata.obsm["sclcm_perturb"]).all()  # inserted in every cell
    assert adata.uns["sclcm_perturb"]["table"]["n_perturbed"].tolist() == [N_CELLS]


def test_combine_perturbs_together():
    tok, model = family("geneformer")
    adata = pbmc()[0].copy()
    a, b = tok.vocab.decode(some_genes(tok, cells_of(tok))[:2])
    sclcm.tl.perturb(adata, [a, b], model=model, combine=True, n_null=4)
    rec = adata.uns["sclcm_perturb"]
    assert list(rec["names"]) == [f"{a}+{b}"]
    assert len(rec["null_genes"]) == 4
    assert all(n.count("+") == 1 for n in rec["null_genes"])  # matched pairs
    both = adata.obsm["sclcm_perturb"][:, 0]
    sclcm.tl.perturb(adata, [a, b], model=model, n_null=2)
    alone = np.isfinite(adata.obsm["sclcm_perturb"])
    shifts = adata.obsm["sclcm_perturb"]
    np.testing.assert_array_equal(np.isfinite(both), alone.any(1))
    # where one gene is expressed, deleting both is deleting it; where both are, it is not
    one = alone.sum(1) == 1
    np.testing.assert_allclose(both[one], np.nanmax(shifts[one], axis=1), rtol=1e-5)
    two = alone.all(1)
    assert two.sum() >= 3
    assert (np.abs(both[two, None] - shifts[two]) > 1e-6).all()


def _with_goal(start: ad.AnnData, goal: ad.AnnData) -> tuple[ad.AnnData, dict]:
    adata = ad.concat({"start": start, "goal": goal}, label="state", index_unique="-")
    return adata, {"key": "state", "start": "start", "goal": "goal"}


def test_goal_shift_sign():
    """The goal shift is positive toward the goal: a cell whose deleted copy is the goal
    state moves all the way (goal shift = shift); away from a goal that is the cell
    itself, it is -shift. (With random weights, whole populations move in no consistent
    direction, so the sign is checked where it is exact.)"""
    tok, model = family("geneformer", 4096)  # whole cells: the deleted copy is its twin
    cells = pbmc()[0][:1]
    gene = tok.vocab.decode(some_genes(tok, cells_of(tok))[:1])[0]
    ids = tok.vocab.lookup(cells, report=pbmc()[1])
    col, elsewhere = np.flatnonzero(ids == tok.vocab[gene])[0], np.flatnonzero(ids < 0)[0]
    twin = cells.copy()
    X = twin.X.tolil()
    # the cell without the gene, its counts moved to a gene outside the vocabulary: the
    # total, so every other gene's normalized value, stays the same to the last bit
    X[0, elsewhere] += X[0, col]
    X[0, col] = 0
    twin.X = sparse.csr_matrix(X)
    adata, spec = _with_goal(cells, twin)
    sclcm.tl.perturb(adata, [gene], model=model, goal=spec, n_null=2)
    shift, goal = adata.obsm["sclcm_perturb"][0, 0], adata.obsm["sclcm_perturb_goal"][0, 0]
    assert np.isnan(adata.obsm["sclcm_perturb_goal"][1]).all()  # only start cells
    assert shift > 1e-4
    assert goal == pytest.approx(shift, rel=1e-4)
    table = adata.uns["sclcm_perturb"]["table"]
    assert table["mean_goal_shift"][0] == pytest.approx(goal)
    for name in ("geneformer", "scfoundation"):
        tok, model = family(name)
        absent = np.setdiff1d(tok.column_map(cells, report=pbmc()[1]).token_ids,
                              cells_of(tok, cells).gene_ids)  # inserted: a clear change
        adata, spec = _with_goal(cells, cells)
        sclcm.tl.perturb(adata, tok.vocab.decode(absent[:1]), model=model, goal=spec,
                         n_null=2, mode="overexpress")
        shift, goal = adata.obsm["sclcm_perturb"][0, 0], adata.obsm["sclcm_perturb_goal"][0, 0]
        assert shift > 1e-5
        assert goal == pytest.approx(-shift, rel=1e-3)


def test_gene_shifts_match_per_copy_states():
    tok, model = family("scbert")
    adata = pbmc()[0][:3].copy()
    (gene, _), _ = _gene_names("scbert")
    sclcm.tl.perturb(adata, [gene], model=model, gene_shifts=True, n_null=1)
    table = adata.uns["sclcm_perturb"]["gene_shifts"]
    table = table[table["perturbation"] == gene].set_index("gene")
    batch = cells_of(tok, adata)
    g = int(tok.vocab.lookup(adata, report=resolve(adata, count_coverage=False))[
        adata.var_names.get_loc(gene)])
    moved: dict[int, list[float]] = {}
    with torch.inference_mode():
        for c in range(batch.n_cells):
            edited = naive(*batch.cell(c), [g], "delete", tok)
            if edited is None:
                continue
            copy = TokenBatch(np.array(edited[0], np.int32), np.array(edited[1], np.float32),
                              np.array([0, len(edited[0])]), batch.cell_index[[c]])
            h0 = model(**model.inputs(batch[c]), heads=False)["last_hidden_state"]
            h1 = model(**model.inputs(copy), heads=False)["last_hidden_state"]
            for i, t in enumerate(edited[0]):
                if t != g:
                    cos = torch.nn.functional.cosine_similarity(h0[i], h1[i], dim=0)
                    moved.setdefault(t, []).append(1 - float(cos))
    names = {int(t): n for t, n in zip(tok.vocab.lookup(adata, report=resolve(
        adata, count_coverage=False)), adata.var_names, strict=True) if t >= 0}
    assert len(table) == len(moved)
    for t, values in moved.items():
        row = table.loc[names[t]]
        assert row["n_cells"] == len(values)
        assert row["mean_shift"] == pytest.approx(np.mean(values), rel=1e-3, abs=1e-6)


def test_cell_sample_is_seeded():
    _, model = family("geneformer")
    adata = pbmc()[0].copy()
    (a, _), _ = _gene_names("geneformer")
    sclcm.tl.perturb(adata, [a], model=model, n_cells=7, random_state=1, n_null=2)
    first = adata.obsm["sclcm_perturb"].copy()
    assert np.isfinite(first[:, 0]).sum() <= 7
    assert adata.uns["sclcm_perturb"]["n_cells"] == 7
    sclcm.tl.perturb(adata, [a], model=model, n_cells=7, random_state=1, n_null=2)
    np.testing.assert_array_equal(adata.obsm["sclcm_perturb"], first)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"mode": "knockout"}, ValueError, "mode must be one of"),
    ({"genes": ["NOT_A_GENE_1"]}, sclcm.InputError, "neither in adata.var_names"),
    ({"genes": "CD74"}, ValueError, "not the string"),
    ({"genes": []}, ValueError, "genes is empty"),
    ({"genes": "all", "combine": True}, ValueError, "needs a list"),
    ({"shift": 0.0}, ValueError, "shift must be"),
    ({"goal": {"key": "nope", "start": "a", "goal": "b"}}, sclcm.InputError,
     "not a column"),
    ({"goal": {"key": "state", "start": "a", "goal": "zzz"}}, sclcm.InputError,
     r"^goal\['goal'\] = 'zzz' is not a value of adata.obs\['state'\]"),  # not "goal goal"
    ({"goal": {"key": "state", "start": "zzz", "goal": "a"}}, sclcm.InputError,
     r"^goal\['start'\] = 'zzz' is not a value"),
    ({"goal": {"key": "state", "start": "a", "goal": "a"}}, ValueError,
     r"^goal\['start'\] and goal\['goal'\] are the same state \('a'\)"),
    ({"goal": {"key": "state"}}, ValueError, "goal must be a dict"),
    ({"layer": "counts"}, sclcm.InputError, "not in adata.layers"),
    ({"precision": "float16"}, ValueError, "precision must be one of"),
])
def test_errors_leave_adata_unchanged(kwargs, error, match):
    _, model = family("geneformer")
    adata = pbmc()[0].copy()
    adata.obs["state"] = ["a"] * 10 + ["b"] * (N_CELLS - 10)
    kwargs = {"genes": [_gene_names("geneformer")[0][0]], **kwargs}
    before = snapshot(adata)
    with pytest.raises(error, match=match):
        sclcm.tl.perturb(adata, model=model, **kwargs)
    assert_unchanged(adata, before)


def test_genes_without_tokens_and_empty_data():
    _, model = family("geneformer")
    adata = pbmc()[0].copy()
    _, no_token = _gene_names("geneformer")
    with pytest.raises(sclcm.InputError, match="None of the genes has a token"):
        sclcm.tl.perturb(adata, [no_token], model=model)
    with pytest.raises(sclcm.InputError, match="empty"):
        sclcm.tl.perturb(adata[:0].copy(), model=model)


def test_plot(tmp_path):
    import matplotlib.pyplot as plt

    _, model = family("geneformer")
    adata = pbmc()[0].copy()
    (a, b), _ = _gene_names("geneformer")
    with pytest.raises(KeyError, match=r"run sclcm\.tl\.perturb"):
        sclcm.pl.perturbation(adata)
    sclcm.tl.perturb(adata, [a, b], model=model, n_null=2)
    ax = sclcm.pl.perturbation(adata, n_top=1, show=False)
    assert [t.get_text() for t in ax.get_yticklabels()] == \
        [adata.uns["sclcm_perturb"]["table"]["gene"][0]]
    sclcm.pl.perturbation(adata, save=str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0
    plt.close("all")


def test_bf16_scores_agree_with_float32():
    """precision="bfloat16" on CPU: the shipped model's shifts follow the float32 ones."""
    if not sclcm.tl.shipped_models():
        pytest.skip("no model is shipped")
    adata = pbmc()[0].copy()
    genes = [g for g in ("CD74", "MALAT1", "LTB", "NKG7", "S100A9", "FTL", "RPS27")
             if g in adata.var_names]
    out = {}
    for precision in ("float32", "bfloat16"):
        out[precision] = a = adata.copy()
        sclcm.tl.perturb(a, genes, n_null=3, precision=precision)
        assert a.uns["sclcm_perturb"]["params"]["dtype"] == precision
    x, y = (out[p].obsm["sclcm_perturb"] for p in ("float32", "bfloat16"))
    ok = np.isfinite(x)
    assert np.array_equal(ok, np.isfinite(y))
    assert ok.sum() > 50
    assert not np.array_equal(x[ok], y[ok])  # bf16 really ran
    assert np.corrcoef(x[ok], y[ok])[0, 1] > 0.99
    np.testing.assert_allclose(y[ok], x[ok], rtol=0.1, atol=2e-5)
