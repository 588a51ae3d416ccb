"""A tokenized corpus on disk: memory-mappable arrays plus the tokenizer, for pretraining.

Layout of a corpus folder::

    corpus.json        n_cells, n_tokens, dtypes, extras, source
    tokenizer.json     the tokenizer (and its .npy arrays), see Tokenizer.save
    gene_ids.bin       int32, all cells' tokens back to back
    values.bin         float32, one per token
    offsets.bin        int64, n_cells + 1
    cell_index.bin     int64, the source row of each cell
    extra_<name>.bin   float32 per cell

Raw arrays, so they are written block by block in constant memory and read back with
``np.memmap`` without loading them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._base import Tokenizer, load_tokenizer
from ._batch import TokenBatch

if TYPE_CHECKING:
    from collections.abc import Iterator

_FORMAT = "sclcm.TokenizedCorpus"
_DTYPES = {"gene_ids": "int32", "values": "float32", "offsets": "int64", "cell_index": "int64"}


class CorpusWriter:
    """Append :class:`TokenBatch` es to a corpus folder; :meth:`close` writes the index."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, *, source: str = "",
                 overwrite: bool = False) -> None:
        self.path = Path(path)
        if (self.path / "corpus.json").exists() and not overwrite:
            msg = f"{self.path} already holds a corpus; pass overwrite=True to replace it."
            raise FileExistsError(msg)
        self.path.mkdir(parents=True, exist_ok=True)
        tokenizer.save(self.path)
        self.source = source
        self._files = {k: open(self.path / f"{k}.bin", "wb") for k in _DTYPES}  # noqa: SIM115
        self._extras: dict[str, object] = {}
        self.n_cells = self.n_tokens = 0
        np.zeros(1, dtype=np.int64).tofile(self._files["offsets"])

    def append(self, batch: TokenBatch) -> None:
        if self.n_cells and set(batch.extras) != set(self._extras):
            msg = "All batches of a corpus must carry the same extras."
            raise ValueError(msg)
        batch.gene_ids.tofile(self._files["gene_ids"])
        batch.values.tofile(self._files["values"])
        (batch.offsets[1:] + self.n_tokens).tofile(self._files["offsets"])
        batch.cell_index.tofile(self._files["cell_index"])
        for k, v in batch.extras.items():
            if k not in self._extras:
                self._extras[k] = open(self.path / f"extra_{k}.bin", "wb")  # noqa: SIM115
            np.asarray(v, dtype=np.float32).tofile(self._extras[k])
        self.n_cells += batch.n_cells
        self.n_tokens += batch.n_tokens

    def close(self) -> TokenizedCorpus:
        for fh in [*self._files.values(), *self._extras.values()]:
            fh.close()
        meta = {"format": _FORMAT, "version": 1, "n_cells": self.n_cells,
                "n_tokens": self.n_tokens, "dtypes": _DTYPES, "extras": sorted(self._extras),
                "source": self.source}
        (self.path / "corpus.json").write_text(json.dumps(meta, indent=1))
        return TokenizedCorpus(self.path)


class TokenizedCorpus:
    """A corpus written by :func:`sclcm.pp.tokenize` with ``out=``, read by memory map.

    ``corpus[i:j]`` (or a list of cell indices) is a :class:`TokenBatch`; nothing is
    loaded until sliced.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "corpus.json"
        if not meta_path.exists():
            msg = f"No corpus.json in {self.path}: not a tokenized corpus (or not finished)."
            raise FileNotFoundError(msg)
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != _FORMAT:
            msg = f"{meta_path} is not a sclcm tokenized corpus."
            raise ValueError(msg)
        n, t = self.meta["n_cells"], self.meta["n_tokens"]
        shapes = {"gene_ids": t, "values": t, "offsets": n + 1, "cell_index": n}
        self.arrays = {k: _memmap(self.path / f"{k}.bin", self.meta["dtypes"][k], shapes[k])
                       for k in shapes}
        self.extras = {k: _memmap(self.path / f"extra_{k}.bin", "float32", n)
                       for k in self.meta["extras"]}

    @property
    def n_cells(self) -> int:
        return self.meta["n_cells"]

    def __len__(self) -> int:
        return self.n_cells

    @property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path)

    def __getitem__(self, cells) -> TokenBatch:
        offsets = self.arrays["offsets"]
        if isinstance(cells, slice):
            start, stop, step = cells.indices(self.n_cells)
            if step == 1:
                a, b = int(offsets[start]), int(offsets[stop]) if stop > start else int(
                    offsets[start])
                stop = max(stop, start)
                return TokenBatch(np.array(self.arrays["gene_ids"][a:b]),
                                  np.array(self.arrays["values"][a:b]),
                                  np.array(offsets[start:stop + 1]) - a,
                                  np.array(self.arrays["cell_index"][start:stop]),
                                  {k: np.array(v[start:stop]) for k, v in self.extras.items()})
            cells = np.arange(start, stop, step)
        idx = np.asarray(cells, dtype=np.int64)
        lengths = offsets[idx + 1] - offsets[idx]
        new = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=new[1:])
        pos = np.repeat(offsets[idx] - new[:-1], lengths) + np.arange(new[-1])
        return TokenBatch(np.asarray(self.arrays["gene_ids"][pos]),
                          np.asarray(self.arrays["values"][pos]), new,
                          np.asarray(self.arrays["cell_index"][idx]),
                          {k: np.asarray(v[idx]) for k, v in self.extras.items()})

    def iter_batches(self, batch_size: int) -> Iterator[TokenBatch]:
        """Consecutive batches of ``batch_size`` cells."""
        for start in range(0, self.n_cells, batch_size):
            yield self[start:start + batch_size]

    def __repr__(self) -> str:
        return (f"TokenizedCorpus({self.n_cells} cells, {self.meta['n_tokens']} tokens, "
                f"{self.path})")


def _memmap(path: Path, dtype: str, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))
