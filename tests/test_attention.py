"""Attention backends on packed real cells: sdpa and flash agree with the math reference,
cells never see each other, and scGPT's generative mask hides what it must."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model_data import random_mask, tokens

from sclcm.models import ATTENTION_BACKENDS, CellModel, ModelConfig, Packing, attention
from sclcm.models import _attention as attn_mod

H, D = 4, 16


def _qkv(n_tokens: int, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n_tokens, H, D, generator=g).to(device, dtype) for _ in range(3)]


@pytest.fixture(scope="module")
def packed():
    """Offsets of real tokenized cells: 24 pbmc3k cells of 250 to 2,000+ tokens."""
    _, batch = tokens("geneformer")
    lengths = batch.lengths
    assert lengths.max() > 5 * lengths.min()  # very different lengths, as promised
    return torch.from_numpy(batch.offsets)


@pytest.mark.parametrize("generative", [False, True], ids=["full", "generative"])
def test_sdpa_matches_math_on_real_cells(packed, generative):
    g = torch.Generator().manual_seed(0)
    query = torch.rand(int(packed[-1]), generator=g) < 0.3 if generative else None
    q, k, v = _qkv(int(packed[-1]))
    outs = {name: attention(q, k, v, Packing(packed, query=query, backend=name), scale=D**-0.5)
            for name in ("math", "sdpa")}
    torch.testing.assert_close(outs["sdpa"], outs["math"], atol=1e-5, rtol=1e-5)


def _short_offsets(packed):
    """Real cell lengths cut to 2..SHORT_CELL tokens (mixed lengths, so padded buckets)."""
    lengths = torch.minimum(packed.diff(), torch.arange(len(packed) - 1) * 5 + 2)
    assert 2 < int(lengths.max()) <= attn_mod.SHORT_CELL < int(packed.diff().max())
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


@pytest.mark.parametrize("generative", [False, True], ids=["full", "generative"])
def test_short_cells_take_matrix_products_and_match_math(packed, generative, monkeypatch):
    """On CPU, bf16 buckets up to SHORT_CELL tokens skip SDPA: forced in float32 the path
    equals the reference (padding and scGPT's mask included); in bf16 it runs by itself and
    stays within bf16 rounding of the float32 reference, as SDPA's bf16 kernel does."""
    offsets = _short_offsets(packed)
    g = torch.Generator().manual_seed(1)
    query = torch.rand(int(offsets[-1]), generator=g) < 0.3 if generative else None
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return _SHORT(*args, **kwargs)

    monkeypatch.setattr(attn_mod, "_short_attention", counting)
    q, k, v = _qkv(int(offsets[-1]))
    ref = attention(q, k, v, Packing(offsets, query=query, backend="math"), scale=0.25)
    sdpa = attention(q, k, v, Packing(offsets, query=query), scale=0.25)
    assert not calls  # float32 stays on SDPA
    with monkeypatch.context() as m:
        m.setattr(attn_mod, "_short", lambda q, L: L <= attn_mod.SHORT_CELL)
        short = attention(q, k, v, Packing(offsets, query=query), scale=0.25)
    assert calls
    torch.testing.assert_close(short, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa, ref, atol=1e-5, rtol=1e-5)

    calls.clear()
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    short_bf16 = attention(qb, kb, vb, Packing(offsets, query=query), scale=0.25).float()
    assert calls  # the bf16 default
    monkeypatch.setattr(attn_mod, "SHORT_CELL", 0)  # every bucket through SDPA
    sdpa_bf16 = attention(qb, kb, vb, Packing(offsets, query=query), scale=0.25).float()
    for bf16 in (short_bf16, sdpa_bf16):  # both within bf16's rounding (2^-8 of ~3)
        torch.testing.assert_close(bf16, ref, atol=2e-2, rtol=2e-2)


_SHORT = attn_mod._short_attention


@pytest.mark.parametrize("generative", [False, True], ids=["full", "generative"])
def test_cells_of_one_length_attend_in_place(packed, generative):
    """Consecutive cells of one length (a screen's copies) are attended where they lie, with
    no gather; beside them, cells of other lengths still go through padded buckets."""
    L = int(packed.diff().min())
    lengths = torch.tensor([L] * 3 + [L // 3, 2 * L, L // 3 - 1])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    g = torch.Generator().manual_seed(2)
    query = torch.rand(int(offsets[-1]), generator=g) < 0.3 if generative else None
    p = Packing(offsets, query=query)
    spans = {b.L: b.span for b in p.buckets}
    assert spans == {2 * L: slice(3 * L + L // 3, 5 * L + L // 3),  # a cell alone, too
                     L: slice(0, 3 * L), L // 3: None}  # the short two need padding
    assert all((b.gather is None) == (b.span is not None) for b in p.buckets)
    q, k, v = _qkv(int(offsets[-1]))
    for dtype in (torch.float32, torch.bfloat16):
        x = [t.to(dtype) for t in (q, k, v)]
        out = attention(*x, p, scale=0.25).float()
        ref = attention(*x, Packing(offsets, query=query, backend="math"), scale=0.25).float()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_cells_do_not_attend_to_each_other(packed):
    q, k, v = _qkv(int(packed[-1]))
    full = attention(q, k, v, Packing(packed, backend="sdpa"), scale=0.25)
    for i in (0, 5, len(packed) - 2):  # each cell alone gives its slice of the batch
        s = slice(int(packed[i]), int(packed[i + 1]))
        alone = attention(q[s], k[s], v[s], Packing(torch.tensor([0, s.stop - s.start]),
                                                   backend="sdpa"), scale=0.25)
        torch.testing.assert_close(full[s], alone, atol=1e-6, rtol=1e-5)


def test_buckets_cover_every_token_once_with_little_padding(packed):
    p = Packing(packed)
    assert all(b.span is None for b in p.buckets)  # real cells: all lengths differ
    dest = torch.cat([b.dest for b in p.buckets])
    assert torch.equal(dest.sort().values, torch.arange(p.n_tokens))
    for b in p.buckets:
        assert len(b.gather) <= attn_mod.BUCKET_WASTE * len(b.rows) or len(b.gather) == b.L


def test_empty_cells_and_unknown_backend():
    offsets = torch.tensor([0, 3, 3, 8])  # the middle cell has no token
    q, k, v = _qkv(8)
    a = attention(q, k, v, Packing(offsets, backend="sdpa"), scale=0.25)
    b = attention(q, k, v, Packing(offsets, backend="math"), scale=0.25)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="Unknown attention backend 'nope'"):
        attention(q, k, v, Packing(offsets, backend="nope"), scale=0.25)
    with pytest.raises(ValueError, match="one flag per token"):
        Packing(offsets, query=torch.zeros(3, dtype=torch.bool))


def test_flash_refuses_what_it_cannot_do():
    offsets = torch.tensor([0, 4])
    q, k, v = _qkv(4)
    if attn_mod.flash_attn_varlen_func is None:
        with pytest.raises(RuntimeError, match=r"pip install 'sclcm\[flash\]'"):
            attention(q, k, v, Packing(offsets, backend="flash"), scale=0.25)
    else:  # pragma: no cover - only where flash-attn is installed
        with pytest.raises(ValueError, match="CUDA fp16/bf16"):
            attention(q, k, v, Packing(offsets, backend="flash"), scale=0.25)
    # auto never picks flash for CPU float32 or a generative mask
    assert attn_mod.resolve_backend("auto", q, Packing(offsets)) == "sdpa"


def test_register_a_backend():
    calls = []

    def traced(q, k, v, packing, *, scale, dropout=0.0):
        calls.append(packing.n_cells)
        return attn_mod.math_attention(q, k, v, packing, scale=scale, dropout=dropout)

    attn_mod.register_attention("traced", traced)
    try:
        q, k, v = _qkv(5)
        attention(q, k, v, Packing(torch.tensor([0, 2, 5]), backend="traced"), scale=1.0)
    finally:
        del ATTENTION_BACKENDS["traced"]
    assert calls == [2]


@pytest.fixture(scope="module")
def scgpt():
    tok, batch = tokens("scgpt")
    torch.manual_seed(0)
    model = CellModel(ModelConfig.preset("scgpt", "tiny", vocab=tok.vocab), tokenizer=tok)
    return model.eval(), batch


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_whole_model_agrees_across_backends(scgpt, backend):
    model, batch = scgpt
    inputs = model.inputs(batch)
    with torch.no_grad():
        ref = model(**inputs, attn_implementation="math", output_hidden_states=True)
        out = model(**inputs, attn_implementation=backend, output_hidden_states=True)
    for layer, h in ref["hidden_states"].items():
        torch.testing.assert_close(out["hidden_states"][layer], h, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_generative_query_sees_only_known_genes_and_itself(scgpt, backend):
    """Change every other query gene of a cell (identity and value): a query's output stays
    the same; change one known gene: it moves. Known genes never see any query."""
    model, batch = scgpt
    inputs = model.inputs(batch[[0, 1]])
    masked = random_mask(batch[[0, 1]], 0.3, seed=1)
    offsets = inputs["offsets"]
    start, end = int(offsets[0]), int(offsets[1])
    queries = masked[start:end].nonzero()[:, 0] + start
    known = (~masked[start:end]).nonzero()[:, 0][1:] + start  # a known gene after <cls>
    q0, others = queries[0], queries[1:]

    def run(ids, values):
        with torch.no_grad():
            return model(ids, offsets, values, masked=masked, generative=True,
                         attn_implementation=backend, heads=False)["last_hidden_state"]

    base = run(inputs["gene_ids"], inputs["values"])
    ids, values = inputs["gene_ids"].clone(), inputs["values"].clone()
    ids[others] = torch.randint(4, len(model.vocab), (len(others),))
    values[others] = (values[others] + 7) % 51
    moved = run(ids, values)
    assert torch.equal(moved[q0], base[q0])
    assert torch.equal(moved[known], base[known])
    assert (moved[others] - base[others]).abs().amax(1).min() > 1e-2  # changed queries moved
    values = inputs["values"].clone()
    values[known[0]] = (values[known[0]] + 7) % 51  # one known gene of ~600
    assert (run(inputs["gene_ids"], values)[q0] - base[q0]).abs().max() > 1e-5
    ids = inputs["gene_ids"].clone()
    ids[q0] = (ids[q0] + 1) % len(model.vocab)  # and on its own identity
    assert (run(ids, inputs["values"])[q0] - base[q0]).abs().max() > 1e-2
    # and the second cell is untouched by anything done to the first
    assert torch.equal(moved[end:], base[end:])


def test_generative_needs_masked(scgpt):
    model, batch = scgpt
    with pytest.raises(ValueError, match="generative=True needs masked"):
        model(**model.inputs(batch[[0]]), generative=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_flash_matches_math_on_gpu(packed, dtype):  # pragma: no cover - needs CUDA
    pytest.importorskip("flash_attn")
    q, k, v = _qkv(int(packed[-1]), dtype=dtype, device="cuda")
    p = Packing(packed.cuda())
    flash = attention(q, k, v, Packing(packed.cuda(), backend="flash"), scale=D**-0.5)
    ref = attention(q.float(), k.float(), v.float(), Packing(packed.cuda(), backend="math"),
                    scale=D**-0.5)
    assert attn_mod.resolve_backend("auto", q, p) == "flash"
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(flash.float(), ref, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_sdpa_matches_math_on_gpu(packed):  # pragma: no cover - needs CUDA
    q, k, v = _qkv(int(packed[-1]), device="cuda")
    out = {b: attention(q, k, v, Packing(packed.cuda(), backend=b), scale=D**-0.5)
           for b in ("sdpa", "math")}
    torch.testing.assert_close(out["sdpa"], out["math"], atol=1e-4, rtol=1e-4)
    assert np.isfinite(out["sdpa"].cpu().numpy()).all()


@pytest.mark.gpu
def test_model_on_gpu_bf16_auto_backend_matches_math(scgpt):  # pragma: no cover - CUDA
    model, batch = scgpt
    inputs = model.inputs(batch[:8])
    masked = random_mask(batch[:8], 0.0)  # nothing masked: no generative mask, flash allowed
    with torch.no_grad():
        ref = model(**inputs, masked=masked, attn_implementation="math")["cell_embedding"]
        gpu = model.to("cuda", torch.bfloat16)
        try:
            out = gpu(**gpu.inputs(batch[:8]), masked=masked.cuda())["cell_embedding"]
        finally:
            model.to("cpu", torch.float32)
    torch.testing.assert_close(out.float().cpu(), ref, atol=5e-2, rtol=5e-2)
