"""The gene vocabulary: ordered Ensembl IDs plus special tokens, saved as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import logging as logg
from ._reference import canonical_species, gene_table

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from anndata import AnnData

    from ._report import GeneReport

SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")
#: Geneformer V1 has only these two; ``<cls>``/``<eos>`` are optional.
REQUIRED_TOKENS = ("<pad>", "<mask>")
_FORMAT = "sclcm.GeneVocab"
_VERSION = 1


class GeneVocab:
    """Token ids for genes: special tokens first, then genes in a fixed order.

    Parameters
    ----------
    genes
        Ensembl gene IDs (or any unique gene keys), in token order.
    species
        The species of ``genes``; AnnData of another species is mapped through
        one-to-one orthologs by :meth:`lookup`.
    special_tokens
        Tokens placed before the genes, in id order; ``<pad>`` and ``<mask>`` must be
        among them (``<cls>`` and ``<eos>`` are in the default, as Geneformer V2 has them).

    Examples
    --------
    >>> vocab = GeneVocab(["ENSG00000075624", "ENSG00000111640"], species="human")
    >>> len(vocab), vocab.pad_id, vocab.cls_id
    (6, 0, 2)
    >>> vocab.encode(["ENSG00000111640", "ENSG00000000003"])
    array([ 5, -1])
    """

    def __init__(self, genes: Iterable[str], *, species: str | None = None,
                 special_tokens: Sequence[str] = SPECIAL_TOKENS) -> None:
        special = list(special_tokens)
        missing = [t for t in REQUIRED_TOKENS if t not in special]
        if missing:
            msg = f"special_tokens must include {missing}."
            raise ValueError(msg)
        genes = [str(g) for g in genes]
        self._index = pd.Index(special + genes)
        if not self._index.is_unique:
            dup = self._index[self._index.duplicated()].tolist()[:5]
            msg = f"Vocabulary tokens must be unique; repeated: {dup}."
            raise ValueError(msg)
        self.special_tokens = tuple(special)
        self.species = None if species is None else canonical_species(species)

    # --- construction ---------------------------------------------------------
    @classmethod
    def from_reference(cls, species: str, *, biotypes: Sequence[str] | None = (
            "protein_coding", "lncRNA")) -> GeneVocab:
        """All reference genes of ``species`` (of the given biotypes, ``None`` for all)."""
        table = gene_table(species)
        if biotypes is not None:
            table = table[table.biotype.isin(biotypes)]
        return cls(table.index, species=species)

    @classmethod
    def from_report(cls, report: GeneReport) -> GeneVocab:
        """The resolved genes of a :class:`GeneReport`, in the order of the AnnData."""
        return cls(report.unique_ids, species=report.species)

    # --- tokens ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def __getitem__(self, token: str) -> int:
        try:
            return int(self._index.get_loc(token))
        except KeyError:
            msg = f"{token!r} is not in this vocabulary."
            raise KeyError(msg) from None

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, GeneVocab) and self.species == other.species
                and self._index.equals(other._index))

    __hash__ = None  # mutable-looking container semantics: not hashable

    def __repr__(self) -> str:
        return (f"GeneVocab({self.n_genes} genes, {len(self.special_tokens)} special tokens, "
                f"species={self.species!r})")

    @property
    def tokens(self) -> list[str]:
        """All tokens in id order."""
        return self._index.tolist()

    @property
    def genes(self) -> pd.Index:
        """The gene tokens, in id order."""
        return self._index[len(self.special_tokens):]

    @property
    def n_genes(self) -> int:
        return len(self._index) - len(self.special_tokens)

    pad_id = property(lambda self: self["<pad>"], doc="Id of ``<pad>``.")
    mask_id = property(lambda self: self["<mask>"], doc="Id of ``<mask>``.")
    cls_id = property(lambda self: self["<cls>"], doc="Id of ``<cls>``.")
    eos_id = property(lambda self: self["<eos>"], doc="Id of ``<eos>``.")

    def encode(self, genes: Iterable[str | None]) -> np.ndarray:
        """Token id of each gene, ``-1`` where absent (one vectorized lookup)."""
        keys = pd.Index(["" if g is None else str(g) for g in genes])
        ids = self._index.get_indexer(keys).astype(np.int64)
        ids[ids < len(self.special_tokens)] = -1  # genes never map onto special tokens
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of the given ids."""
        return self._index[np.asarray(ids, dtype=np.int64)].tolist()

    def lookup(self, adata: AnnData, *, report: GeneReport | None = None,
               species: str | None = None) -> np.ndarray:
        """Token id of each column of ``adata`` (``-1`` where absent), in one call.

        Genes are resolved with :func:`sclcm.genes.resolve` (or taken from ``report``)
        and, where the data's species differs from the vocabulary's, mapped through
        one-to-one orthologs. Columns that resolve to one gene share its token id; a
        tokenizer sums them.
        """
        from ._resolve import resolve

        if report is None:
            report = resolve(adata, species, count_coverage=False)
        elif len(report.var_names) != adata.n_vars or not report.var_names.equals(
                adata.var_names):
            msg = "report was made for another AnnData; call sclcm.genes.resolve(adata)."
            raise ValueError(msg)
        if self.species is not None and report.species != self.species:
            logg.info(f"mapping {report.species} genes to {self.species} orthologs")
            report = report.to_species(self.species)
        ids = self.encode(report.ensembl_id)
        logg.info(f"    {int((ids >= 0).sum())} of {adata.n_vars} genes are in the vocabulary")
        return ids

    # --- persistence ------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "species": self.species,
                "special_tokens": list(self.special_tokens), "genes": self.genes.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> GeneVocab:
        if d.get("format") != _FORMAT:
            msg = f"Not a sclcm gene vocabulary (format {d.get('format')!r})."
            raise ValueError(msg)
        if d.get("version", 0) > _VERSION:
            msg = (f"Vocabulary format version {d['version']} is newer than this sclcm "
                   f"reads ({_VERSION}); upgrade sclcm.")
            raise ValueError(msg)
        return cls(d["genes"], species=d.get("species"), special_tokens=d["special_tokens"])

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> GeneVocab:
        """Read a vocabulary written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))
