"""Token edits of in-silico perturbation: many perturbed copies of many cells, vectorized.

A block of tokenized cells (a :class:`~sclcm.tokenizers.TokenBatch`) and a list of edits
become one packed batch of perturbed copies by index arithmetic: every copy is a repeat
of its cell's tokens, edited tokens are dropped, moved or given new values, inserted
genes are appended, and one sort per batch puts the moved and inserted tokens in place.
No Python loop runs per cell, per gene or per copy.

How each family writes expression decides what an edit does (:class:`Encoding`):

- rank families (Geneformer): the position is the expression. ``delete`` removes the
  token, ``overexpress`` puts the gene right after ``<cls>``, ``inhibit`` / ``activate``
  move it down / up the ranking;
- value families (scGPT bins, scBERT levels, scFoundation values): tokens keep their
  places (vocabulary order) and the value changes. ``delete`` removes the token, or sets
  it to 0 where the tokenizer writes unexpressed genes as tokens of value 0 (scBERT's
  panel, scGPT with ``include_zero_genes``): that is how such a model has seen
  unexpressed genes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...tokenizers import TokenBatch
from ...tokenizers._kernels import positions_in_row, row_ids

if TYPE_CHECKING:
    from ...tokenizers import Tokenizer

MODES = ("delete", "overexpress", "inhibit", "activate")


@dataclass(frozen=True)
class Encoding:
    """How a tokenizer writes expression into tokens: what an edit must respect.

    Attributes
    ----------
    ranked
        The position is the rank (Geneformer); otherwise the value carries expression.
    keeps_zeros
        Unexpressed genes are tokens of value 0 (scBERT's panel, scGPT with
        ``include_zero_genes``); ``delete`` sets the value to 0 instead of removing.
    top_value
        The value ``overexpress`` gives: a fixed top bin / level, or ``None`` for the
        cell's highest value.
    n_special
        Token ids below this are special tokens.
    n_prefix, n_suffix
        Special tokens before (``<cls>``) and after (``<eos>``) a cell's genes.
    max_len
        Most tokens per cell of a rank family (its positions); an inserted gene pushes the
        last gene out. ``None``: cells may grow.
    """

    ranked: bool
    keeps_zeros: bool
    top_value: float | None
    n_special: int
    n_prefix: int
    n_suffix: int
    max_len: int | None

    @classmethod
    def of(cls, tokenizer: Tokenizer, *, max_position: int = 0) -> Encoding:
        """The encoding of ``tokenizer``; ``max_position`` caps a rank family's length."""
        name = tokenizer.name
        n_special = len(tokenizer.vocab.special_tokens)
        if name == "geneformer":
            special = bool(tokenizer.special_tokens)
            caps = [c for c in (tokenizer.max_len, max_position) if c]
            return cls(ranked=True, keeps_zeros=False, top_value=None, n_special=n_special,
                       n_prefix=int(special), n_suffix=int(special),
                       max_len=min(caps) if caps else None)
        if name == "scgpt":
            return cls(ranked=False, keeps_zeros=bool(tokenizer.include_zero_genes),
                       top_value=float(tokenizer.n_bins - 1) if tokenizer.binned else None,
                       n_special=n_special, n_prefix=1, n_suffix=0, max_len=None)
        if name == "scbert":
            return cls(ranked=False, keeps_zeros=True, top_value=float(tokenizer.max_level),
                       n_special=n_special, n_prefix=0, n_suffix=0, max_len=None)
        if name == "scfoundation":
            return cls(ranked=False, keeps_zeros=False, top_value=None, n_special=n_special,
                       n_prefix=0, n_suffix=0, max_len=None)
        msg = f"In-silico perturbation does not know the {name!r} tokenizer's encoding."
        raise ValueError(msg)


class CellIndex:
    """Where each gene sits in a block of cells, and the cells' expression rankings.

    A cell's expressed genes are ranked from 0 (highest) to ``n - 1``: by position in a
    rank family, by value (ties: lower token id first) in a value family. Genes of value
    0 (``keeps_zeros``) are not expressed and have no rank.
    """

    def __init__(self, batch: TokenBatch, enc: Encoding, vocab_size: int) -> None:
        self.batch, self.enc, self.V = batch, enc, vocab_size
        ids, values = batch.gene_ids, batch.values
        self.cell = row_ids(batch.offsets)
        self.is_gene = ids >= enc.n_special
        self.expressed = self.is_gene if enc.ranked else self.is_gene & (values > 0)
        by_rank = np.flatnonzero(self.expressed)
        if not enc.ranked:  # value descending, then token id; cells stay apart
            by_rank = by_rank[np.lexsort((ids[by_rank], -values[by_rank],
                                          self.cell[by_rank]))]
        self.by_rank = by_rank
        self.n_expressed = np.bincount(self.cell[by_rank], minlength=batch.n_cells)
        self.rank_offsets = np.zeros(batch.n_cells + 1, dtype=np.int64)
        np.cumsum(self.n_expressed, out=self.rank_offsets[1:])
        self.rank = np.full(len(ids), -1, dtype=np.int64)
        self.rank[by_rank] = positions_in_row(self.rank_offsets)
        genes = np.flatnonzero(self.is_gene)
        keys = self.cell[genes] * vocab_size + ids[genes]
        order = np.argsort(keys, kind="stable")
        self._keys, self._token = keys[order], genes[order]

    def find(self, cells: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Token index of gene ``ids`` in ``cells`` (block rows); -1 where absent."""
        q = cells.astype(np.int64) * self.V + ids
        pos = np.searchsorted(self._keys, q)
        hit = pos < len(self._keys)
        hit[hit] = self._keys[pos[hit]] == q[hit]
        return np.where(hit, self._token[np.minimum(pos, len(self._token) - 1)], -1)

    def n_genes_below(self, cells: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Number of the cell's gene tokens with a lower id (insertion point, vocab order)."""
        q = cells.astype(np.int64) * self.V
        return np.searchsorted(self._keys, q + ids) - np.searchsorted(self._keys, q)

    def value_at_rank(self, cells: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """Value of the gene at ``ranks`` of ``cells``."""
        return self.batch.values[self.by_rank[self.rank_offsets[cells] + ranks]]


@dataclass
class Edits:
    """Perturbed copies of a block's cells and the genes each one edits.

    ``copy_cell`` / ``copy_pert``: block row and perturbation of each copy. Edits are
    sorted by copy (``edit_offsets``): gene ``edit_token``, found at block token
    ``edit_index`` (-1: absent, so inserted), ``edit_order`` its place in the
    perturbation's gene list (several genes put on top keep that order).
    """

    copy_cell: np.ndarray
    copy_pert: np.ndarray
    edit_offsets: np.ndarray
    edit_token: np.ndarray
    edit_index: np.ndarray
    edit_order: np.ndarray

    @property
    def n_copies(self) -> int:
        return len(self.copy_cell)

    def lengths(self, index: CellIndex, mode: str) -> np.ndarray:
        """Tokens of each copy once edited (its cell's, minus removed, plus inserted)."""
        L = index.batch.lengths[self.copy_cell]
        per_copy = np.diff(self.edit_offsets)
        absent = np.add.reduceat(self.edit_index < 0, self.edit_offsets[:-1]) \
            if len(self.edit_index) else np.zeros(self.n_copies, np.int64)
        absent = np.where(per_copy > 0, absent, 0)
        enc = index.enc
        if mode == "delete" and not enc.keeps_zeros:
            return L - (per_copy - absent)
        if mode == "overexpress":
            L = L + absent
            if enc.ranked and enc.max_len:
                L = np.minimum(L, np.maximum(enc.max_len, index.batch.lengths[self.copy_cell]))
        return L


def plan_listed(index: CellIndex, pert_ids: np.ndarray, pert_offsets: np.ndarray,
                mode: str, cells: np.ndarray) -> tuple[Edits, np.ndarray]:
    """Copies of ``cells`` (block rows) for perturbations of listed genes.

    Perturbation ``k`` edits the genes ``pert_ids[pert_offsets[k]:pert_offsets[k + 1]]``
    together. A copy is made where at least one of them can be edited: expressed genes for
    ``delete`` / ``inhibit`` / ``activate``; every gene for ``overexpress`` (inserted
    where absent). Also returns, per (cell, flat gene), whether the gene is expressed.
    """
    n_flat = len(pert_ids)
    flat_pert = row_ids(pert_offsets)
    flat_order = positions_in_row(pert_offsets)
    cc = np.repeat(cells.astype(np.int64), n_flat)
    ff = np.tile(np.arange(n_flat), len(cells))
    tok = index.find(cc, pert_ids[ff])
    expressed = np.zeros(len(tok), dtype=bool)
    expressed[tok >= 0] = index.expressed[tok[tok >= 0]]
    keep = np.ones(len(tok), dtype=bool) if mode == "overexpress" else expressed
    cc, ff, tok = cc[keep], ff[keep], tok[keep]
    n_perts = len(pert_offsets) - 1
    # pairs come ordered by (cell, perturbation): the copies are the distinct pairs
    pair = cc * n_perts + flat_pert[ff]
    copies, first = np.unique(pair, return_index=True)
    offsets = np.append(first, len(pair)).astype(np.int64)
    edits = Edits(copy_cell=copies // max(n_perts, 1), copy_pert=copies % max(n_perts, 1),
                  edit_offsets=offsets, edit_token=pert_ids[ff].astype(np.int64),
                  edit_index=tok, edit_order=flat_order[ff])
    return edits, expressed.reshape(len(cells), n_flat)


def plan_all(index: CellIndex, pert_of_token: np.ndarray, cells: np.ndarray) -> Edits:
    """One copy per expressed gene of each of ``cells``, editing that gene alone.

    ``pert_of_token`` maps a token id to its perturbation (column of the output).
    """
    tok = index.by_rank[np.isin(index.cell[index.by_rank], cells)]
    tok = np.sort(tok)  # copies of a cell together, in the cell's token order
    n = len(tok)
    ids = index.batch.gene_ids[tok].astype(np.int64)
    return Edits(copy_cell=index.cell[tok], copy_pert=pert_of_token[ids],
                 edit_offsets=np.arange(n + 1, dtype=np.int64), edit_token=ids,
                 edit_index=tok, edit_order=np.zeros(n, dtype=np.int64))


def build(index: CellIndex, edits: Edits, copies: np.ndarray, mode: str, shift: float
          ) -> tuple[TokenBatch, np.ndarray, np.ndarray]:
    """The perturbed copies ``copies`` (indices into ``edits``) as one packed batch.

    Returns the batch (cell ``i`` is copy ``copies[i]``), and per token its source token in
    the block (-1 for an inserted gene) and whether the perturbation edited it.
    """
    batch, enc = index.batch, index.enc
    cells = edits.copy_cell[copies]
    L = batch.lengths[cells]
    copy_off = np.zeros(len(copies) + 1, dtype=np.int64)
    np.cumsum(L, out=copy_off[1:])
    pos = positions_in_row(copy_off)
    src = np.repeat(batch.offsets[cells], L) + pos
    t = _Tokens(row_ids(copy_off), batch.gene_ids[src].astype(np.int64),
                batch.values[src].copy(), src, pos)

    # this batch's edits: the ranges of its copies, gathered
    n_e = np.diff(edits.edit_offsets)[copies]
    e_off = np.zeros(len(copies) + 1, dtype=np.int64)
    np.cumsum(n_e, out=e_off[1:])
    e = np.repeat(edits.edit_offsets[copies], n_e) + positions_in_row(e_off)
    e_copy, e_tok, e_order = row_ids(e_off), edits.edit_index[e], edits.edit_order[e]
    e_cell = cells[e_copy]
    present = e_tok >= 0
    at = copy_off[e_copy[present]] + e_tok[present] - batch.offsets[e_cell[present]]
    t.edited[at] = True

    if mode == "delete":
        if enc.keeps_zeros:
            t.values[at] = 0
        else:
            t.drop[at] = True
    elif mode == "overexpress":
        top = np.full(len(e), enc.top_value, np.float32) if enc.top_value is not None else \
            index.value_at_rank(e_cell, np.zeros(len(e), np.int64))
        t.values[at] = top[present]
        if enc.ranked:  # the listed genes take the top ranks, in their order
            t.target[at] = e_order[present]
        absent = ~present
        ids = edits.edit_token[e][absent]
        # value families: where the gene's id puts it among the cell's genes
        key = None if enc.ranked else \
            enc.n_prefix + index.n_genes_below(e_cell[absent], ids) - 0.5
        t.insert(e_copy[absent], ids, top[absent], target=e_order[absent], key=key)
    else:  # inhibit / activate: shift x n ranks down / up the cell's ranking
        c, r = e_cell[present], index.rank[e_tok[present]]
        n = index.n_expressed[c]
        step = np.floor(shift * n + 0.5).astype(np.int64)
        target = np.minimum(r + step, n - 1) if mode == "inhibit" else np.maximum(r - step, 0)
        t.values[at] = index.value_at_rank(c, target)
        if enc.ranked:
            t.target[at] = target
            t.tie[at] = r

    t = t.arranged(enc, len(copies))
    counts = np.bincount(t.copy, minlength=len(copies))
    if enc.ranked and enc.max_len and counts.max(initial=0) > enc.max_len:
        # inserted genes push the last genes out of a full cell (before <eos>)
        off = np.zeros(len(copies) + 1, dtype=np.int64)
        np.cumsum(counts, out=off[1:])
        excess = np.maximum(counts - np.maximum(enc.max_len, L), 0)
        from_end = np.repeat(counts, counts) - 1 - positions_in_row(off)
        t = t.take(~((from_end >= enc.n_suffix) & (from_end < enc.n_suffix + excess[t.copy])))
        counts = counts - excess
    offsets = np.zeros(len(copies) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    out = TokenBatch(t.ids.astype(np.int32), t.values.astype(np.float32), offsets,
                     batch.cell_index[cells], {k: v[cells] for k, v in batch.extras.items()})
    return out, t.origin, t.edited


_BIG = np.int64(1) << 40  # separates copies in keys of (copy, rank)


class _Tokens:
    """The tokens of a batch of copies while they are edited (struct of arrays)."""

    _fields = ("copy", "ids", "values", "origin", "pos", "edited", "drop", "target", "tie",
               "key")

    def __init__(self, copy, ids, values, origin, pos) -> None:
        n = len(ids)
        self.copy, self.ids, self.values, self.origin = copy, ids, values, origin
        self.pos = pos  # place in the cell before the edit (-1: inserted)
        self.edited = np.zeros(n, dtype=bool)
        self.drop = np.zeros(n, dtype=bool)
        self.target = np.full(n, -1, dtype=np.int64)  # rank a moved gene goes to
        self.tie = np.zeros(n, dtype=np.int64)
        self.key = None  # value families' insertion places (None: keep the order)

    def insert(self, copy, ids, values, *, target, key) -> None:
        """Append genes; ``target`` ranks (rank families) or ``key`` places (value)."""
        if not len(ids):
            return
        m = len(ids)
        if key is not None and self.key is None:
            self.key = self.pos.astype(np.float64)
        self.copy = np.concatenate([self.copy, copy])
        self.ids = np.concatenate([self.ids, ids])
        self.values = np.concatenate([self.values, values.astype(np.float32)])
        self.origin = np.concatenate([self.origin, np.full(m, -1, dtype=np.int64)])
        self.pos = np.concatenate([self.pos, np.full(m, -1, dtype=np.int64)])
        self.edited = np.concatenate([self.edited, np.ones(m, dtype=bool)])
        self.drop = np.concatenate([self.drop, np.zeros(m, dtype=bool)])
        self.target = np.concatenate([self.target, target if key is None else
                                      np.full(m, -1, dtype=np.int64)])
        self.tie = np.concatenate([self.tie, ids if key is not None else
                                   np.zeros(m, dtype=np.int64)])
        if key is not None:
            self.key = np.concatenate([self.key, key])

    def take(self, mask: np.ndarray) -> _Tokens:
        for f in self._fields:
            if getattr(self, f) is not None:
                setattr(self, f, getattr(self, f)[mask])
        return self

    def arranged(self, enc: Encoding, n_copies: int) -> _Tokens:
        """Drop removed tokens and put moved / inserted ones in place."""
        self.take(~self.drop)
        if self.key is not None:  # value families: inserted genes by vocabulary order
            return self.take(np.lexsort((self.tie, self.key, self.copy)))
        if not (self.target >= 0).any():
            return self
        return self.take(np.lexsort((self._slots(enc, n_copies), self.copy)))

    def _slots(self, enc: Encoding, n_copies: int) -> np.ndarray:
        """Rank families: final place of each token.

        Moved genes take their target ranks: in order of target (then their old rank,
        then their place in the list), the next free rank when taken, and never past the
        last rank. The other genes keep their order in the ranks left free.
        """
        gene = self.ids >= enc.n_special
        moved = np.flatnonzero(gene & (self.target >= 0))
        still = np.flatnonzero(gene & (self.target < 0))
        moved = moved[np.lexsort((self.tie[moved], self.target[moved], self.copy[moved]))]
        mc = self.copy[moved]
        m = np.bincount(mc, minlength=n_copies)
        n = m + np.bincount(self.copy[still], minlength=n_copies)
        i = positions_in_row(np.r_[0, np.cumsum(m)])
        # distinct ranks: t_i >= t_(i-1) + 1, a cumulative max within each copy...
        t = np.maximum.accumulate(self.target[moved] - i + mc * _BIG) - mc * _BIG + i
        t = np.minimum(t, n[mc] - m[mc] + i)  # ...and <= the last rank, from the end
        # the j-th still gene goes to the j-th free rank: j + (moved ranks before it)
        free_before = mc * _BIG + t - i  # free ranks before each moved gene's, ascending
        j = positions_in_row(np.r_[0, np.cumsum(np.bincount(self.copy[still],
                                                             minlength=n_copies))])
        sc = self.copy[still] * _BIG
        s = j + np.searchsorted(free_before, sc + j, side="right") - \
            np.searchsorted(free_before, sc, side="left")
        # special tokens: <cls> keeps its place before the genes, <eos> goes last
        slot = np.where(self.pos < enc.n_prefix, self.pos, _BIG).astype(np.int64)
        slot[moved] = enc.n_prefix + t
        slot[still] = enc.n_prefix + s
        return slot
