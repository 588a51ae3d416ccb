"""What a cell stream yields: :class:`CellBlock` s of CSR rows, obs and their :class:`GeneSpace`."""

from __future__ import annotations

import uuid
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from .._matrix import canonical_csr

if TYPE_CHECKING:
    from ..genes import GeneReport
    from ..tokenizers import ColumnMap, TokenBatch, Tokenizer

# GeneSpaces by key, so that blocks sent back from DataLoader workers land on the one
# instance of this process and share its cached gene resolution and column maps.
_SPACES: weakref.WeakValueDictionary[str, GeneSpace] = weakref.WeakValueDictionary()


def _gene_space(key: str, var: pd.DataFrame, species: str | None) -> GeneSpace:
    space = _SPACES.get(key)
    return space if space is not None else GeneSpace(var, species=species, _key=key)


class GeneSpace:
    """The columns of a stream's blocks: ``var`` (index = gene names) and the species.

    Genes are resolved once (:func:`sclcm.genes.resolve` on ``var``) and each tokenizer's
    :class:`~sclcm.tokenizers.ColumnMap` is computed once per gene space, however many
    blocks use it.

    Parameters
    ----------
    var
        One row per column of the blocks; the index holds gene names or Ensembl IDs, and
        columns such as ``feature_name`` or ``gene_ids`` are used by the resolution too.
    species
        ``"human"``/``"mouse"`` (any form :func:`sclcm.genes.canonical_species` takes), or
        ``None`` to infer it from the names.
    """

    def __init__(self, var: pd.DataFrame, *, species: str | None = None,
                 _key: str | None = None) -> None:
        self.var = var
        self.species = species
        self.key = _key or uuid.uuid4().hex
        self._report: GeneReport | None = None
        self._maps: dict[int, tuple[Tokenizer, ColumnMap]] = {}
        _SPACES[self.key] = self

    def __reduce__(self) -> tuple[Any, ...]:
        return _gene_space, (self.key, self.var, self.species)

    @property
    def var_names(self) -> pd.Index:
        return self.var.index

    @property
    def n_genes(self) -> int:
        return len(self.var)

    def __len__(self) -> int:
        return self.n_genes

    def report(self) -> GeneReport:
        """:func:`sclcm.genes.resolve` of these columns (computed once)."""
        if self._report is None:
            from ..genes import resolve

            self._report = resolve(_var_only(self.var), self.species, count_coverage=False)
        return self._report

    def column_map(self, tokenizer: Tokenizer) -> ColumnMap:
        """``tokenizer``'s map from these columns to its tokens (computed once per tokenizer)."""
        hit = self._maps.get(id(tokenizer))
        if hit is None or hit[0] is not tokenizer:
            cmap = tokenizer.column_map(_var_only(self.var), report=self.report())
            hit = self._maps[id(tokenizer)] = (tokenizer, cmap)
        return hit[1]

    def __repr__(self) -> str:
        return f"GeneSpace({self.n_genes} genes, species={self.species!r})"


def _var_only(var: pd.DataFrame):
    """An AnnData with no cells over ``var``: what gene resolution and column maps read."""
    import anndata as ad

    with warnings.catch_warnings():
        # repeated gene names are legal here (a tokenizer sums them); anndata warns on them
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        return ad.AnnData(var=var)


class CellBlock:
    """A block of cells: counts as CSR rows, their obs, their genes and stable cell ids.

    Attributes
    ----------
    X
        ``n_cells x n_genes`` :class:`scipy.sparse.csr_matrix` of counts (the source dtype;
        float32 for the Census).
    obs
        The cells' metadata, one row per cell, in the order of ``X``.
    genes
        The :class:`GeneSpace` of ``X``'s columns.
    cell_ids
        int64 id of each cell in its stream: the row in the concatenated sources for an
        AnnData stream, ``soma_joinid`` for a Census stream.
    """

    __slots__ = ("X", "cell_ids", "genes", "obs")

    def __init__(self, X: sparse.csr_matrix, obs: pd.DataFrame, genes: GeneSpace,
                 cell_ids: np.ndarray) -> None:
        if X.shape[0] != len(obs) or X.shape[0] != len(cell_ids) or X.shape[1] != len(genes):
            msg = (f"CellBlock parts disagree: X {X.shape}, {len(obs)} obs rows, "
                   f"{len(cell_ids)} cell ids, {len(genes)} genes.")
            raise ValueError(msg)
        self.X, self.obs, self.genes = X, obs, genes
        self.cell_ids = np.asarray(cell_ids, dtype=np.int64)

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    def __len__(self) -> int:
        return self.n_cells

    def select(self, idx) -> CellBlock:
        """The cells at positions ``idx`` (indices or a slice), in that order."""
        return CellBlock(self.X[idx], self.obs.iloc[idx], self.genes, self.cell_ids[idx])

    @staticmethod
    def concat(blocks: list[CellBlock]) -> CellBlock:
        """One block of all cells of ``blocks`` (which must share one gene space)."""
        if len(blocks) == 1:
            return blocks[0]
        genes = blocks[0].genes
        if any(b.genes is not genes for b in blocks):
            msg = "Cannot concatenate CellBlocks of different gene spaces."
            raise ValueError(msg)
        return CellBlock(sparse.vstack([b.X for b in blocks], format="csr"),
                         pd.concat([b.obs for b in blocks]), genes,
                         np.concatenate([b.cell_ids for b in blocks]))

    def column_map(self, tokenizer: Tokenizer) -> ColumnMap:
        """``tokenizer``'s column map for this block's genes (cached by the gene space)."""
        return self.genes.column_map(tokenizer)

    def tokenize(self, tokenizer: Tokenizer, **kwargs: Any) -> TokenBatch:
        """Encode the block with ``tokenizer``; ``cell_index`` holds the cells' :attr:`cell_ids`.

        Keyword arguments go to :meth:`Tokenizer.encode` (e.g. ``keep_empty=True``).
        """
        from ..tokenizers import TokenBatch

        batch = tokenizer.encode(self.X, self.column_map(tokenizer), start=0, **kwargs)
        return TokenBatch(batch.gene_ids, batch.values, batch.offsets,
                          self.cell_ids[batch.cell_index], batch.extras)

    def __repr__(self) -> str:
        return (f"CellBlock({self.n_cells} cells x {self.X.shape[1]} genes, "
                f"{self.X.nnz} stored values, obs columns {list(self.obs.columns)})")


def as_csr(block) -> sparse.csr_matrix:
    """``block`` as a canonical CSR matrix, whatever the reader returned (see
    :func:`sclcm._matrix.canonical_csr`)."""
    return canonical_csr(block)
