"""What every tokenizer shares: the column map, block preparation, state as JSON/NumPy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from scipy import sparse

from .._checks import InputError
from .._matrix import canonical_csr
from ..genes import GeneVocab
from ._batch import TokenBatch
from ._kernels import MAX_SLOTS

if TYPE_CHECKING:
    from anndata import AnnData

    from ..genes import GeneReport

#: Counts per cell after normalization, as in all four source models.
TARGET_SUM = 10_000.0
_FORMAT = "sclcm.Tokenizer"
_VERSION = 1
REGISTRY: dict[str, type[Tokenizer]] = {}


@dataclass(frozen=True)
class ColumnMap:
    """Where each input column goes: a slot among the block's tokens, or nowhere.

    Slots are numbered in ascending token id, so sorting by slot sorts by token id.
    Several columns may share a slot (one gene under two names); their counts are
    summed.
    """

    slot: np.ndarray  # int32 per input column, -1 where the column has no token
    token_ids: np.ndarray  # int32 per slot, ascending
    has_duplicates: bool

    @classmethod
    def from_token_ids(cls, ids: np.ndarray) -> ColumnMap:
        ids = np.asarray(ids, dtype=np.int64)
        tokens, inverse = np.unique(ids, return_inverse=True)
        has_missing = int(len(tokens) > 0 and tokens[0] < 0)
        slot = (inverse - has_missing).astype(np.int32)
        slot[ids < 0] = -1
        tokens = tokens[has_missing:]
        if len(tokens) >= MAX_SLOTS:
            msg = f"At most {MAX_SLOTS - 1} distinct genes per tokenizer, got {len(tokens)}."
            raise ValueError(msg)
        return cls(slot, tokens.astype(np.int32), bool(len(tokens) < (ids >= 0).sum()))

    @property
    def n_slots(self) -> int:
        return len(self.token_ids)

    @cached_property
    def column_token_ids(self) -> np.ndarray:
        """The token id of each input column, or -1 where the column has no token."""
        return np.where(self.slot >= 0, self.token_ids[np.maximum(self.slot, 0)], -1)

    @cached_property
    def duplicated_slot(self) -> np.ndarray:
        """For each slot, whether several columns map to it."""
        return np.bincount(self.slot[self.slot >= 0], minlength=self.n_slots) > 1

    @property
    def slot_bits(self) -> int:
        """Bits that hold any slot (at least 1)."""
        return max(int(self.n_slots - 1).bit_length(), 1)

    @cached_property
    def codes(self) -> np.ndarray:
        """``slot`` for the compiled kernels, with a bit set where the slot is shared."""
        from ._compiled import SHARED

        codes = self.slot.copy()
        if self.has_duplicates:
            mapped = np.flatnonzero(codes >= 0)
            codes[mapped[self.duplicated_slot[codes[mapped]]]] |= SHARED
        return codes


def normalized(Y: sparse.csr_matrix, totals: np.ndarray) -> np.ndarray:
    """Stored values of ``Y`` as counts / the cell's total x 10,000 (float32)."""
    with np.errstate(divide="ignore", invalid="ignore"):  # empty cells have no entries
        scale = (TARGET_SUM / totals).astype(np.float32)
    out = np.repeat(scale, np.diff(Y.indptr))
    out *= Y.data
    return out


@dataclass(frozen=True)
class Block:
    """A block of cells as the compiled kernels take it: CSR arrays and the column map.

    ``data`` is float32 or float64 (integer input becomes float64, exactly), so that each
    kernel compiles for two types only; the arrays may be the caller's (never modified).
    """

    indptr: np.ndarray  # int64
    indices: np.ndarray  # int32
    data: np.ndarray  # float32 or float64
    cmap: ColumnMap

    @classmethod
    def of(cls, X, cmap: ColumnMap) -> Block:
        X = canonical_csr(X)
        data = X.data
        if data.dtype not in (np.float32, np.float64):
            data = data.astype(np.float64)
        return cls(X.indptr.astype(np.int64, copy=False),
                   X.indices.astype(np.int32, copy=False), data, cmap)

    @property
    def n_cells(self) -> int:
        return len(self.indptr) - 1

    @property
    def n_stored(self) -> int:
        """Stored entries of the block."""
        return int(self.indptr[-1] - self.indptr[0])

    def kernel_args(self) -> tuple:
        """The arguments every block kernel starts with."""
        return self.indptr, self.indices, self.data, self.cmap.codes

    @staticmethod
    def fatal(*, require_integers: bool) -> int:
        """The kernel flags that are errors."""
        from ._compiled import NEGATIVE, NOT_FINITE, NOT_INTEGER

        return NOT_FINITE | NEGATIVE | (NOT_INTEGER if require_integers else 0)

    def outputs(self, n_tokens: int) -> tuple[np.ndarray, ...]:
        """Arrays a block kernel writes a packed batch into: room for ``n_tokens`` tokens.

        ``(gene_ids, values, offsets, cell_index)``, made by NumPy, which asks the system
        for huge pages for large arrays: filling numba's own arrays took twice as long,
        for a page fault every 4 KiB.
        """
        return (np.empty(n_tokens, np.int32), np.empty(n_tokens, np.float32),
                np.zeros(self.n_cells + 1, np.int64), np.empty(self.n_cells, np.int64))

    @staticmethod
    def batch(outputs: tuple[np.ndarray, ...], n_tokens: int, n_cells: int) -> TokenBatch:
        """The :class:`TokenBatch` a kernel wrote into ``outputs`` (see :meth:`outputs`)."""
        ids, values, offsets, cells = outputs
        return TokenBatch(ids[:n_tokens], values[:n_tokens], offsets[:n_cells + 1],
                          cells[:n_cells])

    @staticmethod
    def drop_empty(batch: TokenBatch, indptr: np.ndarray, *, keep_empty: bool) -> TokenBatch:
        """``batch`` without the cells that ``indptr`` (over slots) gives no gene."""
        empty = np.diff(indptr) == 0
        return batch.select(~empty) if not keep_empty and empty.any() else batch

    def check(self, flags: int, *, require_integers: bool) -> None:
        """Raise the error a kernel's ``flags`` point to (kernels stop at the first one)."""
        if flags & self.fatal(require_integers=require_integers):
            check_counts(self.data, require_integers=require_integers)

    def counts(self, *, require_integers: bool,
               sort: bool = True) -> tuple[sparse.csr_matrix, np.ndarray]:
        """See :func:`prepare_block`."""
        from ._compiled import gather_block

        indptr, totals = np.zeros(self.n_cells + 1, np.int64), np.empty(self.n_cells)
        slots, values = np.empty(self.n_stored, np.int32), np.empty(self.n_stored, np.float32)
        flags = gather_block(*self.kernel_args(), self.cmap.n_slots, self.cmap.slot_bits, sort,
                             self.fatal(require_integers=require_integers), indptr, slots,
                             values, totals)
        self.check(flags, require_integers=require_integers)
        n = indptr[-1]
        Y = sparse.csr_matrix((values[:n], slots[:n], indptr),
                              shape=(self.n_cells, self.cmap.n_slots))
        if sort:
            Y.has_sorted_indices = True  # spare scipy a check later
        return Y, totals


def check_counts(data: np.ndarray, *, require_integers: bool) -> None:
    """Raise an :class:`InputError` for NaN/infinite, non-integer (if required) or negative values.

    The errors are reported in this order, whichever comes first in the data.
    """
    if not data.size:
        return
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            msg = ("The counts contain NaN or infinite values; check them with "
                   "sclcm.pp.check_counts.")
            raise InputError(msg)
        if require_integers and (data != np.round(data)).any():
            msg = ("The matrix holds non-integer values (normalized or log data); this "
                   "tokenizer needs raw counts: pass layer= the counts layer, or run "
                   "sclcm.pp.check_counts for details.")
            raise InputError(msg)
    if (data < 0).any():
        msg = "The counts contain negative values; run sclcm.pp.check_counts for details."
        raise InputError(msg)


def prepare_block(X, cmap: ColumnMap, *, require_integers: bool,
                  sort: bool = True) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Counts of a block over token slots, and each cell's total over *all* columns.

    Returns a CSR matrix ``n_cells x n_slots`` (float32; duplicated genes summed, zeros
    dropped; indices sorted within rows when ``sort``) and the totals (float64). Totals
    include genes outside the vocabulary, as Geneformer's ``n_counts`` and scanpy's
    ``normalize_total`` do.
    """
    return Block.of(X, cmap).counts(require_integers=require_integers, sort=sort)


class Tokenizer:
    """Base of the four families: ``encode`` a block of cells into a :class:`TokenBatch`.

    Subclasses set ``name``, implement ``_encode`` (a ``Block`` in, a
    :class:`TokenBatch` out) and list their options in ``_options``; arrays of
    fitted state are listed in ``_arrays``.
    """

    name: ClassVar[str]
    #: Whether the input must be raw counts (integers).
    requires_counts: ClassVar[bool] = True
    _options: ClassVar[tuple[str, ...]] = ()
    _arrays: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

    def __init__(self, vocab: GeneVocab, *, max_len: int | None) -> None:
        if not isinstance(vocab, GeneVocab):
            msg = f"vocab must be a sclcm.genes.GeneVocab, not {type(vocab).__name__}."
            raise TypeError(msg)
        self.vocab = vocab
        self.max_len = max_len

    # --- from AnnData columns to token slots ------------------------------------
    def token_ids_of_genes(self, ids: np.ndarray) -> np.ndarray:
        """Token id per column (``-1`` for genes this tokenizer cannot use)."""
        return ids

    def column_map(self, adata: AnnData, *, report: GeneReport | None = None) -> ColumnMap:
        """Map ``adata``'s columns to this tokenizer's tokens (resolving genes)."""
        ids = self.token_ids_of_genes(self.vocab.lookup(adata, report=report))
        if not (ids >= 0).any():
            msg = ("None of the AnnData's genes is in this tokenizer's vocabulary "
                   f"({self.vocab!r}); check sclcm.genes.resolve(adata) and the species.")
            raise InputError(msg)
        return ColumnMap.from_token_ids(ids)

    def encode(self, X, cmap: ColumnMap, *, start: int = 0, keep_empty: bool = False,
               **kwargs: Any) -> TokenBatch:
        """Tokenize a block of cells (rows of ``X``, CSR or dense, columns as ``cmap``).

        ``start`` is the index of the block's first cell in the whole dataset (it seeds
        per-cell randomness, so results do not depend on the block size). Cells left
        without any gene token are dropped unless ``keep_empty``, in which case they
        keep only their special tokens.
        """
        block = Block.of(X, self._restrict(cmap))
        return self._encode(block, start=start, keep_empty=keep_empty, **kwargs)

    def _restrict(self, cmap: ColumnMap) -> ColumnMap:
        """``cmap`` without the tokens this tokenizer cannot use (e.g. no gene median)."""
        usable = self.token_ids_of_genes(cmap.token_ids.astype(np.int64)) >= 0
        if usable.all():
            return cmap
        mapped = cmap.slot >= 0
        col_tokens = np.full(len(cmap.slot), -1, dtype=np.int64)
        ok = mapped.copy()
        ok[mapped] = usable[cmap.slot[mapped]]
        col_tokens[ok] = cmap.token_ids[cmap.slot[ok]]
        return ColumnMap.from_token_ids(col_tokens)

    def _encode(self, block: Block, *, start: int, keep_empty: bool) -> TokenBatch:
        raise NotImplementedError

    def tokenize(self, adata: AnnData, **kwargs: Any):
        """Tokenize a whole AnnData; see :func:`sclcm.pp.tokenize` for the options."""
        from ..pp._tokenize import tokenize

        return tokenize(adata, self, **kwargs)

    # --- state --------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Options and vocabulary as plain JSON types (arrays are saved separately)."""
        return {"format": _FORMAT, "version": _VERSION, "name": self.name,
                "options": {"max_len": self.max_len,
                            **{k: getattr(self, k) for k in self._options}},
                "arrays": list(self._arrays), "vocab": self.vocab.to_dict()}

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` (and ``<array>.npy`` for fitted arrays) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for key in self._arrays:
            value = getattr(self, key)
            if value is not None:
                np.save(directory / f"{key}.npy", np.asarray(value), allow_pickle=False)
        (directory / "tokenizer.json").write_text(json.dumps(self.to_dict()))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in ("max_len", *self._options))
        return f"{type(self).__name__}({self.vocab.n_genes} genes, {opts})"


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Read a tokenizer written by :meth:`Tokenizer.save` (JSON and ``.npy``; no pickle)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.exists():
        msg = f"No tokenizer.json in {directory}."
        raise FileNotFoundError(msg)
    d = json.loads(path.read_text())
    if d.get("format") != _FORMAT:
        msg = f"{path} is not a sclcm tokenizer (format {d.get('format')!r})."
        raise ValueError(msg)
    if d.get("version", 0) > _VERSION:
        msg = f"{path} has format version {d['version']}; upgrade sclcm to read it."
        raise ValueError(msg)
    if d["name"] not in REGISTRY:
        msg = f"Unknown tokenizer {d['name']!r}; known: {sorted(REGISTRY)}."
        raise ValueError(msg)
    arrays = {k: np.load(directory / f"{k}.npy", allow_pickle=False)
              for k in d.get("arrays", []) if (directory / f"{k}.npy").exists()}
    return REGISTRY[d["name"]](GeneVocab.from_dict(d["vocab"]), **d["options"], **arrays)
