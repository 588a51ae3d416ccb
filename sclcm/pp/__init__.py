"""Preprocessing: the AnnData-facing checks and gene handling, in scanpy's ``pp`` place."""

from .._checks import check_counts
from ..genes import resolve as resolve_genes
from ._tokenize import tokenize

__all__ = ["check_counts", "resolve_genes", "tokenize"]
