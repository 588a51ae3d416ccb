"""Compiled per-cell kernels (numba) behind the tokenizers.

A block kernel walks a CSR block one cell at a time: it gathers the cell's counts over token
slots (:func:`gather_row`), then normalizes, orders and bins them and writes the cell's
tokens straight into the output arrays, so nothing the size of the block is made on the way
and a cell's few thousand values stay in cache. Each step computes in the precision and
order that the family modules document (float32 products, float64 totals), so the output
equals the plain NumPy definitions in the tests bit for bit.

Orders come from :func:`sort_keys` on packed int64 keys (a value's float32 bits, which order
like the non-negative values, above a slot or a position), by a least-significant-digit
radix sort: 6 to 7 ns a key on pbmc3k cells, against 13 for NumPy's sort called per cell
(and 33 for numba's).

Kernels compile on first use (4 to 9 s a family on two CPU cores) and are cached on disk
(``cache=True``): later processes load them in well under a second. All of them live in
this one file because numba's cache is invalidated by changes to the caller's file only: a
helper edited in another file would leave stale machine code. This module is imported
only when a tokenizer encodes, so ``import sclcm`` does not load numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Flags of a block's values, in the order their errors are reported (see _base.check_counts).
NOT_FINITE, NOT_INTEGER, NEGATIVE = 1, 2, 4
#: Set in a column's code (see ColumnMap.codes) when its slot is shared with other columns.
SHARED = 1 << 30
# As _base.TARGET_SUM and _kernels.SLOT_BITS (tests check), not imported: numba compiles
# them in as constants, and its cache would not see a change in another file.
TARGET_SUM = 10_000.0
SLOT_BITS = 17
_SLOT_MASK = (1 << SLOT_BITS) - 1
_VALUE_MASK = 0x7FFFFFFF
_U = np.uint64
_jit = njit(cache=True, error_model="numpy", nogil=True)
# for helpers called per key: a call that LLVM does not inline costs more than their work
_inline = njit(cache=True, error_model="numpy", nogil=True, inline="always")


@_jit
def _scratch(width, n_slots):
    """Per-cell buffers for cells of up to ``width`` entries (made once per block)."""
    slots = np.empty(width, np.int64)
    values = np.empty(width, np.float32)
    acc = np.empty(width, np.float64)
    keys = np.empty(width, np.int64)
    tmp = np.empty(width, np.int64)
    first = np.full(n_slots, -1, np.int32)
    shared = np.empty(width, np.int64)
    hist = np.empty((8, 256), np.int32)  # 8 digits: 64 bits
    return slots, values, acc, keys, tmp, first, shared, hist


@_jit
def row_width(indptr):
    """Most stored entries of any row."""
    width = 0
    for r in range(len(indptr) - 1):
        width = max(width, indptr[r + 1] - indptr[r])
    return width


@_jit
def gather_row(indptr, indices, data, codes, row, slots, values, acc, first, shared):
    """Counts of cell ``row`` over token slots: ``slots[:n]``, ``values[:n]`` (float32).

    ``codes`` is each column's slot (``-1`` for none, :data:`SHARED` added where several
    columns are one gene). Entries keep the column order; zeros and columns without a
    slot are skipped; columns of one slot are summed in float64 in column order, at the
    first one's place (``first`` is -1 per slot, and is left so). Returns ``(n, total,
    odd, ascending)``: the cell's total over all columns (float64), whether any value
    is negative, non-integer or not finite (:func:`value_flags` tells which), and
    whether ``slots[:n]`` ascend.
    """
    total, odd = 0.0, False
    n, n_shared, prev, ascending = 0, 0, -1, True
    for j in range(indptr[row], indptr[row + 1]):
        d = data[j]
        total += d
        odd |= (d - np.floor(d) != 0) | (d < 0)  # NaN and inf give NaN here
        s = codes[indices[j]]
        if d == 0 or s < 0:
            continue
        if s >= SHARED:
            s -= SHARED
            p = first[s]
            if p >= 0:
                acc[p] += np.float32(d)
                continue
            first[s] = n
            acc[n] = np.float32(d)
            shared[n_shared] = n
            n_shared += 1
        slots[n] = s
        values[n] = np.float32(d)
        ascending = ascending and s > prev
        prev = s
        n += 1
    for k in range(n_shared):
        i = shared[k]
        values[i] = np.float32(acc[i])
        first[slots[i]] = -1
    return n, total, odd, ascending


@_jit
def value_flags(indptr, data, row):
    """:data:`NOT_FINITE` / :data:`NOT_INTEGER` / :data:`NEGATIVE` of a row's values."""
    flags = 0
    for j in range(indptr[row], indptr[row + 1]):
        d = data[j]
        if not np.isfinite(d):
            flags |= NOT_FINITE
        elif np.floor(d) != d:
            flags |= NOT_INTEGER
        if d < 0:
            flags |= NEGATIVE
    return flags


@_jit
def sort_keys(keys, tmp, n, low_bit, n_bits, hist, counted):
    """Sort ``keys[:n]`` (int64, ``>= 0``, below bit ``low_bit + n_bits``) ascending.

    A radix sort by bits ``low_bit`` and up, then an insertion pass for the lower bits,
    which callers use for what only breaks near-ties (a slot, a position, the last bits
    of a value). Should the insertion pass move more than a few keys per key, a radix
    sort by all bits finishes the job. ``counted``: the caller has made the radix sort's
    histograms (:func:`count_digits`) while writing the keys, saving a pass over them.
    """
    if n <= 32:  # a histogram is not worth it
        _insertion(keys, n, n * n)
        return
    while True:  # one call site of _radix: compiling it inline twice would take seconds
        _radix(keys, tmp, n, low_bit, n_bits, hist, counted=counted)
        if low_bit == 0 or _insertion(keys, n, 8 * n):
            return
        low_bit, n_bits, counted = 0, low_bit + n_bits, False


@_inline
def clear_digits(hist, n_bits):
    """Zero the histograms of the 8-bit digits of ``n_bits`` bits."""
    for d in range((n_bits + 7) // 8):
        for b in range(256):
            hist[d, b] = 0


@_inline
def count_digits(key, low_bit, n_bits, hist):
    """Count the 8-bit digits of ``key`` from bit ``low_bit`` (``n_bits`` of them)."""
    x = key >> low_bit
    for d in range((n_bits + 7) // 8):
        hist[d, (x >> (8 * d)) & 255] += 1


@_jit
def _radix(keys, tmp, n, low_bit, n_bits, hist, counted):
    """Stable sort of ``keys[:n]`` by bits ``low_bit`` up to ``low_bit + n_bits``.

    Least significant digit first, 8 bits a digit; a digit all keys share is skipped.
    """
    if not counted:
        clear_digits(hist, n_bits)
        for j in range(n):
            count_digits(keys[j], low_bit, n_bits, hist)
    src, dst, swapped = keys, tmp, False
    for d in range((n_bits + 7) // 8):
        shift = low_bit + 8 * d
        h = hist[d]
        if h[(src[0] >> shift) & 255] == n:
            continue
        start = 0
        for b in range(256):
            c = h[b]
            h[b] = start
            start += c
        for j in range(n):
            x = src[j]
            b = (x >> shift) & 255
            dst[h[b]] = x
            h[b] += 1
        src, dst, swapped = dst, src, not swapped
    if swapped:
        for j in range(n):
            keys[j] = tmp[j]


@_jit
def _insertion(keys, n, budget):
    """Insertion sort of ``keys[:n]``; ``False`` (unfinished) after ``budget`` moves."""
    for j in range(1, n):
        x = keys[j]
        i = j - 1
        while i >= 0 and keys[i] > x:
            keys[i + 1] = keys[i]
            i -= 1
        keys[i + 1] = x
        budget -= j - 1 - i
        if budget < 0:
            return False
    return True


@_inline
def uniform_at(seed, cell, token):
    """:func:`sclcm.tokenizers._kernels.uniform` for one ``(cell, token)``."""
    return _finish(_U(seed) * _U(0x9E3779B97F4A7C15) + _U(cell) * _U(0xBF58476D1CE4E5B9)
                   + _U(token) * _U(0x94D049BB133111EB))


@_inline
def _finish(x):
    """SplitMix64's finalizer of ``x``, as a float64 in [0, 1)."""
    x ^= x >> _U(30)
    x *= _U(0xBF58476D1CE4E5B9)
    x ^= x >> _U(27)
    x *= _U(0x94D049BB133111EB)
    x ^= x >> _U(31)
    return np.float64(x >> _U(11)) * (1.0 / (1 << 53))


# --- blocks ------------------------------------------------------------------------------
@_jit
def gather_block(indptr, indices, data, codes, n_slots, slot_bits, sort, fatal, out_indptr,
                 out_slots, out_values, totals):
    """Every cell's :func:`gather_row`, as CSR arrays over slots (slots ascending if ``sort``).

    Fills ``out_indptr`` (zeros), ``out_slots``, ``out_values`` (room for every stored
    entry) and ``totals``; returns the flags, stopping at the first cell whose flags meet
    ``fatal`` (the caller raises).
    """
    n_rows = len(indptr) - 1
    width = row_width(indptr)
    slots, values, acc, keys, tmp, first, shared, hist = _scratch(width, n_slots)
    flags, pos = 0, 0
    for r in range(n_rows):
        n, total, odd, ascending = gather_row(indptr, indices, data, codes, r, slots,
                                              values, acc, first, shared)
        totals[r] = total
        if odd:
            flags |= value_flags(indptr, data, r)
            if flags & fatal:
                break
        if sort and not ascending:
            _sort_by_slot(slots, values, keys, tmp, n, slot_bits, hist)
        for i in range(n):
            out_slots[pos + i] = slots[i]
            out_values[pos + i] = values[i]
        pos += n
        out_indptr[r + 1] = pos
    return flags


@_jit
def _sort_by_slot(slots, values, keys, tmp, n, slot_bits, hist):
    """Order ``slots[:n]`` (unique, below ``2 ** slot_bits``) ascending, with their values."""
    bits = values.view(np.int32)
    for i in range(n):
        keys[i] = (slots[i] << 32) | bits[i]
    if n <= 32:
        _insertion(keys, n, n * n)
    else:  # slots are unique: their bits alone order the keys
        _radix(keys, tmp, n, 32, slot_bits, hist, counted=False)
    for i in range(n):
        slots[i] = keys[i] >> 32
        bits[i] = keys[i] & 0xFFFFFFFF


@_jit
def rank_block(indptr, indices, data, codes, n_slots, weight, token_ids, n_keep, first_id,
               last_id, keep_empty, start, fatal, ids, out, offsets, cells):
    """Geneformer: each cell's genes by normalized count x ``weight`` (1 / median), descending.

    Per cell: ``<first_id>`` (if >= 0), the top ``n_keep`` genes, ``<last_id>`` (if >= 0);
    a gene's value is ``float32(10,000 / total) * count * weight`` in float32, ties are
    broken by slot (token id) ascending. Cells without a gene are skipped unless
    ``keep_empty``. Writes a packed batch into ``ids``, ``out`` (values), ``offsets``
    (zeros) and ``cells``, and returns ``(tokens, cells, flags)``: how much it wrote.
    """
    n_rows = len(indptr) - 1
    width = row_width(indptr)
    slots, values, acc, keys, tmp, first, shared, hist = _scratch(width, n_slots)
    bits, out_bits = values.view(np.int32), out.view(np.int32)
    flags, pos, kept = 0, 0, 0
    for r in range(n_rows):
        n, total, odd, _ = gather_row(indptr, indices, data, codes, r, slots, values, acc,
                                      first, shared)
        if odd:
            flags |= value_flags(indptr, data, r)
            if flags & fatal:
                break
        if n == 0 and not keep_empty:
            continue
        scale = np.float32(TARGET_SUM / total)
        clear_digits(hist, 24)
        for i in range(n):
            values[i] = scale * values[i]
            values[i] *= weight[slots[i]]
            # descending values: the complement of the bits ascends
            keys[i] = ((_VALUE_MASK - np.int64(bits[i])) << SLOT_BITS) | slots[i]
            count_digits(keys[i], SLOT_BITS + 7, 24, hist)
        # a radix sort by the values' top 24 bits, insertion for the rest and the slots
        sort_keys(keys, tmp, n, SLOT_BITS + 7, 24, hist, counted=True)
        if first_id >= 0:
            ids[pos] = first_id
            out[pos] = 0
            pos += 1
        for i in range(min(n, n_keep)):
            k = keys[i]
            ids[pos] = token_ids[k & _SLOT_MASK]
            out_bits[pos] = _VALUE_MASK - (k >> SLOT_BITS)
            pos += 1
        if last_id >= 0:
            ids[pos] = last_id
            out[pos] = 0
            pos += 1
        cells[kept] = start + r
        kept += 1
        offsets[kept] = pos
    return pos, kept, flags


@_jit
def _choose(keys, tmp, length, n_keep, hist, chosen):
    """Mark in ``chosen[:length]`` the positions of the ``n_keep`` smallest keys.

    ``keys[:length]`` hold a 31-bit value above :data:`SLOT_BITS` bits of position.
    """
    sort_keys(keys, tmp, length, SLOT_BITS + 7, 24, hist, counted=False)
    for e in range(length):
        chosen[e] = False
    for i in range(n_keep):
        chosen[keys[i] & _SLOT_MASK] = True


@_jit
def keep_top(offsets, ids, values, n_keep):
    """Per cell, its ``n_keep`` highest values (ties: the earlier token), in their order.

    ``offsets``, ``ids``, ``values`` are a packed batch; returns the new three.
    """
    n_rows = len(offsets) - 1
    width = row_width(offsets)
    keys, tmp = np.empty(width, np.int64), np.empty(width, np.int64)
    hist, chosen = np.empty((8, 256), np.int32), np.empty(width, np.bool_)
    bits = values.view(np.int32)
    new_offsets = np.zeros(n_rows + 1, np.int64)
    new_ids = np.empty(len(ids), np.int32)
    new_values = np.empty(len(ids), np.float32)
    pos = 0
    for r in range(n_rows):
        a, n = offsets[r], offsets[r + 1] - offsets[r]
        if n > n_keep:
            for e in range(n):
                keys[e] = ((_VALUE_MASK - np.int64(bits[a + e])) << SLOT_BITS) | e
            _choose(keys, tmp, n, n_keep, hist, chosen)
        for e in range(n):
            if n <= n_keep or chosen[e]:
                new_ids[pos] = ids[a + e]
                new_values[pos] = values[a + e]
                pos += 1
        new_offsets[r + 1] = pos
    return new_offsets, new_ids[:pos], new_values[:pos]


@_jit
def bin_block(indptr, indices, data, codes, token_ids, slot_bits, n_bins, binned,
              include_zero, n_keep, cls_id, cls_value, seed_ties, seed_subsample, keep_empty,
              start, fatal, ids, out, offsets, cells):
    """scGPT: ``<cls>`` and each cell's genes in slot order with their per-cell bins.

    With ``binned=False`` the values are the normalized counts (the caller takes log1p);
    with ``include_zero`` every slot is a gene of every cell (value 0 where absent). A cell
    with more than ``n_keep`` genes keeps those of the ``n_keep`` smallest draws
    ``uniform(seed_subsample, cell, token)``. Writes and returns as :func:`rank_block`.
    """
    n_rows, n_slots = len(indptr) - 1, len(token_ids)
    width = row_width(indptr)
    room = max(width, n_slots) if include_zero else width
    slots, values, acc, keys, tmp, first, shared, hist = _scratch(room, n_slots)
    digits, draws = np.empty(room, np.float32), np.empty(room, np.float32)
    scratch_ids, chosen = np.empty(room, np.int32), np.empty(room, np.bool_)
    dense = np.zeros(n_slots if include_zero else 0, np.float32)
    every = np.arange(n_slots if include_zero else 0)
    edges = np.empty(n_bins - 1, np.int64)
    # counting sort of counts up to 4 x the longest cell (else a radix sort)
    counts = np.zeros((4, 4 * width + 256), np.int32)
    left_of, right_of = np.empty(4 * width + 256, np.int32), np.empty(4 * width + 256, np.int32)
    flags, pos, kept = 0, 0, 0
    for r in range(n_rows):
        n, total, odd, ascending = gather_row(indptr, indices, data, codes, r, slots,
                                              values, acc, first, shared)
        if odd:
            flags |= value_flags(indptr, data, r)
            if flags & fatal:
                break
        if n == 0 and not keep_empty:
            continue
        if not ascending:
            _sort_by_slot(slots, values, keys, tmp, n, slot_bits, hist)
        cell = start + r
        ids[pos] = cls_id
        out[pos] = cls_value
        pos += 1
        # all genes in slot order: straight into the output, else through _emit
        direct = n <= n_keep and not include_zero
        gene_ids = ids[pos:pos + n] if direct else scratch_ids
        gene_values = out[pos:pos + n] if direct else digits
        if binned:
            bin_row(values, slots, n, token_ids, n_bins, seed_ties, cell, gene_values,
                    gene_ids, keys, tmp, hist, edges, counts, left_of, right_of)
        elif n:
            scale = np.float32(TARGET_SUM / total)
            for i in range(n):
                gene_ids[i] = token_ids[slots[i]]
                gene_values[i] = scale * values[i]
        if direct:
            pos += n
        elif include_zero:  # every slot, with its value or 0
            for i in range(n):
                dense[slots[i]] = digits[i]
            pos = _emit(ids, out, pos, token_ids, every, dense, n_slots, n_keep,
                        seed_subsample, cell, draws, keys, tmp, hist, chosen)
            for i in range(n):
                dense[slots[i]] = 0
        else:
            pos = _emit(ids, out, pos, token_ids, slots, digits, n, n_keep, seed_subsample,
                        cell, draws, keys, tmp, hist, chosen)
        cells[kept] = cell
        kept += 1
        offsets[kept] = pos
    return pos, kept, flags


@_jit
def _emit(ids, out, pos, token_ids, slots, values, n, n_keep, seed, cell, draws, keys, tmp,
          hist, chosen):
    """Write entries ``[:n]`` (slots ascending) at ``pos``; ``n_keep`` random ones if more.

    Those kept have the ``n_keep`` smallest float32 draws ``uniform(seed, cell, token)``
    (ties: the lower slot). Returns the position after them.
    """
    if n > n_keep:
        bits = draws.view(np.int32)
        for e in range(n):
            draws[e] = np.float32(uniform_at(seed, cell, token_ids[slots[e]]))
            keys[e] = (np.int64(bits[e]) << SLOT_BITS) | e
        _choose(keys, tmp, n, n_keep, hist, chosen)
        for e in range(n):
            if chosen[e]:
                ids[pos] = token_ids[slots[e]]
                out[pos] = values[e]
                pos += 1
        return pos
    for e in range(n):
        ids[pos + e] = token_ids[slots[e]]
        out[pos + e] = values[e]
    return pos + n


@_jit
def bin_row(values, slots, n, token_ids, n_bins, seed, cell, digits, gene_ids, keys, tmp,
            hist, edges, counts, left_of, right_of):
    """scGPT's bin of each of ``values[:n]`` (one cell, non-zero) into ``digits[:n]``.

    ``gene_ids[:n]`` get the genes' token ids (looked up here for the random draws).

    Edge ``k`` times ``D = n_bins - 2`` is the integer ``s[lo] * D + (s[hi] - s[lo]) * rem``
    with ``lo, rem = divmod(k * (n - 1), D)`` and ``s`` the sorted values, so values
    compare with edges exactly. Bins depend only on the values' order, so the values are
    replaced by integers that order like them: the counts themselves when they are small
    integers (then sorted by counting), else their float32 bits (then radix-sorted).
    ``counts`` is ``(4, cap)`` zeros, and is left so.
    """
    if n == 0:
        return
    D, n_edges = n_bins - 2, n_bins - 1
    top, small = 0, True
    for i in range(n):
        v = values[i]
        if v != np.floor(v) or v >= counts.shape[1]:
            small = False
            break
        k = np.int64(v)
        keys[i] = k
        # four interleaved histograms: with one, each increment would wait for the one
        # before (most counts are 1)
        counts[i & 3, k] += 1
        top = max(top, k)
    if small:
        count = left_of
        for v in range(top + 1):
            count[v] = counts[0, v] + counts[1, v] + counts[2, v] + counts[3, v]
            counts[0, v] = counts[1, v] = counts[2, v] = counts[3, v] = 0
        # walk the counts for s[lo] and s[hi] of each edge (c: how many values are <= v)
        step, step_rem = divmod(n - 1, D)
        lo, rem, v_lo, c_lo, v_hi, c_hi = 0, 0, 0, count[0], 0, count[0]
        for k in range(n_edges):
            hi = min(lo + 1, n - 1)
            while c_lo <= lo:
                v_lo += 1
                c_lo += count[v_lo]
            while c_hi <= hi:
                v_hi += 1
                c_hi += count[v_hi]
            edges[k] = v_lo * D + (v_hi - v_lo) * rem
            lo, rem = lo + step, rem + step_rem
            if rem >= D:
                lo, rem = lo + 1, rem - D
        # edges <= v and edges < v for every count up to the largest (count is done)
        at_or_below, below = 0, 0
        for v in range(top + 1):
            while at_or_below < n_edges and edges[at_or_below] <= v * D:
                at_or_below += 1
            while below < n_edges and edges[below] < v * D:
                below += 1
            left_of[v], right_of[v] = at_or_below, below
        for i in range(n):
            k = keys[i]
            keys[i], tmp[i] = left_of[k], right_of[k]
    else:
        for v in range(top + 1):
            counts[0, v] = counts[1, v] = counts[2, v] = counts[3, v] = 0
        bits = values.view(np.int32)
        for i in range(n):
            keys[i] = bits[i]
        sort_keys(keys, tmp, n, 7, 24, hist, counted=False)
        for k in range(n_edges):
            lo, rem = divmod(k * (n - 1), D)
            hi = min(lo + 1, n - 1)
            edges[k] = keys[lo] * D + (keys[hi] - keys[lo]) * rem
        for i in range(n):
            x = np.int64(bits[i]) * D
            keys[i], tmp[i] = _count_below(edges, x + 1), _count_below(edges, x)
    # keys: edges <= the value, tmp: edges < it. A value on edges is drawn between the
    # bins they bound: scGPT's ceil(u * (right - left) + left), as left - floor(u *
    # (left - right)) in float64 like NumPy; drawn for all values (u * 0 leaves the
    # rest), as a loop without branches runs faster
    base = _U(seed) * _U(0x9E3779B97F4A7C15) + _U(cell) * _U(0xBF58476D1CE4E5B9)
    for i in range(n):
        token = token_ids[slots[i]]
        gene_ids[i] = token
        u = _finish(base + _U(token) * _U(0x94D049BB133111EB))
        digits[i] = np.float32(keys[i] - np.floor(u * (keys[i] - tmp[i])))


@_jit
def _count_below(edges, x):
    """How many of the ascending ``edges`` are below ``x`` (a binary search)."""
    lo, hi = 0, len(edges)
    while lo < hi:
        mid = (lo + hi) // 2
        if edges[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo
