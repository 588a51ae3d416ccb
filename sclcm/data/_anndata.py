"""A cell stream over one or many AnnData: in memory, or .h5ad files read ``backed="r"``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from .. import logging as logg
from .._matrix import get_matrix
from ._block import CellBlock, GeneSpace, _var_only, as_csr
from ._stream import ChunkedStream

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ._plan import Ranges


@dataclass
class _Source:
    """One AnnData of the stream: where it is, its cells' obs, its columns in the union."""

    path: Path | None  # read backed (or loaded) lazily in each process
    adata: AnnData | None  # an in-memory AnnData given by the caller
    obs: pd.DataFrame
    # position of each var in the stream's genes (joined by name), or a 0/1 matrix onto
    # them (another species, through orthologs); None: the stream's genes are its own
    columns: np.ndarray | sparse.csr_matrix | None
    rows: np.ndarray | None = None  # the rows the stream reads (ascending); None: all

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_read(self) -> int:
        return self.n_obs if self.rows is None else len(self.rows)


class AnnDataStream(ChunkedStream):
    """Blocks of cells from AnnData objects or .h5ad files, shuffled and sharded.

    Files are read ``backed="r"`` in each process that iterates (DataLoader workers
    included): only a buffer of counts is in memory (and the ``obs_columns`` of all
    cells), and reads stay sequential within chunks of ``chunk_size`` rows. Several
    sources form one stream over the union of their genes, so blocks mix cells of all
    files: by ``var_names`` when the sources share a species; sources of another species
    than the stream's (inferred from the names) are resolved in their own species and
    moved onto the stream's genes (Ensembl IDs) through orthologs, as
    :func:`sclcm.genes.to_species` does, so mouse ``Ins1`` and ``Ins2`` reach human
    ``INS`` under ``orthologs="all"``.

    Parameters
    ----------
    data
        An AnnData (in memory or backed), a path to an .h5ad file, or a list of them.
    layer
        Where the counts are; ``X`` when ``None``.
    obs_columns
        obs columns each block carries; ``None``: those every source has.
    backed
        Read files ``backed="r"`` (``False`` loads each file into every reading process).
    species
        Species of the stream's genes; ``None``: inferred from the names (the first
        source's when the sources' species differ).
    orthologs
        How sources of another species reach it: ``"one2one"`` (one-to-one orthologs
        only) or ``"all"`` (a gene's count copied onto each of its orthologs, several
        genes summed onto one; :mod:`sclcm.genes` says why).
    rows
        Per source, the rows to read (e.g. a training or held-out split); ``None`` for
        all rows of every source, or ``None`` in place of one source's array. Cell ids stay
        the rows of the whole sources.
    block_size, chunk_size, buffer_size, shuffle, seed, even_shards, rank, world_size
        See :class:`~sclcm.data.ChunkedStream` and :mod:`sclcm.data`.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> from sclcm.data import AnnDataStream
    >>> adata = ad.AnnData(np.eye(10, 3, dtype=np.float32))
    >>> stream = AnnDataStream(adata, block_size=4, chunk_size=2, seed=0)
    >>> [len(block) for block in stream], len(stream)
    ([4, 4, 2], 3)
    >>> stream.set_shard(1, 2)  # rank 1 of 2 reads half of the cells
    >>> sum(len(block) for block in stream)
    5
    """

    def __init__(self, data: AnnData | str | Path | Sequence[AnnData | str | Path], *,
                 layer: str | None = None, obs_columns: Sequence[str] | None = None,
                 backed: bool = True, species: str | None = None,
                 orthologs: str = "one2one", rows: Sequence[np.ndarray | None] | None = None,
                 block_size: int = 1024, chunk_size: int = 64,
                 buffer_size: int | None = 16_384, shuffle: bool = True, seed: int = 0,
                 even_shards: bool = True, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(block_size=block_size, chunk_size=chunk_size, buffer_size=buffer_size,
                         shuffle=shuffle, seed=seed, even_shards=even_shards, rank=rank,
                         world_size=world_size)
        items = list(data) if isinstance(data, list | tuple) else [data]
        if not items:
            msg = "AnnDataStream needs at least one AnnData or .h5ad path."
            raise ValueError(msg)
        self.layer, self.backed = layer, bool(backed)
        metas = [_describe(item) for item in items]
        cols = _obs_columns([m[1] for m in metas], obs_columns)
        var, columns, species = _join_genes([m[2] for m in metas],
                                            [m[0] or "AnnData" for m in metas], species,
                                            orthologs)
        self.genes = GeneSpace(var, species=species)
        self.sources = [_Source(path, adata, obs[cols], col)
                        for (path, obs, _, adata), col in zip(metas, columns, strict=True)]
        for src, keep in zip(self.sources, _check_rows(rows, self.sources), strict=True):
            src.rows = keep
        self.offsets = np.concatenate([[0], np.cumsum([s.n_obs for s in self.sources])])
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # open files are per process
        return state

    def measured(self, i: int) -> np.ndarray:
        """The columns of the stream's genes that source ``i`` measures (ascending)."""
        cols = self.sources[i].columns
        if cols is None:
            return np.arange(self.genes.n_genes)
        return np.unique(cols.indices if isinstance(cols, sparse.csr_matrix) else cols)

    def _sizes(self) -> list[int]:
        return [s.n_read for s in self.sources]

    def _matrix(self, i: int):
        """The count matrix of source ``i``, opening the file in this process if needed."""
        if i not in self._handles:
            src = self.sources[i]
            if src.adata is not None:
                self._handles[i] = get_matrix(src.adata, self.layer)
            elif self.backed:
                self._handles[i] = _H5Rows(src.path, self.layer)
            else:
                import anndata as ad

                self._handles[i] = get_matrix(ad.read_h5ad(src.path), self.layer)
        return self._handles[i]

    def _read(self, ranges: Ranges) -> CellBlock:
        Xs, obs, ids = [], [], []
        n_genes = self.genes.n_genes
        for i, start, stop in ranges:
            src = self.sources[i]
            if src.rows is None:
                X = as_csr(self._matrix(i)[start:stop])
                rows = np.arange(start, stop, dtype=np.int64)
            else:  # read the span of the chosen rows (one sequential read), keep those
                rows = src.rows[start:stop]
                X = as_csr(self._matrix(i)[int(rows[0]):int(rows[-1]) + 1])[rows - rows[0]]
            if isinstance(src.columns, sparse.csr_matrix):  # orthologs: copy and sum
                X = sparse.csr_matrix(X @ src.columns, dtype=np.result_type(X.dtype,
                                                                              np.float32))
            elif src.columns is not None:
                X = sparse.csr_matrix((X.data, src.columns[X.indices], X.indptr),
                                      shape=(X.shape[0], n_genes))
            Xs.append(X)
            obs.append(src.obs.iloc[rows] if src.rows is not None else src.obs.iloc[start:stop])
            ids.append(rows + self.offsets[i])
        if not Xs:
            return CellBlock(sparse.csr_matrix((0, n_genes), dtype=np.float32),
                             self.sources[0].obs.iloc[:0], self.genes, np.zeros(0, np.int64))
        X = Xs[0] if len(Xs) == 1 else sparse.vstack(Xs, format="csr")
        return CellBlock(X, pd.concat(obs) if len(obs) > 1 else obs[0], self.genes,
                         np.concatenate(ids))

    def close(self) -> None:
        """Close the files this process opened (they reopen on the next read)."""
        for handle in self._handles.values():
            if isinstance(handle, _H5Rows):
                handle.close()
        self._handles = {}

    def __repr__(self) -> str:
        return (f"AnnDataStream({len(self.sources)} sources, {self.n_cells} cells x "
                f"{self.genes.n_genes} genes, block_size={self.block_size}, "
                f"shuffle={self.shuffle}, rank {self.rank} of {self.world_size})")


class _H5Rows:
    """Row ranges of the count matrix of an .h5ad file, read with h5py.

    CSR and dense matrices are sliced straight from the file's arrays: anndata 0.12's
    backed sparse slicing looks up its package version on every slice, which costs more
    than the read for chunks of a few dozen rows. Other encodings go through anndata.
    """

    def __init__(self, path: Path, layer: str | None) -> None:
        import h5py

        self.file = h5py.File(path, "r")
        key = "X" if layer is None else f"layers/{layer}"
        if key not in self.file:
            self.file.close()
            msg = f"{path} has no {key!r}; pass layer= the name of the layer of counts."
            raise KeyError(msg)
        node = self.file[key]
        encoding = node.attrs.get("encoding-type", "array")
        self.csr = isinstance(node, h5py.Group) and encoding in ("csr_matrix", b"csr_matrix")
        if self.csr:
            self.n_cols = int(node.attrs["shape"][1])
            self.data, self.indices, self.indptr = node["data"], node["indices"], node["indptr"]
        elif isinstance(node, h5py.Dataset):
            self.dense = node
        else:  # e.g. CSC: anndata's reader (slow by rows, but correct)
            import anndata as ad

            self.file.close()
            self.file = None
            self.dense = get_matrix(ad.read_h5ad(path, backed="r"), layer)

    def __getitem__(self, rows: slice):
        if not self.csr:
            return self.dense[rows]
        indptr = self.indptr[rows.start:rows.stop + 1]
        a, b = int(indptr[0]), int(indptr[-1])
        return sparse.csr_matrix((self.data[a:b], self.indices[a:b], indptr - a),
                                 shape=(len(indptr) - 1, self.n_cols))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _describe(item) -> tuple[Path | None, pd.DataFrame, pd.DataFrame, AnnData | None]:
    """``(path, obs, var, in-memory AnnData)`` of a stream source, closing files it opens."""
    import anndata as ad

    if isinstance(item, str | Path):
        path = Path(item)
        if not path.exists():
            msg = f"{path} does not exist."
            raise FileNotFoundError(msg)
        adata = ad.read_h5ad(path, backed="r")
        try:
            return path, adata.obs.copy(), adata.var.copy(), None
        finally:
            adata.file.close()
    if isinstance(item, ad.AnnData):
        if item.isbacked:  # reopen by name in each process: h5py handles do not travel
            return Path(item.filename), item.obs.copy(), item.var.copy(), None
        return None, item.obs, item.var, item
    msg = f"Expected an AnnData or a path to an .h5ad file, not {type(item).__name__}."
    raise TypeError(msg)


def _check_rows(rows, sources: list[_Source]) -> list[np.ndarray | None]:
    """``rows`` as one ascending, unique int64 array (or ``None``) per source."""
    if rows is None:
        return [None] * len(sources)
    if len(rows) != len(sources):
        msg = f"rows must hold one entry per source ({len(sources)}), not {len(rows)}."
        raise ValueError(msg)
    out = []
    for i, (keep, src) in enumerate(zip(rows, sources, strict=True)):
        if keep is not None:
            keep = np.asarray(keep)
            if keep.dtype == bool:
                if len(keep) != src.n_obs:
                    msg = f"A boolean rows mask of source {i} needs {src.n_obs} entries."
                    raise ValueError(msg)
                keep = np.flatnonzero(keep)
            keep = np.unique(keep.astype(np.int64))  # sorted: reads go forward in a file
            if len(keep) and (keep[0] < 0 or keep[-1] >= src.n_obs):
                msg = f"rows of source {i} must lie in 0..{src.n_obs - 1}."
                raise IndexError(msg)
        out.append(keep)
    return out


def _obs_columns(obs: list[pd.DataFrame], wanted: Sequence[str] | None) -> list[str]:
    if wanted is None:
        common = set.intersection(*(set(o.columns) for o in obs))
        return [c for c in obs[0].columns if c in common]
    for i, o in enumerate(obs):
        missing = [c for c in wanted if c not in o.columns]
        if missing:
            msg = f"obs columns {missing} are missing from source {i}; it has {list(o.columns)}."
            raise KeyError(msg)
    return list(wanted)


def _union_genes(vars_: list[pd.DataFrame], names: list) -> tuple[pd.DataFrame,
                                                                  list[np.ndarray | None]]:
    """The union of the sources' genes by name, and each source's columns in it."""
    if len(vars_) == 1:
        return vars_[0].copy(), [None]
    for var, name in zip(vars_, names, strict=True):
        if not var.index.is_unique:
            msg = (f"var_names of {name} are not unique; a stream over several files joins "
                   "genes by name: call adata.var_names_make_unique() and save the file.")
            raise ValueError(msg)
    # keep the var columns every source has, so no column is part-missing
    common = [c for c in vars_[0].columns if all(c in v.columns for v in vars_)]
    var = pd.concat([v[common] for v in vars_])
    var = var[~var.index.duplicated()]
    columns = [var.index.get_indexer(v.index).astype(np.int64) for v in vars_]
    return var, [None if np.array_equal(c, np.arange(len(var))) else c for c in columns]


def _join_genes(vars_: list[pd.DataFrame], names: list, species: str | None, orthologs: str
                ) -> tuple[pd.DataFrame, list[np.ndarray | sparse.csr_matrix | None],
                           str | None]:
    """The stream's genes, each source's columns in them, and the stream's species.

    Sources of one species are joined by name (:func:`_union_genes`). Otherwise every
    source is resolved in its own species and joined on the Ensembl IDs of the stream's
    species, those of another species through ``orthologs``: a symbol match across
    species (``Ins2`` read as a human name) would miss every gene whose symbols differ.
    """
    from ..genes._orthologs import SpeciesMap, check_rule, species_of

    check_rule(orthologs)
    found = [_species_of(var) for var in vars_]
    target = species_of(species) if species is not None else next(
        (s for s in found if s is not None), None)
    if target is None or all(s in (None, target) for s in found):
        return (*_union_genes(vars_, names), species)
    from ..genes import gene_table, resolve

    edges = []  # per source: its columns, the target Ensembl ID of each, its width
    for var, own, name in zip(vars_, found, names, strict=True):
        report = resolve(_var_only(var), own or target, count_coverage=False)
        if report.species == target:
            cols = np.flatnonzero(report.matched)
            tgt = report.ensembl_id[cols].astype(str)
        else:
            smap = SpeciesMap.build(report, target, orthologs=orthologs)
            coo = smap.matrix.tocoo()
            cols, tgt = coo.row, smap.target_ids.to_numpy()[coo.col].astype(str)
            logg.info(f"    {name}: {len(np.unique(cols))} of {len(var)} {report.species} "
                      f"genes reach {len(np.unique(tgt))} {target} genes ({orthologs} "
                      "orthologs)")
        edges.append((cols, tgt, len(var)))
    union = pd.Index(pd.unique(np.concatenate([tgt for _, tgt, _ in edges])))
    union.name = None
    out = pd.DataFrame(index=union)
    out["feature_name"] = gene_table(target).symbol.reindex(union).to_numpy()
    columns = [sparse.csr_matrix((np.ones(len(cols), dtype=np.float32),
                                  (cols, union.get_indexer(tgt))), shape=(n, len(union)))
               for cols, tgt, n in edges]
    return out, columns, target


def _species_of(var: pd.DataFrame) -> str | None:
    """The species whose reference matches most of ``var``'s names (``None``: neither)."""
    from ..genes._resolve import infer_species

    return infer_species(_var_only(var))
