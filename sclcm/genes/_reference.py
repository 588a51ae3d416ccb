"""The gene reference tables shipped with sclcm (built by ``scripts/build_gene_tables.py``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import numpy as np
import pandas as pd

SPECIES = ("homo_sapiens", "mus_musculus")
ID_PREFIX = {"homo_sapiens": "ENSG", "mus_musculus": "ENSMUSG"}
_SPECIES_NAMES = {
    "homo_sapiens": ("human", "homo sapiens", "homo_sapiens", "hsapiens", "hs", "9606"),
    "mus_musculus": ("mouse", "mus musculus", "mus_musculus", "mmusculus", "mm", "10090"),
}
#: Order in which symbol synonyms are tried: an official symbol of an earlier release
#: before an NCBI alias, before a mouse name derived from the human ortholog.
SYMBOL_KINDS = ("symbol", "previous", "alias", "ortholog_previous")


def canonical_species(species: str) -> str:
    """``"homo_sapiens"`` or ``"mus_musculus"`` for any common name of the two.

    >>> canonical_species("Mouse")
    'mus_musculus'
    """
    key = str(species).strip().lower().replace("-", " ")
    for canon, names in _SPECIES_NAMES.items():
        if key in names:
            return canon
    msg = (f"Unknown species {species!r}: sclcm ships gene references for human "
           "('homo_sapiens') and mouse ('mus_musculus').")
    raise ValueError(msg)


def _read(name: str) -> pd.DataFrame:
    with files("sclcm.genes").joinpath("data", name).open("rb") as fh:
        return pd.read_csv(fh, sep="\t", compression="gzip", dtype=str, keep_default_na=False)


@cache
def gene_table(species: str) -> pd.DataFrame:
    """Current reference genes of ``species``: index Ensembl ID; ``symbol``, ``biotype``.

    >>> gene_table("human").loc["ENSG00000075624", "symbol"]
    'ACTB'
    """
    return _read(f"genes_{canonical_species(species)}.tsv.gz").set_index("ensembl_id")


@cache
def synonym_table(species: str) -> pd.DataFrame:
    """Previous symbols, aliases and retired IDs of ``species``: ``name, ensembl_id, kind``."""
    return _read(f"synonyms_{canonical_species(species)}.tsv.gz")


@cache
def ortholog_table() -> pd.DataFrame:
    """Human <-> mouse orthologs (Ensembl BioMart): ``human_id, mouse_id, one2one``."""
    table = _read("orthologs_human_mouse.tsv.gz")
    table["one2one"] = table["one2one"] == "1"
    return table


def reference_info() -> dict:
    """Versions of the sources the shipped tables were built from, and their sizes."""
    return json.loads(files("sclcm.genes").joinpath("data", "SOURCES.json").read_text())


@dataclass(frozen=True)
class Lookup:
    """Names that map to one gene (``unique``) and names that map to several."""

    unique: pd.Series  # name -> Ensembl ID
    ambiguous: dict[str, tuple[str, ...]]

    def get(self, names: pd.Index) -> np.ndarray:
        """Ensembl ID per name (object array, ``None`` where absent), vectorized."""
        out = np.full(len(names), None, dtype=object)
        pos = self.unique.index.get_indexer(names)
        out[pos >= 0] = self.unique.to_numpy()[pos[pos >= 0]]
        return out


def _lookup(names: pd.Series, ids: pd.Series, biotype: pd.Series,
            primary: pd.Series | None = None) -> Lookup:
    """A name shared by several genes resolves to the one protein-coding gene among them,
    else to its ``primary`` gene (the one that held the name earliest), else stays
    ambiguous."""
    df = pd.DataFrame({"name": names.to_numpy(), "id": ids.to_numpy()}).drop_duplicates()
    counts = df.groupby("name")["id"].transform("size")
    unique = df[counts == 1]
    multi = df[counts > 1]
    coding = multi[multi["id"].map(biotype).eq("protein_coding")]
    coding = coding[coding.groupby("name")["id"].transform("size") == 1]
    left = multi[~multi["name"].isin(coding["name"])]
    chosen = [unique, coding]
    if primary is not None:
        first = left[left["id"].eq(left["name"].map(primary))]
        chosen.append(first)
        left = left[~left["name"].isin(first["name"])]
    ambiguous = {k: tuple(sorted(v)) for k, v in left.groupby("name")["id"]}
    return Lookup(pd.concat(chosen).set_index("name")["id"], ambiguous)


@cache
def id_lookups(species: str) -> dict[str, Lookup]:
    """Ensembl ID lookups: current IDs, then retired IDs."""
    genes, syn = gene_table(species), synonym_table(species)
    retired = syn[syn.kind == "retired_id"]
    current = pd.Series(genes.index, index=genes.index)
    return {"ensembl_id": Lookup(current, {}),
            "retired_id": _lookup(retired.name, retired.ensembl_id, genes.biotype)}


@cache
def symbol_lookups(species: str) -> dict[str, Lookup]:
    """Symbol lookups in the order of :data:`SYMBOL_KINDS`, plus a case-insensitive one."""
    genes, syn = gene_table(species), synonym_table(species)
    primary = syn[syn.kind == "primary"].set_index("name").ensembl_id
    out = {"symbol": _lookup(genes.symbol, pd.Series(genes.index), genes.biotype, primary)}
    for kind in SYMBOL_KINDS[1:]:
        rows = syn[syn.kind == kind]
        out[kind] = _lookup(rows.name, rows.ensembl_id, genes.biotype)
    out["case_insensitive"] = _lookup(genes.symbol.str.upper(), pd.Series(genes.index),
                                      genes.biotype, primary.set_axis(primary.index.str.upper()))
    out["other_species"] = _other_species(species)
    return out


def _other_species(species: str) -> Lookup:
    """Upper-cased symbols of the other species, mapped to their orthologs in ``species``.

    For mixed tables such as mouse cells in human symbols: ``INS1`` (mouse Ins1) resolves
    to human INS. Resolves only where all orthologs are one gene of ``species``.
    """
    species = canonical_species(species)
    other = next(s for s in SPECIES if s != species)
    col = {"homo_sapiens": "human_id", "mus_musculus": "mouse_id"}
    orth = ortholog_table()
    genes = gene_table(other)
    pairs = pd.DataFrame({"name": genes.symbol.reindex(orth[col[other]]).str.upper().to_numpy(),
                          "id": orth[col[species]].to_numpy()}).dropna()
    return _lookup(pairs.name, pairs.id, gene_table(species).biotype)
