"""AnnData and tokenized-corpus streams: every cell once, epochs, seeds, ranks and workers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CHAI_MOUSE, CIDER, KANG_IFNB, data_path
from scipy import sparse
from test_data_inputs import scratch
from torch.utils.data import DataLoader

import sclcm
from sclcm.data import AnnDataStream, CorpusStream, epoch_seed
from sclcm.data._plan import Ranges, chunks, rank_share
from sclcm.genes import GeneVocab
from sclcm.tokenizers import ScGPTTokenizer

N_KANG = 1556
SMALL = {"block_size": 100, "chunk_size": 16, "buffer_size": 400}


def ids_of(stream) -> np.ndarray:
    return np.concatenate([b.cell_ids if hasattr(b, "cell_ids") else b.cell_index
                           for b in stream])


def kang(**kwargs) -> AnnDataStream:
    return AnnDataStream(data_path(KANG_IFNB), **{**SMALL, **kwargs})


# --- the plan -------------------------------------------------------------------------
def test_chunks_and_cuts_cover_rows_exactly():
    plan = chunks([5, 0, 3], chunk_size=2)
    assert list(plan) == [(0, 0, 2), (0, 2, 4), (0, 4, 5), (2, 0, 2), (2, 2, 3)]
    assert list(plan.cut(1, 6)) == [(0, 1, 2), (0, 2, 4), (0, 4, 5), (2, 0, 1)]
    assert list(Ranges(*(np.array(v) for v in ([0, 0, 1], [0, 3, 0], [3, 5, 2]))).merged()) \
        == [(0, 0, 5), (1, 0, 2)]
    share = rank_share([10], chunk_size=3, shuffle=False, seed=0, epoch=0, rank=1,
                       world_size=3, even=True)
    assert share.rows().tolist() == [3, 4, 5]
    assert epoch_seed(0, 1) != epoch_seed(0, 2)


# --- AnnData streams ----------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in_order"])
def test_every_cell_once_per_epoch(shuffle):
    stream = kang(shuffle=shuffle)
    blocks = list(stream)
    ids = np.concatenate([b.cell_ids for b in blocks])
    assert np.array_equal(np.sort(ids), np.arange(N_KANG))
    assert [len(b) for b in blocks] == [100] * 15 + [56] == [len(b) for b in blocks]
    assert len(stream) == len(blocks)
    assert np.array_equal(ids, np.arange(N_KANG)) != shuffle


def test_order_changes_by_epoch_and_follows_the_seed():
    stream = kang(seed=7)
    first = ids_of(stream)
    stream.set_epoch(1)
    second = ids_of(stream)
    assert not np.array_equal(first, second)
    stream.set_epoch(0)
    assert np.array_equal(ids_of(stream), first)  # reproducible from (seed, epoch)
    assert np.array_equal(ids_of(kang(seed=7)), first)
    assert not np.array_equal(ids_of(kang(seed=8)), first)


def test_blocks_hold_the_rows_they_name(load):
    adata = load(KANG_IFNB)
    for block in kang(obs_columns=["cell_type"]):
        assert (adata.X[block.cell_ids] != block.X).nnz == 0
        assert block.obs.index.equals(adata.obs_names[block.cell_ids])
        assert block.obs["cell_type"].tolist() == adata.obs["cell_type"].iloc[
            block.cell_ids].tolist()
        assert isinstance(block.X, sparse.csr_matrix)


def test_backed_and_in_memory_give_the_same_blocks(load):
    backed = list(kang(seed=3))
    memory = list(AnnDataStream(load(KANG_IFNB), seed=3, **SMALL))
    assert len(backed) == len(memory)
    for a, b in zip(backed, memory, strict=True):
        assert np.array_equal(a.cell_ids, b.cell_ids)
        assert (a.X != b.X).nnz == 0
        assert a.obs.equals(b.obs)


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_files_of_any_matrix_format_read_alike(load, fmt):
    adata = load(KANG_IFNB)[:150].copy()
    convert = {"csr": sparse.csr_matrix, "csc": sparse.csc_matrix,
               "dense": lambda X: X.toarray()}[fmt]
    path = scratch(f"format_{fmt}") / "cells.h5ad"
    adata.layers["counts"] = convert(adata.X)
    adata.write_h5ad(path)
    stream = AnnDataStream(path, layer="counts", block_size=64, chunk_size=8, seed=1)
    blocks = list(stream)
    stream.close()
    assert [len(b) for b in blocks] == [64, 64, 22]
    for block in blocks:
        assert (adata.X[block.cell_ids] != block.X).nnz == 0


@pytest.mark.parametrize("even", [True, False], ids=["even", "all_cells"])
def test_ranks_read_disjoint_shares(even):
    world = 3  # 1556 = 3 * 518 + 2
    shares = []
    for rank in range(world):
        stream = kang(even_shards=even)
        stream.set_shard(rank, world)
        shares.append(ids_of(stream))
        assert len(stream) == -(-len(shares[-1]) // 100)
    everything = np.concatenate(shares)
    assert len(np.unique(everything)) == len(everything)  # disjoint
    if even:
        assert [len(s) for s in shares] == [518] * 3
        left_out = np.setdiff1d(np.arange(N_KANG), everything)
        next_epoch = np.concatenate([ids_of(s) for s in _ranks(world, epoch=1)])
        assert len(left_out) == 2
        # the next epoch leaves out other cells, so none is left out for good
        assert not np.array_equal(left_out, np.setdiff1d(np.arange(N_KANG), next_epoch))
    else:
        assert np.array_equal(np.sort(everything), np.arange(N_KANG))


def _ranks(world: int, epoch: int) -> list[AnnDataStream]:
    streams = []
    for rank in range(world):
        stream = kang()
        stream.set_shard(rank, world)
        stream.set_epoch(epoch)
        streams.append(stream)
    return streams


def test_dataloader_workers_split_a_rank_in_whole_blocks():
    stream = kang()
    stream.set_shard(1, 2)
    alone = ids_of(stream)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    blocks = list(loader)
    assert len(blocks) == len(stream) == 8  # 778 cells: only the last block is short
    assert all(b.genes is stream.genes for b in blocks)  # one gene space, resolved once
    assert sorted(len(b) for b in blocks)[1:] == [100] * 7
    assert np.array_equal(np.sort(np.concatenate([b.cell_ids for b in blocks])),
                          np.sort(alone))


def test_persistent_workers_follow_the_epoch():
    stream = kang()
    loader = DataLoader(stream, batch_size=None, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        stream.set_epoch(epoch)  # in this process; the workers stay alive
        epochs.append(np.concatenate([b.cell_ids for b in loader]))
    assert not np.array_equal(epochs[0], epochs[1])
    assert np.array_equal(np.sort(epochs[1]), np.arange(N_KANG))
    stream.set_epoch(0)  # fresh workers reproduce the persistent ones' first epoch
    fresh = DataLoader(stream, batch_size=None, num_workers=2)
    assert np.array_equal(np.concatenate([b.cell_ids for b in fresh]), epochs[0])


def test_several_files_stream_over_the_union_of_genes(load):
    stream = AnnDataStream([data_path(KANG_IFNB), data_path(CIDER)], **SMALL)
    sources = [load(KANG_IFNB), load(CIDER)]
    union = sources[0].var_names.union(sources[1].var_names, sort=False)
    assert stream.genes.n_genes == len(union)
    assert set(stream.genes.var_names) == set(union)
    assert list(stream.sources[0].obs.columns) == ["cell_type"]  # the columns both have
    mixed = 0
    for block in stream:
        from_kang = block.cell_ids < N_KANG
        mixed += from_kang.any() and (~from_kang).any()
        for src, rows, offset in ((0, from_kang, 0), (1, ~from_kang, N_KANG)):
            expected = sources[src][block.cell_ids[rows] - offset]
            got = block.X[np.flatnonzero(rows)][:, stream.genes.var_names.get_indexer(
                expected.var_names)]
            assert (got != expected.X).nnz == 0
            assert got.sum() == block.X[np.flatnonzero(rows)].sum()  # nothing elsewhere
    assert mixed  # blocks mix cells of both files
    assert np.array_equal(np.sort(ids_of(stream)), np.arange(N_KANG + 328))


@pytest.mark.parametrize("orthologs", ["one2one", "all"])
def test_a_mouse_file_reaches_human_genes_through_orthologs(load, orthologs):
    # a human and a mouse file: the stream is in the first one's species, the mouse cells
    # on human Ensembl IDs as sclcm.genes.to_species puts them (not by symbol: Ins2 is no
    # human symbol, INS is its ortholog)
    stream = AnnDataStream([data_path(KANG_IFNB), data_path(CHAI_MOUSE)],
                           orthologs=orthologs, **SMALL)
    human, mouse = load(KANG_IFNB), load(CHAI_MOUSE)
    assert stream.genes.species == "homo_sapiens"
    assert stream.genes.report().coverage == 1.0  # the columns are reference IDs
    expected = [sclcm.genes.resolve(human, count_coverage=False).collapse(human),
                sclcm.genes.to_species(mouse, "human", orthologs=orthologs)]
    assert set(stream.genes.var_names) == set(expected[0].var_names) | set(
        expected[1].var_names)
    for block in stream:
        from_human = block.cell_ids < N_KANG
        for src, rows, offset in ((0, from_human, 0), (1, ~from_human, N_KANG)):
            ref = expected[src][block.cell_ids[rows] - offset]
            got = block.X[np.flatnonzero(rows)][:, stream.genes.var_names.get_indexer(
                ref.var_names)]
            assert abs(got - sparse.csr_matrix(ref.X)).max() == 0
            assert got.sum() == block.X[np.flatnonzero(rows)].sum()  # nothing elsewhere
    assert np.array_equal(stream.measured(1), np.sort(stream.genes.var_names.get_indexer(
        expected[1].var_names)))
    ins = stream.genes.var_names.get_loc("ENSG00000254647")  # INS
    beta = np.flatnonzero(mouse.obs["cell_type"] == "beta")
    reads = sum(b.X[np.isin(b.cell_ids, beta + N_KANG), ins].sum() for b in stream)
    assert reads == mouse[beta, ["Ins1", "Ins2"] if orthologs == "all" else ["Ins2"]].X.sum()


def test_tokenized_stream_matches_tokenizing_the_anndata(load):
    adata = load(KANG_IFNB)
    tok = ScGPTTokenizer(GeneVocab.from_reference("human"))
    whole = sclcm.pp.tokenize(adata, tok)
    for batch in kang().tokenize(tok):
        ref = whole.select(np.searchsorted(whole.cell_index, batch.cell_index))
        assert np.array_equal(ref.cell_index, batch.cell_index)
        assert np.array_equal(ref.offsets, batch.offsets)
        assert np.array_equal(ref.gene_ids, batch.gene_ids)


def test_bad_arguments_say_what_to_do(load):
    with pytest.raises(ValueError, match="rank must be in"):
        kang().set_shard(2, 2)
    with pytest.raises(KeyError, match="missing from source"):
        kang(obs_columns=["no_such_column"])
    with pytest.raises(ValueError, match="block_size must be a positive"):
        kang(block_size=0)
    with pytest.raises(TypeError, match="Expected an AnnData"):
        AnnDataStream(np.zeros(3))


def test_rows_read_a_subset_of_cells(load):
    adata = load(KANG_IFNB)
    rows = np.random.default_rng(0).choice(N_KANG, 300, replace=False)
    stream = kang(rows=[rows], obs_columns=["cell_type"])
    assert len(stream) == 3
    seen = []
    for block in stream:
        assert (adata.X[block.cell_ids] != block.X).nnz == 0
        assert block.obs.index.equals(adata.obs_names[block.cell_ids])
        seen.append(block.cell_ids)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.sort(rows))
    stream.set_shard(1, 2)
    assert set(ids_of(stream)) < set(rows)
    with pytest.raises(IndexError, match="rows of source 0 must lie in"):
        kang(rows=[[N_KANG]])
    with pytest.raises(ValueError, match="one entry per source"):
        kang(rows=[rows, rows])


# --- tokenized corpora --------------------------------------------------------------------
def test_corpus_stream_covers_the_corpus_and_reshuffles(load):
    adata = load(KANG_IFNB)
    corpus = sclcm.pp.tokenize(adata, ScGPTTokenizer(GeneVocab.from_reference("human")),
                               out=scratch("corpus"))
    stream = CorpusStream(corpus.path, **SMALL)
    first = ids_of(stream)
    assert np.array_equal(np.sort(first), np.sort(np.asarray(corpus.arrays["cell_index"])))
    stream.set_epoch(1)
    assert not np.array_equal(first, ids_of(stream))
    position = {c: i for i, c in enumerate(corpus.arrays["cell_index"].tolist())}
    for batch in stream:
        ref = corpus[[position[c] for c in batch.cell_index.tolist()]]
        assert np.array_equal(ref.gene_ids, batch.gene_ids)
        assert np.array_equal(ref.values, batch.values)
    halves = []
    for rank in (0, 1):
        stream.set_shard(rank, 2)
        halves.append(ids_of(stream))
    assert not set(halves[0]) & set(halves[1])
    assert len(halves[0]) == len(halves[1]) == len(first) // 2
