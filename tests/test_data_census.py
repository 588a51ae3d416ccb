"""A local Census from real datasets, read back as the hosted one is, and streamed from."""

from __future__ import annotations

import cellxgene_census
import numpy as np
import pandas as pd
import pytest
from conftest import CHAI_MOUSE, CIDER, KANG_IFNB, data_path
from test_data_inputs import CENSUS_SOURCES, N_HUMAN, N_MOUSE, local_census, mouse_cells, scratch

import sclcm
from sclcm.data import CensusStream, epoch_seed, write_local_census
from sclcm.data.census import main as census_main
from sclcm.genes import GeneVocab, resolve
from sclcm.tokenizers import ScGPTTokenizer

# cellxgene_census.get_anndata builds AnnData from integer soma_joinid indexes; anndata
# warns that it turns them into strings (third-party code, the hosted Census does the same)
get_anndata_warning = pytest.mark.filterwarnings(
    "ignore:Transforming to str index:anndata.ImplicitModificationWarning")


def census_stream(**kwargs) -> CensusStream:
    return CensusStream(uri=local_census(), **{"organism": "Homo sapiens", "block_size": 128,
                                                "chunk_size": 32,
                                                **kwargs})


def ids_of(stream) -> np.ndarray:
    return np.concatenate([b.cell_ids for b in stream])


def _raw_dataset(**kwargs):
    """tiledbsoma-ml's own ExperimentDataset over the human cells (no wrapper)."""
    from tiledbsoma_ml import ExperimentDataset

    with cellxgene_census.open_soma(uri=local_census()) as census:
        exp = census["census_data"]["homo_sapiens"]
        with exp.axis_query("RNA") as query:
            return ExperimentDataset(query, layer_name="raw", batch_size=128,
                                     io_batch_size=2048, shuffle_chunk_size=32,
                                     return_sparse_X=True, **kwargs)


# --- writing and reading back ---------------------------------------------------------------
@get_anndata_warning
def test_local_census_round_trips_counts_and_labels(load):
    sources = {KANG_IFNB: load(KANG_IFNB), CIDER: load(CIDER), CHAI_MOUSE: mouse_cells()}
    with cellxgene_census.open_soma(uri=local_census()) as census:
        datasets = census["census_info"]["datasets"].read().concat().to_pandas()
        assert datasets["dataset_title"].tolist() == list(CENSUS_SOURCES)
        for name, adata in sources.items():
            organism = "Mus musculus" if name == CHAI_MOUSE else "Homo sapiens"
            dataset_id = datasets.set_index("dataset_title").loc[name, "dataset_id"]
            got = cellxgene_census.get_anndata(census, organism,
                                               obs_value_filter=f"dataset_id == '{dataset_id}'")
            want = resolve(adata, count_coverage=False).collapse(adata)
            assert got.obs["observation_joinid"].tolist() == adata.obs_names.tolist()
            cols = pd.Index(got.var["feature_id"]).get_indexer(want.var_names)
            assert (cols >= 0).all()  # every resolved gene is in the experiment
            assert (got.X[:, cols] != want.X).nnz == 0  # the counts of the kept genes
            assert got.X.sum() == pytest.approx(want.X.sum())  # and nothing elsewhere
            assert got.X.dtype == np.float32
            assert got.obs["cell_type"].tolist() == adata.obs["cell_type"].astype(str).tolist()
            donors = adata.obs["donor"].astype(str) if "donor" in adata.obs else "unknown"
            assert (got.obs["donor_id"].astype(str).to_numpy() == np.asarray(donors)).all()
            assert (got.obs["disease"] == "unknown").all()
            assert got.obs["is_primary_data"].all()
            assert np.allclose(got.obs["raw_sum"], np.asarray(want.X.sum(axis=1)).ravel())
            assert (got.obs["nnz"].to_numpy() == np.diff(want.X.indptr)).all()


def test_local_census_info_tables_have_the_census_shape():
    with cellxgene_census.open_soma(uri=local_census()) as census:
        info = {k: census["census_info"][k].read().concat().to_pandas()
                for k in ("summary", "datasets", "summary_cell_counts", "organisms")}
        human = census["census_data"]["homo_sapiens"]
        var = human.ms["RNA"].var.read().concat().to_pandas()
        obs_columns = human.obs.schema.names
        presence = cellxgene_census.get_presence_matrix(census, "Homo sapiens")
    summary = info["summary"].set_index("label")["value"]
    assert summary["total_cell_count"] == str(N_HUMAN + N_MOUSE)
    assert set(info["organisms"]["organism"]) == {"homo_sapiens", "mus_musculus"}
    counts = info["summary_cell_counts"].query("category == 'all'").set_index("organism")
    assert counts.loc["Homo sapiens", "total_cell_count"] == N_HUMAN
    assert counts.loc["Mus musculus", "unique_cell_count"] == N_MOUSE
    assert {"soma_joinid", "dataset_id", "assay", "cell_type_ontology_term_id", "donor_id",
            "is_primary_data", "observation_joinid", "tissue_general", "raw_sum", "nnz",
            "raw_mean_nnz", "raw_variance_nnz", "n_measured_vars"} <= set(obs_columns)
    assert list(var.columns) == ["soma_joinid", "feature_id", "feature_name", "feature_length",
                                 "nnz", "n_measured_obs"]
    assert var["feature_id"].str.startswith("ENSG").all()
    assert var["feature_id"].is_unique
    assert presence.shape == (3, len(var))
    assert presence[2].nnz == 0  # row 2 is the mouse dataset


def test_write_refuses_to_overwrite_and_normalized_data(load):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_local_census([data_path(CIDER)], local_census())
    with pytest.raises(KeyError, match="which no dataset's obs has"):
        write_local_census([data_path(CIDER)], local_census(), overwrite=True,
                           obs_columns={"donor_id": "no_such_column"})
    with cellxgene_census.open_soma(uri=local_census()) as census:  # checked before removal
        assert "homo_sapiens" in census["census_data"]
    adata = load(CIDER)
    adata.X = adata.X.multiply(1 / adata.X.sum(axis=1)).tocsr()
    with pytest.raises(sclcm.InputError, match="contains non-integer values"):
        write_local_census([adata], scratch("normalized") / "census")


def test_command_line_writes_a_census(capsys):
    out = scratch("cli") / "census"
    assert census_main([str(out), str(data_path(CIDER)), "--obs", "donor_id=donor"]) == 0
    assert "Homo sapiens" in capsys.readouterr().out
    with cellxgene_census.open_soma(uri=str(out)) as census:
        obs = census["census_data"]["homo_sapiens"].obs.read(
            column_names=["donor_id"]).concat().to_pandas()
    assert len(obs) == 328
    assert (obs["donor_id"] != "unknown").all()


# --- streaming ------------------------------------------------------------------------------
def test_census_stream_yields_every_cell_once_with_its_counts():
    with cellxgene_census.open_soma(uri=local_census()) as census:
        raw = census["census_data"]["homo_sapiens"].ms["RNA"].X["raw"]
        X = raw.read().coos().concat().to_scipy().tocsr()  # rows and columns by soma_joinid
    stream = census_stream(obs_columns=["cell_type", "dataset_id"])
    seen = []
    for block in stream:
        assert list(block.obs.columns) == ["soma_joinid", "cell_type", "dataset_id"]
        assert (X[block.cell_ids] != block.X).nnz == 0
        seen.append(block.cell_ids)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(N_HUMAN))
    assert len(seen) == len(stream) == 15
    mouse = CensusStream(uri=local_census(), organism="mouse", block_size=64)
    assert mouse.genes.var_names.str.startswith("ENSMUSG").all()
    assert np.array_equal(np.sort(ids_of(mouse)), np.arange(N_MOUSE))


def test_census_stream_filters_and_tokenizes():
    with cellxgene_census.open_soma(uri=local_census()) as census:
        datasets = census["census_info"]["datasets"].read().concat().to_pandas()
    kang_id = datasets.set_index("dataset_title").loc[KANG_IFNB, "dataset_id"]
    stream = census_stream(value_filter=f"dataset_id == '{kang_id}'")
    assert stream.n_cells == 1556
    assert stream.value_filter == f"(dataset_id == '{kang_id}') and is_primary_data == True"
    tok = ScGPTTokenizer(GeneVocab.from_reference("human"))
    batches = list(stream.tokenize(tok))
    assert sum(b.n_cells for b in batches) == 1556
    assert all(b.gene_ids.max() < len(tok.vocab) for b in batches)


def test_set_epoch_changes_the_order_unlike_tiledbsoma_ml():
    """tiledbsoma-ml 0.1.0 ignores set_epoch; the stream reseeds with (seed, epoch)."""
    raw = _raw_dataset(seed=5)
    first = np.concatenate([obs["soma_joinid"].to_numpy() for _, obs in raw])
    raw.set_epoch(1)
    again = np.concatenate([obs["soma_joinid"].to_numpy() for _, obs in raw])
    assert np.array_equal(first, again), "tiledbsoma-ml now reshuffles by epoch"

    stream = census_stream(seed=5)
    epoch0 = ids_of(stream)
    stream.set_epoch(1)
    epoch1 = ids_of(stream)
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(np.sort(epoch0), np.sort(epoch1))
    stream.set_epoch(0)
    assert np.array_equal(ids_of(stream), epoch0)  # reproducible from (seed, epoch)
    assert stream._dataset.seed == epoch_seed(5, 0)


def test_ranks_come_from_set_shard_not_the_environment(monkeypatch):
    """tiledbsoma-ml 0.1.0 reads RANK/WORLD_SIZE once, when its dataset is built."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    raw = _raw_dataset(seed=0)
    streams = [census_stream(), census_stream()]  # made before any rank is known
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (raw.rank, raw.world_size) == (0, 1)  # kept what it saw when built
    assert len(np.concatenate([obs["soma_joinid"] for _, obs in raw])) == N_HUMAN

    shares = []
    for rank, stream in enumerate(streams):  # the environment says rank 1 to both
        stream.set_shard(rank, 2)
        shares.append(ids_of(stream))
        assert len(stream) == 8
    assert len(shares[0]) == len(shares[1]) == N_HUMAN // 2
    assert np.array_equal(np.sort(np.concatenate(shares)), np.arange(N_HUMAN))


def test_census_stream_needs_one_source():
    with pytest.raises(ValueError, match="either census_version"):
        CensusStream(organism="Homo sapiens")
    with pytest.raises(KeyError, match="No 'danio_rerio' experiment"):
        _ = CensusStream(uri=local_census(), organism="Danio rerio").n_cells
