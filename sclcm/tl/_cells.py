"""The cells of an AnnData as the model's tokens, block by block (shared by the tools)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from .._checks import InputError, _where, check_obs_names
from .._matrix import check_dtype, get_matrix, iter_row_blocks, stored_values
from .._progress import progress

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anndata import AnnData

    from ..genes import GeneReport, SpeciesMap
    from ..tokenizers import ColumnMap, TokenBatch, Tokenizer


def check_tool_input(adata: AnnData, layer: str | None, *, copy: bool = False) -> None:
    """Checks every tool makes before loading a model, so that no work is lost to them: a
    non-empty AnnData with unique cell names, an existing ``layer`` of a numeric dtype, no
    ``copy`` of a backed object (it would load ``X`` into memory), and no view of a backed
    object (results cannot be written to it without loading its ``X``)."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        msg = f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes)."
        raise InputError(msg)
    if layer is not None and layer not in adata.layers:
        msg = f"layer {layer!r} is not in adata.layers ({list(adata.layers)})."
        raise InputError(msg)
    check_obs_names(adata)
    check_dtype(get_matrix(adata, layer),
                "adata.X" if layer is None else f"adata.layers[{layer!r}]")
    if adata.isbacked and adata.is_view:
        # anndata makes a written view real by copying it, which a backed view cannot do
        # without a file name (and indexing it again, e.g. to subsample, is refused)
        msg = ("This is a view of a backed AnnData: sclcm cannot write results to it (anndata "
               "would have to load its X). Either load the subset, "
               "sub = adata[mask].to_memory(), and run on sub; or run on the whole backed "
               "object and subset the result, e.g. adata.obsm['X_sclcm'][mask].")
        raise InputError(msg)
    if copy and adata.isbacked:
        msg = ("copy=True on a backed AnnData would load X into memory: use copy=False (the "
               "results are kept on the object in memory), or adata.to_memory() first.")
        raise ValueError(msg)


#: Share of counts on the model's genes below which the tools warn.
LOW_COUNT_COVERAGE = 0.9


def output_object(adata: AnnData, *, copy: bool) -> AnnData:
    """The object a tool writes its results to: a copy, or ``adata`` itself, a view being
    made real first as scanpy does (writing to a view would otherwise warn and copy)."""
    if copy:
        return adata.copy()
    if adata.is_view:
        adata._init_as_actual(adata.copy())
    return adata


@dataclass
class CellTokens:
    """How an AnnData's columns feed a tokenizer, and its cells block by block.

    Attributes
    ----------
    tokenizer
        The model's tokenizer.
    report
        Gene resolution of the AnnData.
    column_map
        Column -> token slot (genes outside the vocabulary dropped).
    gene_coverage
        Share of the AnnData's genes that reach a token.
    count_coverage
        Share of the counts read by the last :meth:`batches` that fall on such genes
        (``nan`` before any block was read).
    """

    adata: AnnData
    tokenizer: Tokenizer
    report: GeneReport
    column_map: ColumnMap
    layer: str | None = None
    #: Counts read by :meth:`batches` so far: all, and those on genes that reach a token.
    counts_read: float = 0.0
    counts_in_vocab: float = 0.0
    #: Where the AnnData's species differs from the vocabulary's: how its genes reach the
    #: vocabulary's species (:class:`~sclcm.genes.SpeciesMap`), and, under
    #: ``orthologs="all"``, the 0/1 matrix (columns x the vocabulary genes reached, and a
    #: last column that gathers the other counts) that moves each block's counts there
    #: before tokenizing (``column_map`` is then over its columns).
    species_map: SpeciesMap | None = None
    expand: sparse.csr_matrix | None = None
    #: Counts the model reads after the ortholog rule (copies included), for the record.
    counts_to_model: float = 0.0

    @classmethod
    def prepare(cls, adata: AnnData, tokenizer: Tokenizer, *, layer: str | None = None,
                report: GeneReport | None = None, orthologs: str | None = None
                ) -> CellTokens:
        """Resolve genes once and map the columns to ``tokenizer``'s tokens.

        ``orthologs`` is the rule for an AnnData whose species is not the vocabulary's
        (:data:`sclcm.genes.ORTHOLOG_RULES`; ``None``: ``"one2one"``). Raises
        :class:`~sclcm.InputError` for an empty AnnData, a missing layer, an unknown rule
        or no gene of the vocabulary.
        """
        from ..genes import SpeciesMap, resolve
        from ..genes._orthologs import check_rule
        from ..tokenizers import ColumnMap

        check_tool_input(adata, layer)
        rule = check_rule("one2one" if orthologs is None else orthologs)
        if report is None:
            report = resolve(adata, count_coverage=False)
        species = tokenizer.vocab.species
        if species is None or report.species == species:
            return cls(adata, tokenizer, report, tokenizer.column_map(adata, report=report),
                       layer)
        smap = SpeciesMap.build(report, species, orthologs=rule)
        if rule == "one2one":  # the tokenizer's own path: one column, one slot
            return cls(adata, tokenizer, report, tokenizer.column_map(adata, report=report),
                       layer, species_map=smap)
        ids = tokenizer.token_ids_of_genes(tokenizer.vocab.encode(smap.target_ids))
        if not (ids >= 0).any():
            msg = ("None of the AnnData's genes has an ortholog in this tokenizer's "
                   f"vocabulary ({tokenizer.vocab!r}); check sclcm.genes.resolve(adata) "
                   "and the species.")
            raise InputError(msg)
        keep = np.flatnonzero(ids >= 0)
        expand = sparse.csr_matrix(smap.matrix[:, keep])
        # a last column without a token keeps the other counts in each cell's total, which
        # the tokenizers normalize by (so a one-to-one gene reads as it does under one2one)
        rest = (np.diff(expand.indptr) == 0).astype(np.float32)[:, None]
        expand = sparse.hstack([expand, sparse.csr_matrix(rest)], format="csr")
        cmap = ColumnMap.from_token_ids(np.r_[ids[keep], -1])
        return cls(adata, tokenizer, report, cmap, layer, species_map=smap, expand=expand)

    @property
    def in_vocab(self) -> np.ndarray:
        """Per column of the AnnData: whether its counts reach a token."""
        if self.expand is not None:
            return self.expand[:, -1].toarray().ravel() == 0
        return self.column_map.slot >= 0

    @property
    def gene_coverage(self) -> float:
        return float(self.in_vocab.mean())

    def species_record(self) -> dict | None:
        """Where the species was mapped: :meth:`~sclcm.genes.SpeciesMap.coverage` over the
        vocabulary, with the counts read by the last :meth:`batches` (``count_coverage``:
        share of the AnnData's counts that reach a token; ``count_inflation``: counts the
        model reads over those, above 1 where ``"all"`` copies a count onto several
        orthologs). ``None`` where the species is the vocabulary's."""
        smap = self.species_map
        if smap is None:
            return None
        tok = self.tokenizer
        usable = tok.token_ids_of_genes(tok.vocab.encode(smap.target_ids)) >= 0
        record = smap.coverage(usable)
        record["count_coverage"] = self.count_coverage
        record["count_inflation"] = (self.counts_to_model / self.counts_in_vocab
                                     if self.counts_in_vocab else float("nan"))
        return record

    @property
    def count_coverage(self) -> float:
        return self.counts_in_vocab / self.counts_read if self.counts_read else float("nan")

    def warn_low_coverage(self, threshold: float = LOW_COUNT_COVERAGE) -> None:
        """Warn when less than ``threshold`` of the counts read fell on the model's genes.

        The share of counts, not of genes, is what the model misses: most genes of a full
        gene space are never expressed (pbmc3k: 34% of its genes, 99% of its counts reach
        the default model), while a tissue the corpus lacks loses its markers (Baron human
        pancreas: 52% of genes, 80% of counts).
        """
        from .. import logging as logg

        record = self.species_record()
        if record is not None:
            logg.info(f"    orthologs={record['orthologs']!r}: {record['n_genes_in_vocab']} of "
                      f"{record['n_genes']} {record['source_species']} genes "
                      f"({record['gene_coverage']:.1%}) and {self.count_coverage:.1%} of the "
                      f"counts reach the model's {record['target_species']} vocabulary")
        if self.count_coverage < threshold:
            n_in = int(self.in_vocab.sum())
            logg.warning(
                f"only {self.count_coverage:.0%} of the counts (and {n_in} of "
                f"{len(self.in_vocab)} genes) reach the model's vocabulary: the "
                "model does not see the rest, and tissue markers may be among them. Check "
                "sclcm.genes.resolve(adata) (symbols, species) or use a model trained on "
                "this tissue.")

    def _check_block(self, block, first: int) -> None:
        """Raise :class:`~sclcm.InputError` for NaN/inf or negative values in ``block``
        (rows ``first`` on), and non-integer ones where the tokenizer reads raw counts
        (``tokenizer.requires_counts``), naming the first offending cell and gene and why
        the family needs counts."""
        where = "adata.X" if self.layer is None else f"adata.layers[{self.layer!r}]"
        values = stored_values(block)
        if not np.issubdtype(values.dtype, np.number) or values.size == 0:
            return
        problems = [
            (lambda v: ~np.isfinite(v), "NaN or infinite values",
             "Fix or drop those cells first (sclcm.pp.check_counts lists them)."),
            (lambda v: v < 0, "negative values: it looks scaled or batch-corrected",
             "Pass layer= the layer with raw counts, or use adata.raw.to_adata()."),
        ]
        if self.tokenizer.requires_counts:
            name = self.tokenizer.name
            why = COUNTS_REASON.get(name, "it normalizes the counts itself")
            problems.append((lambda v: v != np.round(v),
                             "non-integer values: it looks normalized or log-transformed",
                             f"A {name} model reads raw counts: {why}. Pass layer= the layer "
                             "with raw counts (e.g. layer='counts'), or use "
                             "adata.raw.to_adata() if it holds counts."))
        for bad, what, fix in problems:
            if bad(values).any():
                loc = _where(self.adata, block, first, bad)
                msg = f"{where} contains {what} (first at {loc}). {fix}"
                raise InputError(msg)

    def batches(self, *, block_size: int = 2048, desc: str | None = None
                ) -> Iterator[tuple[int, TokenBatch, np.ndarray]]:
        """Yield ``(first_row, batch, empty)`` per block of rows, with a progress bar of cells.

        Every cell of the block is in ``batch``, so row ``i`` of the block is cell ``i`` of
        the batch. ``empty`` marks the cells with no count on any gene of the model's
        vocabulary: they keep only their special tokens (scBERT, and scGPT with
        ``include_zero_genes``, give them their panel with all values zero). Memory is
        one block, whatever the number of cells. Adds up :attr:`count_coverage` on the way.
        Values the tokenizer cannot read raise :class:`~sclcm.InputError` (see
        :meth:`_check_block`) before their block is yielded.
        """
        blocks = iter_row_blocks(self.adata, self.layer, block_size=block_size)
        self.counts_read = self.counts_in_vocab = self.counts_to_model = 0.0
        in_vocab = self.in_vocab
        # counted in cells: in blocks, a run of fewer cells than a block sat at 0/1
        for first, _, block in progress(blocks, total=self.adata.n_obs, desc=desc,
                                        unit="cells", size=lambda item: item[2].shape[0]):
            moved = block
            if self.expand is not None:  # orthologs="all": counts onto every ortholog
                moved = sparse.csr_matrix(sparse.csr_matrix(block) @ self.expand,
                                          dtype=np.result_type(block.dtype, np.float32))
            try:
                batch = self.tokenizer.encode(moved, self.column_map, start=first,
                                              keep_empty=True)
            except InputError:  # the tokenizer sees every value but names none: name it
                self._check_block(block, first)  # in the user's own genes
                raise
            vocab_counts = _vocab_counts(block, in_vocab)
            self.counts_read += float(block.sum(dtype=np.float64))
            self.counts_in_vocab += float(vocab_counts.sum())
            self.counts_to_model += float(moved[:, :-1].sum(dtype=np.float64)) \
                if self.expand is not None else float(vocab_counts.sum())
            yield first, batch, _empty_cells(batch, self.tokenizer) | (vocab_counts == 0)


#: Why each family that reads counts cannot take normalized or log data (for the errors).
COUNTS_REASON = {
    "geneformer": "it ranks genes by counts / the cell's total / the gene's corpus median; "
                  "normalize_total alone would leave that ranking as it is, but log1p changes "
                  "it, and the two cannot be told apart from the values",
    "scbert": "it computes log2(1 + counts / total x 10,000) itself, so log data would be "
              "transformed twice",
    "scfoundation": "its read-depth tokens are log10 of each cell's total counts, which "
                    "normalization erases",
    "scgpt": "with binned=False its values are log1p(counts / total x 10,000), computed from "
             "counts (binned scGPT reads normalized or log data too)",
}


def _vocab_counts(block, in_vocab: np.ndarray) -> np.ndarray:
    """Per cell of a block (CSR or dense): the sum of its counts on vocabulary genes."""
    if sparse.issparse(block):
        data = np.where(in_vocab[block.indices], block.data, 0).astype(np.float64)
        out = np.add.reduceat(data, block.indptr[:-1]) if data.size else \
            np.zeros(block.shape[0])
        out[np.diff(block.indptr) == 0] = 0  # reduceat repeats the next value on empty rows
        return out
    return np.asarray(block)[:, in_vocab].sum(axis=1, dtype=np.float64)


def _empty_cells(batch: TokenBatch, tokenizer: Tokenizer) -> np.ndarray:
    """Cells of ``batch`` with no gene token (only special tokens)."""
    is_gene = batch.gene_ids >= len(tokenizer.vocab.special_tokens)
    genes = np.add.reduceat(is_gene, batch.offsets[:-1]) if len(is_gene) else \
        np.zeros(batch.n_cells, np.int64)
    genes[np.diff(batch.offsets) == 0] = 0  # reduceat repeats the next value on empty rows
    return genes == 0
