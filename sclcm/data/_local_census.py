"""Write AnnData as a local, Census-shaped SOMA store that cellxgene_census can open."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .. import logging as logg
from .._checks import check_counts
from .._matrix import iter_row_blocks
from ..genes import gene_table, resolve
from ._census_schema import (
    DATASETS_SCHEMA,
    OBS_SCHEMA,
    VAR_SCHEMA,
    cell_counts_table,
    obs_labels,
    organisms_table,
    summary_table,
    to_table,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from anndata import AnnData

    from ..genes import GeneReport

_NAMESPACE = uuid.UUID("6f1c1e0a-5d0b-4a52-9a3e-2f4b8d6c1a70")  # dataset ids of sclcm


@dataclass
class _Dataset:
    name: str
    path: str
    adata: AnnData
    report: GeneReport | None  # set once the inputs are checked
    joinid: int  # row of census_info/datasets

    @property
    def dataset_id(self) -> str:
        # stable across rebuilds: derived from the name, shaped like a Census UUID
        return str(uuid.uuid5(_NAMESPACE, self.name))


def write_local_census(data: AnnData | str | Path | Sequence[AnnData | str | Path],
                       uri: str | Path, *, names: Sequence[str] | None = None,
                       obs_columns: Mapping[str, str] | None = None, layer: str | None = None,
                       is_primary_data: bool = True, overwrite: bool = False,
                       block_size: int = 10_000) -> str:
    """Write AnnData (in memory or .h5ad files) as a local Census: a SOMA store of its shape.

    The store is opened like the hosted Census, ``cellxgene_census.open_soma(uri=uri)``,
    and streamed with :class:`~sclcm.data.CensusStream`. Each dataset's genes are resolved
    with :func:`sclcm.genes.resolve` and collapsed to Ensembl IDs (duplicates summed,
    unresolved genes dropped); each organism's experiment holds the union of its datasets'
    genes. A dataset goes to the experiment of its genes' species.

    Written: ``census_info`` (``summary``, ``datasets``, ``summary_cell_counts``,
    ``organisms``) and ``census_data/<organism>`` experiments with ``obs`` (the Census
    columns: labels the source has, ``"unknown"`` otherwise, per-cell statistics),
    ``ms["RNA"].var`` (``feature_id``, ``feature_name``, ``feature_length`` (0: not in the
    shipped gene tables), ``nnz``, ``n_measured_obs``), ``ms["RNA"].X["raw"]`` (float32
    counts) and the ``feature_dataset_presence_matrix``. ``X["normalized"]`` is not written.

    Parameters
    ----------
    data
        Raw counts: AnnData objects or .h5ad paths (read ``backed="r"``, in row blocks).
    uri
        A local folder for the store.
    names
        A name per dataset (its ``dataset_title``; it seeds the ``dataset_id``); file
        stems by default.
    obs_columns
        Census obs column -> source obs column, e.g. ``{"disease": "condition"}``, used in
        the datasets that have it; otherwise a column of the Census's name (``donor_id``
        also from ``donor``), else ``"unknown"``.
    layer
        Where the counts are; ``X`` when ``None``.
    is_primary_data
        The ``is_primary_data`` of every cell.
    overwrite
        Replace a store already at ``uri``.
    block_size
        Cells per read and write.

    Returns
    -------
    The store's URI.
    """
    import anndata as ad

    items = list(data) if isinstance(data, list | tuple) else [data]
    if names is not None and len(names) != len(items):
        msg = f"names has {len(names)} entries for {len(items)} datasets."
        raise ValueError(msg)
    uri = str(uri)
    if Path(uri).exists() and not overwrite:
        msg = f"{uri} already exists; pass overwrite=True to replace it."
        raise FileExistsError(msg)
    start = logg.info(f"writing a local Census of {len(items)} datasets to {uri}")
    opened = []  # files this call opens, closed whatever happens
    try:
        datasets = []
        for i, item in enumerate(items):
            path = str(item) if isinstance(item, str | Path) else str(
                getattr(item, "filename", "") or "")
            adata = item
            if isinstance(item, str | Path):
                adata = ad.read_h5ad(item, backed="r")
                opened.append(adata)
            name = names[i] if names is not None else (
                Path(path).stem if path else f"dataset_{i}")
            datasets.append(_Dataset(name, path, adata, None, i))
        _check_inputs(datasets, obs_columns)
        for d in datasets:
            check_counts(d.adata, layer=layer, allow_empty_cells=True)
            d.report = resolve(d.adata, layer=layer, count_coverage=False)
        if Path(uri).exists():
            shutil.rmtree(uri)
        obs_by_exp = _write_store(uri, datasets, obs_columns=obs_columns, layer=layer,
                                  is_primary_data=is_primary_data, block_size=block_size)
    finally:
        for adata in opened:
            adata.file.close()
    logg.info(f"    {sum(len(o) for o in obs_by_exp.values())} cells in "
              f"{sorted(obs_by_exp)}", time=start)
    return uri


def _check_inputs(datasets: list[_Dataset], obs_columns: Mapping[str, str] | None) -> None:
    """Errors that need no reading of counts, raised before anything is written."""
    if len({d.name for d in datasets}) < len(datasets):
        msg = "Dataset names must be unique; pass names=."
        raise ValueError(msg)
    for key, column in (obs_columns or {}).items():  # a typo would give "unknown" silently
        if not any(column in d.adata.obs.columns for d in datasets):
            msg = f"obs_columns maps {key!r} to {column!r}, which no dataset's obs has."
            raise KeyError(msg)


def _write_store(uri: str, datasets: list[_Dataset], **kwargs) -> dict[str, pd.DataFrame]:
    """Write the collection: one experiment per species, then census_info; obs by species."""
    import tiledbsoma as soma

    by_exp: dict[str, list[_Dataset]] = {}
    for d in datasets:
        by_exp.setdefault(d.report.species, []).append(d)
    obs_by_exp = {}
    with soma.Collection.create(uri) as root:
        census_data = _create(root, "census_data", soma.Collection)
        for exp_name, group in sorted(by_exp.items()):
            with _create(census_data, exp_name, soma.Experiment) as exp:
                obs_by_exp[exp_name] = _write_experiment(exp, group,
                                                         n_datasets=len(datasets), **kwargs)
        info = _create(root, "census_info", soma.Collection)
        _write_frame(info, "datasets", _datasets_table(datasets), DATASETS_SCHEMA)
        n_unique = sum(int(o["is_primary_data"].sum()) for o in obs_by_exp.values())
        donors = {e: int(o.groupby(["dataset_id", "donor_id"]).ngroups)
                  for e, o in obs_by_exp.items()}
        _write_frame(info, "summary", summary_table(
            sum(len(o) for o in obs_by_exp.values()), n_unique, donors))
        _write_frame(info, "summary_cell_counts", cell_counts_table(obs_by_exp))
        _write_frame(info, "organisms", organisms_table(sorted(obs_by_exp)))
    return obs_by_exp


def _create(parent, key: str, kind, **kwargs):
    """A new SOMA object ``parent[key]``, created with its own timestamp.

    ``parent.add_new_*`` would give it the parent's fixed open timestamp: a write at that
    same timestamp then loses the values of dictionary (categorical) columns.
    """
    obj = kind.create(f"{parent.uri.rstrip('/')}/{key}", **kwargs)
    parent.set(key, obj, use_relative_uri=True)
    return obj


def _write_frame(coll, key: str, df: pd.DataFrame, schema=None) -> None:
    import tiledbsoma as soma

    table = to_table(df, schema)
    with _create(coll, key, soma.DataFrame, schema=table.schema,
                 domain=[(0, max(len(df) - 1, 0))]) as sdf:
        sdf.write(table)


def _write_experiment(exp, group: list[_Dataset], *, n_datasets: int,
                      obs_columns: Mapping[str, str] | None, layer: str | None,
                      is_primary_data: bool, block_size: int) -> pd.DataFrame:
    """Write one organism's obs, var, X["raw"] and presence matrix; return its obs."""
    import pyarrow as pa
    import tiledbsoma as soma

    genes = pd.Index(pd.unique(np.concatenate([d.report.unique_ids.to_numpy() for d in group])))
    n_obs = sum(d.adata.n_obs for d in group)
    ms = _create(exp, "ms", soma.Collection)
    rna = _create(ms, "RNA", soma.Measurement)
    X = _create(_create(rna, "X", soma.Collection), "raw", soma.SparseNDArray,
                type=pa.float32(), shape=(n_obs, len(genes)))
    gene_nnz = np.zeros(len(genes), dtype=np.int64)
    presence = np.zeros((len(group), len(genes)), dtype=bool)
    obs_parts, offset = [], 0
    for k, d in enumerate(group):
        M = d.report.aggregation_matrix()  # sums the columns of one gene (collapse)
        cols = genes.get_indexer(d.report.unique_ids)
        stats = []
        for first, _, block in iter_row_blocks(d.adata, layer, block_size=block_size):
            Y = sparse.csr_matrix(sparse.csr_matrix(block) @ M, dtype=np.float32)
            Y.eliminate_zeros()  # the Census stores no explicit zeros
            coo = Y.tocoo()
            X.write(pa.Table.from_pydict({
                "soma_dim_0": (coo.row + offset + first).astype(np.int64),
                "soma_dim_1": cols[coo.col].astype(np.int64),
                "soma_data": coo.data.astype(np.float32)}))
            gene_nnz += np.bincount(cols[coo.col], minlength=len(genes))
            presence[k, cols[np.unique(coo.col)]] = True
            stats.append(_cell_stats(Y))
        obs = obs_labels(d.adata.obs, obs_columns)
        obs.insert(0, "dataset_id", d.dataset_id)
        obs["is_primary_data"] = is_primary_data
        obs["observation_joinid"] = np.asarray(d.adata.obs_names, dtype=str)
        obs = pd.concat([obs.reset_index(drop=True), pd.concat(stats, ignore_index=True)],
                        axis=1)
        obs["n_measured_vars"] = int(presence[k].sum())
        obs_parts.append(obs)
        offset += d.adata.n_obs
    obs = pd.concat(obs_parts, ignore_index=True)[[f.name for f in OBS_SCHEMA][1:]]
    _write_frame(exp, "obs", obs, OBS_SCHEMA)
    symbols = gene_table(group[0].report.species).symbol.reindex(genes)
    sizes = np.array([d.adata.n_obs for d in group], dtype=np.int64)
    var = pd.DataFrame({"feature_id": genes.to_numpy(),
                        "feature_name": symbols.fillna(pd.Series(genes, index=genes)).to_numpy(),
                        "feature_length": 0, "nnz": gene_nnz,
                        "n_measured_obs": sizes @ presence.astype(np.int64)})
    _write_frame(rna, "var", var, VAR_SCHEMA)
    rows, cols = np.nonzero(presence)
    with _create(rna, "feature_dataset_presence_matrix", soma.SparseNDArray, type=pa.bool_(),
                 shape=(n_datasets, len(genes))) as pm:
        dataset_rows = np.array([d.joinid for d in group], dtype=np.int64)[rows]
        pm.write(pa.Table.from_pydict({"soma_dim_0": dataset_rows,
                                       "soma_dim_1": cols.astype(np.int64),
                                       "soma_data": np.ones(len(rows), dtype=bool)}))
    X.close()
    return obs


def _cell_stats(Y: sparse.csr_matrix) -> pd.DataFrame:
    """raw_sum, nnz, and mean and variance (ddof=1) of the non-zero values of each cell."""
    nnz = np.diff(Y.indptr).astype(np.int64)
    total = np.asarray(Y.sum(axis=1, dtype=np.float64)).ravel()
    squares = np.asarray(Y.multiply(Y).sum(axis=1, dtype=np.float64)).ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(nnz > 0, total / nnz, 0.0)
        var = np.where(nnz > 1, (squares - nnz * mean**2) / (nnz - 1), 0.0)
    return pd.DataFrame({"raw_sum": total, "nnz": nnz, "raw_mean_nnz": mean,
                         "raw_variance_nnz": np.maximum(var, 0.0)})


def _datasets_table(datasets: list[_Dataset]) -> pd.DataFrame:
    return pd.DataFrame({
        "citation": "", "collection_id": "", "collection_name": "local Census (sclcm)",
        "collection_doi": "", "collection_doi_label": "",
        "dataset_id": [d.dataset_id for d in datasets],
        "dataset_version_id": [str(uuid.uuid5(_NAMESPACE, d.dataset_id)) for d in datasets],
        "dataset_title": [d.name for d in datasets],
        "dataset_h5ad_path": [Path(d.path).name if d.path else "" for d in datasets],
        "dataset_total_cell_count": [d.adata.n_obs for d in datasets]})
