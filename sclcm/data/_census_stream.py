"""Cells of the CELLxGENE Census (hosted or local) through tiledbsoma-ml's ExperimentDataset.

tiledbsoma-ml 0.1.0 does the reading (IO batches, CSR assembly, eager fetch, rank and
worker partitions, shuffling within a rank); this wrapper fixes three of its defects:

- ``ExperimentDataset.set_epoch`` stores the epoch but never uses it: ``__iter__`` seeds
  its shuffles with ``self.seed`` alone (``dataset.py``, ``shuffle_chunks(...,
  seed=self.seed)`` and ``IOBatchIterable(..., seed=self.seed)``), so every epoch has the
  same order. Here each epoch sets the dataset's seed to ``epoch_seed(seed, epoch)`` and
  permutes the query's chunks of cells before tiledbsoma-ml partitions them, as the
  other streams of :mod:`sclcm.data` do.
- The rank and world size are read once, from ``RANK``/``WORLD_SIZE`` (or ``LOCAL_RANK``,
  or an initialized process group) when the dataset is built (``__attrs_post_init__``).
  Lightning's launchers do not set ``RANK``, and a dataset built before the processes
  start keeps rank 0 of 1 (every rank with ``ddp_spawn``, rank 0 with ``ddp``), so that
  rank reads every cell. Here the dataset is built lazily in the reading process and its
  rank and world size are always the ones given to :meth:`~CellStream.set_shard`.
- ``return_sparse_X=True`` raises in DataLoader workers (``_multiproc_check``), although
  its blocks are scipy CSR matrices that pickle fine; see ``_soma_dataset``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np

from ._block import CellBlock, GeneSpace, as_csr
from ._plan import chunks, epoch_seed, split_bounds
from ._stream import CellStream, _positive

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from tiledbsoma_ml import ExperimentDataset


def experiment_name(organism: str) -> str:
    """The Census experiment of ``organism``: ``"Homo sapiens"``/``"human"`` -> ``homo_sapiens``.

    >>> experiment_name("Mus musculus"), experiment_name("human")
    ('mus_musculus', 'homo_sapiens')
    """
    from ..genes import canonical_species

    try:
        return canonical_species(organism)
    except ValueError:  # another Census organism, e.g. "Macaca mulatta"
        return re.sub(r"\s+", "_", organism.strip()).lower()


class CensusStream(CellStream):
    """Blocks of cells from a Census query, shuffled and sharded by tiledbsoma-ml.

    Parameters
    ----------
    organism
        ``"Homo sapiens"``, ``"Mus musculus"`` (or ``"human"``, ``"mouse"``, or the
        experiment name of another Census organism).
    census_version
        A release of the hosted Census, e.g. ``"2025-11-08"`` (opened with
        :func:`cellxgene_census.open_soma`); or give ``uri``.
    uri
        Where a Census-shaped SOMA store is, e.g. one written by
        :func:`~sclcm.data.write_local_census`.
    value_filter
        A SOMA filter on ``obs``, e.g. ``"tissue_general == 'blood'"``.
    primary_only
        Add ``is_primary_data == True`` (each cell once, as the Census recommends).
    var_value_filter
        A SOMA filter on ``var`` (the genes of the blocks).
    obs_columns
        obs columns of the blocks (``soma_joinid`` is always included).
    layer
        The X layer: ``"raw"`` counts.
    block_size
        Cells per block (tiledbsoma-ml's ``batch_size``).
    chunk_size
        Consecutive cells shuffled as a unit (``shuffle_chunk_size``).
    buffer_size
        Cells fetched and shuffled together (``io_batch_size``, tiledbsoma-ml's default),
        rounded up to a multiple of ``chunk_size``. Each fetch has a fixed cost (a TileDB
        query): smaller buffers read markedly slower.
    shuffle, seed, rank, world_size
        See :class:`~sclcm.data.CellStream`. Every rank reads ``n // world_size`` cells
        per epoch (tiledbsoma-ml always evens the shares).
    num_workers
        DataLoader workers per rank; only ``len()`` depends on it.
    tiledb_config
        TileDB settings (e.g. ``{"vfs.s3.region": ...}``) on top of
        :func:`cellxgene_census.get_default_soma_context`; a plain dict, so the stream
        pickles into DataLoader workers.
    """

    def __init__(self, *, organism: str, census_version: str | None = None,
                 uri: str | None = None, value_filter: str | None = None,
                 primary_only: bool = True, var_value_filter: str | None = None,
                 obs_columns: Sequence[str] = ("soma_joinid",), layer: str = "raw",
                 block_size: int = 1024, chunk_size: int = 64, buffer_size: int = 65_536,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, tiledb_config: dict[str, Any] | None = None) -> None:
        super().__init__(block_size=block_size, shuffle=shuffle, seed=seed, rank=rank,
                         world_size=world_size)
        if (census_version is None) == (uri is None):
            msg = ("Pass either census_version= (a release of the hosted Census, e.g. "
                   "'2025-11-08') or uri= (a local Census-shaped SOMA store), not both.")
            raise ValueError(msg)
        _positive("chunk_size", chunk_size)
        _positive("buffer_size", buffer_size)
        self.organism, self.experiment = organism, experiment_name(organism)
        self.census_version, self.uri = census_version, uri
        self.tiledb_config = dict(tiledb_config or {})
        filters = [f"({value_filter})"] if value_filter else []
        if primary_only:
            filters.append("is_primary_data == True")
        self.value_filter = " and ".join(filters) or None
        self.var_value_filter, self.layer = var_value_filter, layer
        self.obs_columns = ["soma_joinid", *(c for c in obs_columns if c != "soma_joinid")]
        self.chunk_size = int(chunk_size)
        self.buffer_size = -(-int(buffer_size) // self.chunk_size) * self.chunk_size
        self.num_workers = int(num_workers)
        self._dataset: ExperimentDataset | None = None
        self._obs_joinids: np.ndarray | None = None
        self._genes: GeneSpace | None = None

    # --- building the tiledbsoma-ml dataset (lazily, in the process that reads) ----------
    def _open(self):
        import cellxgene_census

        context = cellxgene_census.get_default_soma_context(self.tiledb_config)
        if self.uri is not None:
            return cellxgene_census.open_soma(uri=self.uri, context=context)
        return cellxgene_census.open_soma(census_version=self.census_version, context=context)

    def _build(self) -> ExperimentDataset:
        if self._dataset is not None:
            return self._dataset
        import tiledbsoma as soma

        from ._soma_dataset import SparseExperimentDataset

        with self._open() as census:
            if self.experiment not in census["census_data"]:
                msg = (f"No {self.experiment!r} experiment in this Census; it has "
                       f"{sorted(census['census_data'].keys())}.")
                raise KeyError(msg)
            exp = census["census_data"][self.experiment]
            with exp.axis_query(measurement_name="RNA",
                                obs_query=soma.AxisQuery(value_filter=self.value_filter),
                                var_query=soma.AxisQuery(value_filter=self.var_value_filter),
                                ) as query:
                ds = SparseExperimentDataset(query, layer_name=self.layer,
                                             obs_column_names=self.obs_columns,
                                             batch_size=self.block_size,
                                             io_batch_size=self.buffer_size,
                                             shuffle=self.shuffle,
                                             shuffle_chunk_size=self.chunk_size,
                                             seed=self.seed, return_sparse_X=True)
                var = query.var(column_names=["soma_joinid", "feature_id", "feature_name"]
                                ).concat().to_pandas()
        # the blocks' columns follow the query's var_joinids
        var = var.set_index("soma_joinid").loc[ds.query_ids.var_joinids]
        var = var.reset_index().set_index("feature_id")
        var.index.name = None
        species = self.experiment if self.experiment in ("homo_sapiens", "mus_musculus") \
            else None
        self._genes = GeneSpace(var, species=species)
        self._obs_joinids = ds.query_ids.obs_joinids
        self._dataset = ds
        return ds

    @property
    def genes(self) -> GeneSpace:
        """The genes of the blocks' columns, those of the query (index ``feature_id``)."""
        self._build()
        return self._genes

    @property
    def n_cells(self) -> int:
        """Cells of the query (every rank together)."""
        self._build()
        return len(self._obs_joinids)

    def __len__(self) -> int:
        """Blocks this rank yields per epoch, read by :attr:`num_workers` DataLoader workers."""
        per_rank = self.n_cells // self.world_size
        parts = np.diff(split_bounds(per_rank, max(self.num_workers, 1)))
        return int((-(-parts // self.block_size)).sum())

    def _epoch_dataset(self) -> ExperimentDataset:
        """The dataset set up for this epoch, rank and world size."""
        from attrs import evolve

        ds = self._build()
        ids = self._obs_joinids
        if self.shuffle:
            seed = epoch_seed(self.seed, self.epoch)
            plan = chunks([len(ids)], self.chunk_size)
            plan = plan.take(np.random.default_rng(seed).permutation(len(plan)))
            ds.seed = seed  # tiledbsoma-ml's own shuffles ignore the epoch
            ids = ids[plan.rows()]
        ds.query_ids = evolve(ds.query_ids, obs_joinids=ids)
        ds.rank, ds.world_size = self.rank, self.world_size  # never the environment's
        return ds

    def __iter__(self) -> Iterator[CellBlock]:
        self._check_world()
        ds = self._epoch_dataset()
        genes = self._genes
        for X, obs in ds:
            yield CellBlock(as_csr(X), obs, genes, obs["soma_joinid"].to_numpy())

    def __repr__(self) -> str:
        where = self.uri if self.uri is not None else f"Census {self.census_version}"
        return (f"CensusStream({self.experiment} of {where}, filter {self.value_filter!r}, "
                f"block_size={self.block_size}, rank {self.rank} of {self.world_size})")
