"""The result of gene resolution: what matched, how, and what it covers."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._matrix import get_matrix, iter_row_blocks
from ._reference import canonical_species, gene_table, ortholog_table

if TYPE_CHECKING:
    from anndata import AnnData


@dataclass(frozen=True, eq=False)
class GeneReport:
    """Per-gene Ensembl IDs of an AnnData and how they were found.

    Made by :func:`sclcm.genes.resolve`; aligned with the AnnData's columns.

    Attributes
    ----------
    species
        ``"homo_sapiens"`` or ``"mus_musculus"``: the reference ``ensembl_id`` is in.
    var_names
        The AnnData's ``var_names``.
    ensembl_id
        Ensembl gene ID per column, ``None`` where unresolved.
    method
        How each column was resolved: ``"ensembl_id"``, ``"retired_id"``, ``"symbol"``,
        ``"previous"``, ``"alias"``, ``"ortholog_previous"``, ``"unique_suffix"``,
        ``"case_insensitive"``, ``"other_species"``, ``"unique_suffix"``, or ``""`` where
        unresolved.
    var_counts
        Total counts per column (``None`` if not computed).
    ambiguous
        Unresolved names that fit several genes, with their candidate IDs.
    source
        The report in the original species when this one was mapped through orthologs.
    """

    species: str
    var_names: pd.Index
    ensembl_id: np.ndarray
    method: np.ndarray
    var_counts: np.ndarray | None = None
    ambiguous: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: GeneReport | None = None

    # --- what matched ---------------------------------------------------------------
    @cached_property
    def matched(self) -> np.ndarray:
        """Boolean mask of resolved columns."""
        return np.array([i is not None for i in self.ensembl_id], dtype=bool)

    @property
    def n_matched(self) -> int:
        return int(self.matched.sum())

    @property
    def unmatched(self) -> list[str]:
        """Names of the columns left unresolved."""
        return list(self.var_names[~self.matched])

    @property
    def coverage(self) -> float:
        """Fraction of columns resolved."""
        return self.n_matched / len(self.var_names) if len(self.var_names) else 0.0

    @property
    def count_coverage(self) -> float | None:
        """Fraction of all counts that fall in resolved columns."""
        if self.var_counts is None:
            return None
        total = self.var_counts.sum()
        return float(self.var_counts[self.matched].sum() / total) if total > 0 else 0.0

    @cached_property
    def duplicates(self) -> dict[str, list[str]]:
        """Ensembl IDs that several columns resolve to, with those columns' names.

        :meth:`collapse` and :meth:`aggregation_matrix` sum such columns, as Geneformer
        collapses duplicated Ensembl IDs.
        """
        ids = pd.Series(self.ensembl_id[self.matched], index=self.var_names[self.matched])
        dup = ids[ids.duplicated(keep=False)]
        return {k: list(v.index) for k, v in dup.groupby(dup, sort=False)}

    @property
    def symbols(self) -> np.ndarray:
        """Current reference symbol of each resolved column (``None`` elsewhere)."""
        table = gene_table(self.species).symbol
        out = np.full(len(self.ensembl_id), None, dtype=object)
        out[self.matched] = table.reindex(self.ensembl_id[self.matched]).to_numpy()
        return out

    def methods(self) -> pd.Series:
        """Number of columns resolved by each method (``"unresolved"`` for the rest)."""
        m = pd.Series(np.where(self.matched, self.method, "unresolved"))
        return m.value_counts()

    def to_frame(self) -> pd.DataFrame:
        """One row per column: ``ensembl_id``, ``symbol``, ``method``, ``counts``."""
        df = pd.DataFrame({"ensembl_id": self.ensembl_id, "symbol": self.symbols,
                           "method": self.method}, index=self.var_names)
        if self.var_counts is not None:
            df["counts"] = self.var_counts
        return df

    def summary(self) -> dict:
        """Plain-type summary, fit for ``adata.uns`` or JSON."""
        out = {"species": self.species, "n_genes": len(self.var_names),
               "n_matched": self.n_matched, "coverage": self.coverage,
               "count_coverage": self.count_coverage, "n_duplicated_ids": len(self.duplicates),
               "n_ambiguous": len(self.ambiguous),
               "methods": {k: int(v) for k, v in self.methods().items()}}
        if self.source is not None:
            out["source_species"] = self.source.species
            out["ortholog_coverage"] = self.ortholog_coverage
        return out

    def __repr__(self) -> str:
        cc = self.count_coverage
        text = (f"GeneReport({self.species}: {self.n_matched}/{len(self.var_names)} genes "
                f"resolved ({self.coverage:.1%})"
                + (f", {cc:.1%} of counts" if cc is not None else "")
                + f", {len(self.duplicates)} duplicated IDs, {len(self.ambiguous)} ambiguous")
        if self.source is not None:
            text += f", mapped from {self.source.species}"
        return text + ")"

    # --- orthologs ---------------------------------------------------------------
    @property
    def ortholog_coverage(self) -> float | None:
        """Of the columns resolved in the source species, the fraction with an ortholog."""
        if self.source is None:
            return None
        n = self.source.n_matched
        return self.n_matched / n if n else 0.0

    def to_species(self, species: str) -> GeneReport:
        """This report with IDs mapped to one-to-one orthologs in ``species``.

        Columns without a one-to-one ortholog become unresolved; ``source`` keeps this
        report and :attr:`ortholog_coverage` says what fraction carried over.

        >>> import anndata as ad, numpy as np, pandas as pd
        >>> import sclcm
        >>> adata = ad.AnnData(np.ones((1, 3), dtype=np.float32),
        ...                    var=pd.DataFrame(index=["Actb", "Gapdh", "Xist"]))
        >>> human = sclcm.genes.resolve(adata).to_species("human")
        >>> list(human.symbols), human.ortholog_coverage
        (['ACTB', 'GAPDH', None], 0.6666666666666666)
        """
        species = canonical_species(species)
        if species == self.species:
            return self
        ids = map_orthologs(self.ensembl_id, source=self.species, target=species)
        method = np.where(ids != None, self.method, "")  # noqa: E711
        return replace(self, species=species, ensembl_id=ids, method=method, source=self,
                       ambiguous={})

    # --- summing duplicated genes -------------------------------------------------
    @cached_property
    def unique_ids(self) -> pd.Index:
        """Resolved Ensembl IDs without repeats, in the order of first appearance."""
        return pd.Index(pd.unique(self.ensembl_id[self.matched]))

    def aggregation_matrix(self) -> sparse.csr_matrix:
        """Sparse ``n_vars x len(unique_ids)`` 0/1 matrix: ``X @ M`` sums duplicated genes.

        Unresolved columns have no entry, so they drop out.
        """
        rows = np.flatnonzero(self.matched)
        cols = self.unique_ids.get_indexer(self.ensembl_id[rows])
        data = np.ones(len(rows), dtype=np.float32)
        return sparse.csr_matrix((data, (rows, cols)),
                                 shape=(len(self.var_names), len(self.unique_ids)))

    def collapse(self, adata: AnnData, *, layer: str | None = None) -> AnnData:
        """A new AnnData over resolved genes: Ensembl IDs as ``var_names``, duplicates summed.

        Reads ``adata`` in row blocks (``backed="r"`` works) and leaves it unchanged;
        unresolved genes are dropped. ``var`` gets ``symbol`` and ``n_merged``;
        ``uns["sclcm_genes"]`` gets :meth:`summary`.
        """
        import anndata as ad

        if adata.n_vars != len(self.var_names) or not adata.var_names.equals(self.var_names):
            msg = ("This report was made for another AnnData (its var_names differ); call "
                   "sclcm.genes.resolve(adata) on this one.")
            raise ValueError(msg)
        M = self.aggregation_matrix()
        dtype = np.result_type(get_matrix(adata, layer).dtype, np.float32)
        blocks = [sparse.csr_matrix(sparse.csr_matrix(b) @ M, dtype=dtype)
                  for _, _, b in iter_row_blocks(adata, layer, desc="collapsing genes")]
        X = sparse.vstack(blocks, format="csr") if blocks else sparse.csr_matrix(
            (0, M.shape[1]), dtype=dtype)
        var = pd.DataFrame(index=self.unique_ids.copy())
        var.index.name = None
        var["symbol"] = gene_table(self.species).symbol.reindex(self.unique_ids).to_numpy()
        var["n_merged"] = np.asarray(M.sum(axis=0)).ravel().astype(np.int32)
        obs = adata.obs.copy()
        return ad.AnnData(X=X, obs=obs, var=var, uns={"sclcm_genes": self.summary()})


def map_orthologs(ids, *, source: str, target: str) -> np.ndarray:
    """Map Ensembl IDs of ``source`` species to their one-to-one orthologs in ``target``.

    Returns an object array aligned with ``ids``, ``None`` where there is no one-to-one
    ortholog (or the input is ``None``).

    >>> map_orthologs(["ENSMUSG00000029580", "ENSMUSG00000000001"],
    ...               source="mouse", target="human")
    array(['ENSG00000075624', 'ENSG00000065135'], dtype=object)
    """
    source, target = canonical_species(source), canonical_species(target)
    ids = np.asarray(ids, dtype=object)
    if source == target:
        return ids.copy()
    table = ortholog_table()
    table = table[table.one2one]
    col = {"homo_sapiens": "human_id", "mus_musculus": "mouse_id"}
    mapping = pd.Series(table[col[target]].to_numpy(), index=table[col[source]].to_numpy())
    pos = mapping.index.get_indexer(pd.Index([i or "" for i in ids]))
    out = mapping.to_numpy()[pos].astype(object)
    out[pos < 0] = None
    return out
