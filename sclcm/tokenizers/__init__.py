"""Tokenizers: the four families of cell encodings, packed into TokenBatches."""

from ._batch import TokenBatch

__all__ = ["TokenBatch"]
