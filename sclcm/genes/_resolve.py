"""Map ``adata.var`` to Ensembl gene IDs of the shipped reference."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import logging as logg
from .._checks import InputError
from .._matrix import column_sums
from ._reference import ID_PREFIX, SPECIES, canonical_species, id_lookups, symbol_lookups
from ._report import GeneReport

if TYPE_CHECKING:
    from anndata import AnnData

#: ``var`` columns read as Ensembl IDs, in this order, before ``var_names``.
ID_COLUMNS = ("feature_id", "gene_ids", "ensembl_id", "gene_id", "ensembl")
#: ``var`` columns read as symbols, after ``var_names``.
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "symbol", "gene_name",
                  "gene_names")
_ENSEMBL = re.compile(r"^(ENS[A-Z]*G\d{6,})(?:\.\d+)?$")
# An ID inside a longer name, e.g. "HLA-B_ENSG00000234745" from a made-unique symbol.
_EMBEDDED = re.compile(r"(?:^|[_|:;\s])(ENS[A-Z]*G\d{11})(?:\.\d+)?(?:$|[_|:;\s])")
# What make_unique appends to repeated names ("-1", ".1", "_ENSG00000234745").
_UNIQUE_SUFFIX = re.compile(r"^(.+?)(?:[-.]\d+|_ENS[A-Z]*G\d{11}(?:\.\d+)?)$")


def _as_ids(values: pd.Index) -> np.ndarray:
    """Version-stripped Ensembl IDs where a value is or holds one, else ``None``."""
    values = pd.Series(values, dtype=object)
    full = values.str.extract(_ENSEMBL, expand=False)
    inside = values.str.extract(_EMBEDDED, expand=False)
    out = np.where(full.notna(), full, inside).astype(object)
    out[pd.isna(out)] = None
    return out


def _candidates(adata: AnnData) -> tuple[list, list]:
    """ID and symbol candidate arrays, each named by the column it came from."""
    var_names = pd.Index(adata.var_names.astype(str))
    ids, symbols = [], []
    for col in ID_COLUMNS:
        if col in adata.var.columns:
            ids.append((f"var[{col!r}]", _as_ids(pd.Index(adata.var[col].astype(str)))))
    ids.append(("var_names", _as_ids(var_names)))
    if var_names.str.contains(".", regex=False).any() and not var_names.str.contains(
            "-", regex=False).any():
        # R's make.names wrote every "-" as "." (KRTAP16-1 -> KRTAP16.1): read it back first
        symbols.append(("var_names", pd.Index(var_names.str.replace(".", "-", regex=False))))
    symbols.append(("var_names", var_names))
    for col in SYMBOL_COLUMNS:
        if col in adata.var.columns:
            symbols.append((f"var[{col!r}]", pd.Index(adata.var[col].astype(str))))
    return ids, symbols


def _infer_species(ids: list, symbols: list) -> tuple[str | None, dict[str, float]]:
    """The species whose reference matches most names, and the fraction each matches."""
    score = {}
    n = len(symbols[0][1])
    for sp in SPECIES:
        hit = np.zeros(n, dtype=bool)
        for _, arr in ids:
            hit |= pd.Series(arr, dtype=object).str.startswith(ID_PREFIX[sp], na=False).to_numpy()
        for _, names in symbols:
            hit |= symbol_lookups(sp)["symbol"].unique.index.get_indexer(names) >= 0
        score[sp] = float(hit.mean()) if n else 0.0
    best = max(score, key=score.get)
    return (best if score[best] > 0 else None), score


def infer_species(adata: AnnData) -> str | None:
    """The species whose reference matches most of ``adata``'s gene names (``None``:
    neither), as :func:`resolve` infers it."""
    return _infer_species(*_candidates(adata))[0]


def _resolve_symbols(names: pd.Index, lookups: dict, todo: np.ndarray, ensembl: np.ndarray,
                     method: np.ndarray, ambiguous: dict, label: str | None = None) -> None:
    """Fill ``ensembl``/``method`` in place for rows in ``todo`` found through ``names``.

    A row whose name fits several genes of a kind is recorded in ``ambiguous`` and not
    tried further: a weaker kind must not overrule a stronger one's ambiguity.
    """
    for kind, lookup in lookups.items():
        key = names.str.upper() if kind == "case_insensitive" else names
        found = lookup.get(key)
        hit = todo & (found != None)  # noqa: E711 (elementwise on an object array)
        ensembl[hit], method[hit] = found[hit], label or kind
        todo &= ~hit
        if lookup.ambiguous:
            rows = np.flatnonzero(todo & key.isin(lookup.ambiguous.keys()))
            for i in rows:
                ambiguous.setdefault(i, (names[i], lookup.ambiguous[key[i]]))
            todo[rows] = False


def resolve(adata: AnnData, species: str | None = None, *, layer: str | None = None,
            count_coverage: bool = True) -> GeneReport:
    """Map each gene of ``adata`` to an Ensembl ID of the shipped reference.

    Sources, in order: Ensembl IDs in ``var["feature_id"]``, ``var["gene_ids"]``,
    ``var["ensembl_id"]``, ``var["gene_id"]`` or Ensembl-looking ``var_names``
    (version suffixes stripped; IDs retired from the reference are mapped to their
    successor); then symbols in ``var_names`` or a symbol column, tried as current
    symbols, previous official symbols, NCBI aliases, mouse names of the human
    ortholog's previous symbols, case-insensitively, as a symbol of the other species
    with a single ortholog (mouse ``INS1`` in a human table), and finally by the stem of
    a name made unique (``UQCR11.1``, ``CCL5_ENSG00000161570``). Names from R's
    ``make.names`` (dots and no dash anywhere: ``KRTAP16.1``) are read with dashes first.
    A name that fits several genes is resolved to the one protein-coding gene among
    them, else to the gene that held the symbol earliest; otherwise it stays unresolved
    and is listed in ``report.ambiguous``.

    Never modifies ``adata``; use :meth:`GeneReport.collapse` for an AnnData with
    Ensembl IDs as ``var_names`` and duplicated genes summed.

    Parameters
    ----------
    adata
        Cells x genes, in memory or ``backed="r"``.
    species
        ``"human"`` or ``"mouse"`` (or ``"homo_sapiens"``, ``"mus_musculus"``); inferred
        from the names when ``None``.
    layer
        Where the counts are, for ``count_coverage``; ``adata.X`` when ``None``.
    count_coverage
        Sum the counts of each gene, for :attr:`GeneReport.count_coverage` (one pass
        over the matrix in row blocks).

    Returns
    -------
    GeneReport
        A :class:`GeneReport`: ``ensembl_id`` and ``method`` per gene, ``coverage``,
        ``count_coverage``, ``unmatched``, ``ambiguous`` and ``duplicates``.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> import sclcm
    >>> genes = ["ACTB", "GNB2L1", "ENSG00000111640", "not_a_gene"]
    >>> adata = ad.AnnData(np.ones((2, 4), dtype=np.float32),
    ...                    var=pd.DataFrame(index=genes))
    >>> report = sclcm.genes.resolve(adata)
    >>> report.species, report.coverage
    ('homo_sapiens', 0.75)
    >>> list(report.to_frame()["symbol"])
    ['ACTB', 'RACK1', 'GAPDH', None]
    """
    start = logg.info("resolving gene identities")
    if adata.n_vars == 0:
        msg = "The AnnData has no genes (adata.n_vars == 0)."
        raise InputError(msg)
    ids, symbols = _candidates(adata)
    inferred, score = _infer_species(ids, symbols)
    if species is None:
        if inferred is None:
            msg = (f"None of the {adata.n_vars} genes (e.g. {list(adata.var_names[:3])}) is a "
                   "human or mouse Ensembl ID or symbol. Put Ensembl IDs or symbols in "
                   f"var_names or in one of the columns {ID_COLUMNS + SYMBOL_COLUMNS}.")
            raise InputError(msg)
        species = inferred
    species = canonical_species(species)

    n = adata.n_vars
    ensembl = np.full(n, None, dtype=object)
    method = np.full(n, "", dtype=object)
    ambiguous: dict[int, tuple[str, tuple[str, ...]]] = {}
    todo = np.ones(n, dtype=bool)
    for _, arr in ids:
        keys = pd.Index([a or "" for a in arr])
        for kind, lookup in id_lookups(species).items():
            found = lookup.get(keys)
            hit = todo & (found != None)  # noqa: E711
            ensembl[hit], method[hit] = found[hit], kind
            todo &= ~hit
    lookups = symbol_lookups(species)
    for _, names in symbols:
        _resolve_symbols(names, lookups, todo, ensembl, method, ambiguous)
    stem_lookups = {k: lookups[k] for k in ("symbol", "previous")}
    # Names made unique ("UQCR11.1", "TBCE-1", "CCL5_ENSG00000161570"): their stem as a
    # current or previous symbol.
    stems = pd.Series(symbols[0][1]).str.extract(_UNIQUE_SUFFIX, expand=False)
    suffixed = todo & stems.notna().to_numpy()
    if suffixed.any():
        _resolve_symbols(pd.Index(stems.fillna("")), stem_lookups, suffixed, ensembl, method,
                         ambiguous, "unique_suffix")
    ambiguous = dict(v for i, v in ambiguous.items() if ensembl[i] is None)

    if not (ensembl != None).any():  # noqa: E711
        other = max((s for s in score if s != species), key=score.get)
        msg = (f"None of the {n} genes matches the {species} reference (e.g. "
               f"{list(adata.var_names[:3])}).")
        if score[other] > 0:
            msg += f" {score[other]:.0%} match {other}: pass species={other!r}."
        raise InputError(msg)
    counts = column_sums(adata, layer) if count_coverage else None
    report = GeneReport(species=species, var_names=pd.Index(adata.var_names),
                        ensembl_id=ensembl, method=method, var_counts=counts,
                        ambiguous=ambiguous)
    logg.info(f"    {report.n_matched} of {n} genes resolved ({report.coverage:.1%}"
              + (f", {report.count_coverage:.1%} of counts)" if counts is not None else ")"),
              time=start)
    if report.duplicates:
        logg.hint(f"{len(report.duplicates)} Ensembl IDs are shared by several columns; "
                  "report.collapse(adata) sums them")
    return report
