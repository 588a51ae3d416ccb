"""Moving a query's genes onto another species' genes: the ortholog rule and what it covers.

Two rules, read from the shipped Ensembl BioMart / HCOP table (:func:`ortholog_table`):

- ``"one2one"``: only genes with exactly one ortholog each way (the default, and what
  :meth:`GeneReport.to_species` does);
- ``"all"``: every ortholog pair, one-to-many and many-to-many included.

Under ``"all"`` a query gene with several orthologs gives **its whole count to each of
them** (copied, not divided), and several query genes with one ortholog are **summed** onto
it. Copying keeps what the model reads: a gene's rank among the cell's genes (Geneformer),
its value bin (scGPT), its log level (scBERT) are those it would have had as the only
ortholog, whereas a share of ``1/n`` would push a gene with two paralogs down the ranking
for no biological reason, and would leave non-integer counts that the count-reading
families refuse. Summing many-to-one is what sclcm already does for two columns naming
one gene, and what the query gene family expresses in total. The price is that a cell's
total grows by the copied counts; the coverage record gives that share
(``count_inflation``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import sparse

from .._checks import InputError
from ._reference import canonical_species, gene_table, ortholog_table

if TYPE_CHECKING:
    from anndata import AnnData

    from ._report import GeneReport

#: The ortholog rules, in the order they are documented.
ORTHOLOG_RULES = ("one2one", "all")
_ID_COLUMN = {"homo_sapiens": "human_id", "mus_musculus": "mouse_id"}


def check_rule(orthologs: str) -> str:
    """``orthologs`` if it is one of ``sclcm.genes.ORTHOLOG_RULES``, else an :class:`InputError`."""
    if orthologs not in ORTHOLOG_RULES:
        msg = (f"orthologs must be one of {ORTHOLOG_RULES} (one-to-one orthologs only, or "
               f"every ortholog pair), not {orthologs!r}.")
        raise InputError(msg)
    return orthologs


def species_of(species: str) -> str:
    """:func:`canonical_species`, raising :class:`InputError` (a ``ValueError``)."""
    try:
        return canonical_species(species)
    except ValueError as err:
        raise InputError(str(err)) from None


def ortholog_pairs(source: str, target: str, *, orthologs: str = "one2one",
                   table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Ortholog pairs from ``source`` to ``target`` species under the rule ``orthologs``.

    Returns a frame with columns ``source`` and ``target`` (Ensembl IDs), one row per
    pair. ``table`` replaces the shipped :func:`~sclcm.genes.ortholog_table` (columns ``human_id``,
    ``mouse_id``, ``one2one``), e.g. to test a rule on hand-made pairs.

    >>> pairs = ortholog_pairs("mouse", "human", orthologs="all")
    >>> len(pairs) > len(ortholog_pairs("mouse", "human"))
    True
    """
    source, target = species_of(source), species_of(target)
    check_rule(orthologs)
    if source == target:
        msg = f"source and target are both {source}: there is nothing to map."
        raise InputError(msg)
    table = ortholog_table() if table is None else table
    if orthologs == "one2one":
        table = table[table["one2one"].astype(bool)]
    pairs = pd.DataFrame({"source": table[_ID_COLUMN[source]].to_numpy(),
                          "target": table[_ID_COLUMN[target]].to_numpy()})
    return pairs.drop_duplicates().reset_index(drop=True)


@dataclass(frozen=True, eq=False)
class SpeciesMap:
    """How the columns of an AnnData of one species reach the genes of another.

    Made by :meth:`build`. ``matrix`` is ``n_vars x len(target_ids)``, 0/1: ``X @ matrix``
    gives the counts on the target species' genes (a column's count copied onto each of
    its orthologs, several columns summed onto a shared one).

    Attributes
    ----------
    report
        Gene resolution of the AnnData in its own species.
    species
        The target species.
    orthologs
        The rule, ``"one2one"`` or ``"all"``.
    matrix
        Sparse CSR, ``n_vars x len(target_ids)``.
    target_ids
        Ensembl IDs of the target genes reached by at least one column.
    """

    report: GeneReport
    species: str
    orthologs: str
    matrix: sparse.csr_matrix
    target_ids: pd.Index

    @classmethod
    def build(cls, report: GeneReport, species: str, *, orthologs: str = "one2one",
              table: pd.DataFrame | None = None) -> SpeciesMap:
        """Map ``report``'s resolved columns to ``species`` under the rule ``orthologs``."""
        species = species_of(species)
        pairs = ortholog_pairs(report.species, species, orthologs=orthologs, table=table)
        cols = pd.DataFrame({"column": np.flatnonzero(report.matched),
                             "source": report.ensembl_id[report.matched]})
        edges = cols.merge(pairs, on="source", how="inner")
        target_ids = pd.Index(pd.unique(edges["target"]))
        matrix = sparse.csr_matrix(
            (np.ones(len(edges), dtype=np.float32),
             (edges["column"].to_numpy(), target_ids.get_indexer(edges["target"]))),
            shape=(len(report.var_names), len(target_ids)))
        return cls(report, species, orthologs, matrix, target_ids)

    # --- what reaches what ------------------------------------------------------
    @cached_property
    def n_targets(self) -> np.ndarray:
        """How many target genes each column reaches (0 without an ortholog)."""
        return np.diff(self.matrix.indptr)

    def reach(self, keep: np.ndarray | None = None) -> sparse.csr_matrix:
        """``matrix`` restricted to the target genes where ``keep`` (bool per target)."""
        if keep is None:
            return self.matrix
        return sparse.csr_matrix(self.matrix @ sparse.diags(keep.astype(np.float32)))

    def apply(self, X, *, keep: np.ndarray | None = None) -> sparse.csr_matrix:
        """Counts of the rows of ``X`` (sparse or dense) on the target genes."""
        X = sparse.csr_matrix(X)
        dtype = np.result_type(X.dtype, np.float32)
        return sparse.csr_matrix(X @ self.reach(keep), dtype=dtype)

    def coverage(self, in_vocab: np.ndarray | None = None,
                 var_counts: np.ndarray | None = None) -> dict:
        """What of the query reaches the target genes (those where ``in_vocab``, a bool per
        :attr:`target_ids`; all when ``None``), as plain types for ``uns``.

        ``n_genes`` columns; ``n_genes_resolved`` resolved in their species;
        ``n_genes_mapped`` with at least one ortholog under the rule;
        ``n_genes_in_vocab`` with at least one in the vocabulary (``gene_coverage`` of
        ``n_genes``); ``n_one_to_many`` of those copied onto several vocabulary genes;
        ``n_vocab_genes`` vocabulary genes reached, ``n_many_to_one`` of them fed by several
        columns; with ``var_counts`` (per column): ``count_coverage``, the share of the
        query's counts on columns that reach the vocabulary, and ``count_inflation``, the
        counts the model reads over the query's counts on those columns (1 for one-to-one).
        """
        M = self.reach(in_vocab)
        M.eliminate_zeros()
        per_column = np.diff(M.indptr)
        per_target = np.asarray((M != 0).sum(axis=0)).ravel()
        reached = per_column > 0
        out = {"orthologs": self.orthologs, "source_species": self.report.species,
               "target_species": self.species, "n_genes": len(self.report.var_names),
               "n_genes_resolved": self.report.n_matched,
               "n_genes_mapped": int((self.n_targets > 0).sum()),
               "n_genes_in_vocab": int(reached.sum()),
               "gene_coverage": float(reached.mean()) if len(reached) else 0.0,
               "n_one_to_many": int((per_column > 1).sum()),
               "n_vocab_genes": int((per_target > 0).sum()),
               "n_many_to_one": int((per_target > 1).sum())}
        if var_counts is not None:
            counts = np.asarray(var_counts, dtype=np.float64)
            total, on = counts.sum(), counts[reached].sum()
            out["count_coverage"] = float(on / total) if total > 0 else 0.0
            out["count_inflation"] = float(counts @ per_column / on) if on > 0 else 1.0
        return out

    def lost(self, in_vocab: np.ndarray | None = None) -> pd.DataFrame:
        """Resolved columns that reach no (vocabulary) gene: ``ensembl_id``, ``symbol``,
        ``n_orthologs`` (under ``"all"``, in the whole table)."""
        reached = np.diff(self.reach(in_vocab).indptr) > 0
        rows = self.report.matched & ~reached
        frame = self.report.to_frame()[rows]
        every = ortholog_pairs(self.report.species, self.species, orthologs="all")
        n_all = every.groupby("source").size()
        frame = frame.assign(n_orthologs=n_all.reindex(frame["ensembl_id"]).fillna(0)
                             .astype(int).to_numpy())
        return frame.drop(columns=["method"])


def to_species(adata: AnnData, species: str, *, orthologs: str = "one2one",
               layer: str | None = None, report: GeneReport | None = None) -> AnnData:
    """A new AnnData of ``adata``'s cells on the genes of ``species``, through orthologs.

    ``var_names`` are the target species' Ensembl IDs (``var["symbol"]`` their symbols,
    ``var["n_source"]`` how many of ``adata``'s columns were summed into each); counts are
    moved as the rule says (``"all"``: a gene's count copied onto each of its orthologs,
    several genes summed onto one; ``docs/cross_species.md`` says why). ``adata`` is read
    in row blocks (``backed="r"`` works) and never changed: its ``var`` keeps its names.
    ``uns["sclcm_orthologs"]`` gets :meth:`~sclcm.genes.SpeciesMap.coverage`.

    Raises
    ------
    sclcm.InputError
        A species the shipped tables do not hold, an unknown rule, ``species`` equal to
        the data's own, or no gene with an ortholog.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> import sclcm
    >>> mouse = ad.AnnData(np.array([[1, 2, 3]], dtype=np.float32),
    ...                    var=pd.DataFrame(index=["Actb", "Gapdh", "Xist"]))
    >>> human = sclcm.genes.to_species(mouse, "human")
    >>> list(human.var["symbol"]), human.X.toarray().tolist()
    (['ACTB', 'GAPDH'], [[1.0, 2.0]])
    """
    import anndata as ad

    from .._matrix import get_matrix, iter_row_blocks
    from ._resolve import resolve

    species = species_of(species)
    check_rule(orthologs)
    if report is None:
        report = resolve(adata, layer=layer)
    smap = SpeciesMap.build(report, species, orthologs=orthologs)
    if not len(smap.target_ids):
        msg = (f"None of the {adata.n_vars} {report.species} genes has a {orthologs} "
               f"ortholog in {species}; check sclcm.genes.resolve(adata).")
        raise InputError(msg)
    blocks = [smap.apply(b) for _, _, b in iter_row_blocks(adata, layer,
                                                            desc="mapping orthologs")]
    dtype = np.result_type(get_matrix(adata, layer).dtype, np.float32)
    X = sparse.vstack(blocks, format="csr").astype(dtype)
    var = pd.DataFrame(index=smap.target_ids.copy())
    var.index.name = None
    var["symbol"] = gene_table(species).symbol.reindex(smap.target_ids).to_numpy()
    var["n_source"] = np.asarray(smap.matrix.sum(axis=0)).ravel().astype(np.int32)
    counts = report.var_counts
    if counts is None:
        counts = np.asarray(sum(b.sum(axis=0) for _, _, b in iter_row_blocks(
            adata, layer))).ravel()
    record = smap.coverage(var_counts=counts)
    return ad.AnnData(X=X, obs=adata.obs.copy(), var=var, uns={"sclcm_orthologs": record})
