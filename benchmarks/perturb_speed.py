"""In-silico deletion of every gene: sclcm.tl.perturb vs one forward pass per perturbed copy.

The model is Geneformer's small shape (gf-6L-30M: 6 layers x 256, 4 heads, 512 in the MLP)
with random weights (speed does not depend on them), made as the published tool reads it: a
transformers ``BertForMaskedLM`` saved with Geneformer's token and median pickles, then
loaded into sclcm with :func:`sclcm.models.import_geneformer`, so that both sides run the
same weights on the same pbmc3k cells, tokenized the same way. Each expressed gene of each
cell is deleted in turn (``genes="all"``). Prints perturbed copies (perturbed cells) per
second of each and the ratios.

- sclcm: ``sclcm.tl.perturb(adata, "all")`` end to end (tokenizing, the expression pass,
  the originals, every copy packed into forward passes by a token budget, the statistics),
  in float32 and, where the CPU has native bf16 (AVX512-BF16, AMX), with
  ``precision="bfloat16"``, whose scores are compared with the float32 ones (Pearson r per
  copy, Spearman of the table's mean shifts, top 20 genes in common).
- reference, as the published tool does it: a Python loop over cells, the copies of a cell
  made with list operations, one forward pass per copy (batch of one) of transformers'
  ``BertForMaskedLM`` with ``output_hidden_states=True`` (so with the MLM logits over the
  vocabulary), float32 on a CPU, the mean over gene tokens, the cosine to the original.
- the same loop through sclcm's own model, encoder only (no logits), in float32 and bf16:
  what packing alone gains at equal precision.

References are timed on the first ``--ref-copies`` copies and extrapolated per copy to all
of them (said so in the output). Every measurement is taken ``--repeats`` times, the rounds
interleaved, and the ratios use each side's best run, so that a burst of load from other
processes on a shared machine slows one run rather than one side.

Cells are cut to ``--max-len`` tokens (default 64: ``<cls>``, the cell's 62 top-ranked
genes, ``<eos>``), because deleting each of a cell's ~850 genes costs ~850 forward passes
of ~850 tokens, too many for a CPU; the work per copy grows with the length on both sides.
``--model DIR`` times a saved sclcm model instead (no transformers reference then). Needs
``transformers`` (the ``test`` extra). ``--device cuda`` runs both sides on the GPU (float32
and bf16 autocast; the reference loop then leaves the GPU mostly idle, which is what packing
avoids); ``--json PATH`` writes the figures there too.

    python benchmarks/perturb_speed.py [--cells 200] [--max-len 64] [--ref-copies 600]
                                       [--repeats 2] [--threads N] [--model DIR]
                                       [--device cpu|cuda] [--json PATH]
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py would shadow the standard library's tokenize module
if os.path.dirname(os.path.abspath(__file__)) in sys.path:
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))

import argparse
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch
import torch.nn.functional as F

import sclcm
from sclcm.genes import GeneVocab, resolve
from sclcm.models import CellModel, import_geneformer
from sclcm.tokenizers import GeneformerTokenizer, TokenBatch

PBMC3K = "sctypegsea_10x_pbmc3k_raw_2700.h5ad"


SMALL = dict(num_hidden_layers=6, hidden_size=256, num_attention_heads=4,
             intermediate_size=512, max_position_embeddings=2048)  # Geneformer gf-6L-30M


def write_geneformer(adata: ad.AnnData, directory: Path):
    """A random transformers ``BertForMaskedLM`` of Geneformer's small shape on the pbmc3k
    genes, saved with Geneformer's token and median pickles; returns the transformers
    model (what the published tool loads)."""
    import pickle

    import transformers

    report = resolve(adata, count_coverage=False)
    vocab = GeneVocab.from_report(report)
    medians = GeneformerTokenizer(vocab).fit(adata, report=report).medians
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_act="relu",
                                     layer_norm_eps=1e-12, pad_token_id=0, **SMALL)
    hf = transformers.BertForMaskedLM(config).eval()
    transformers.utils.logging.disable_progress_bar()
    hf.save_pretrained(directory)
    with (directory / "token_dictionary.pkl").open("wb") as fh:
        pickle.dump({t: i for i, t in enumerate(vocab.tokens)}, fh)
    with (directory / "gene_median_dictionary.pkl").open("wb") as fh:
        pickle.dump({g: float(m) for g, m in zip(vocab.genes, medians, strict=True)}, fh)
    return hf


def model_and_cells(args, workdir: Path):
    """``(sclcm model, transformers model or None, cells)``: the same weights on both sides."""
    data = Path(os.environ.get("SCLCM_DATA", Path(__file__).resolve().parents[2] / "shared"
                               / "data"))
    adata = ad.read_h5ad(data / PBMC3K)
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, args.cells, replace=False))
    hf = None
    if args.model:
        model = sclcm.tl.get_model(args.model, device=args.device)
    else:
        hf = write_geneformer(adata, workdir).to(args.device)
        model = import_geneformer(workdir).to(args.device)
    old = model.tokenizer
    tok = GeneformerTokenizer(old.vocab, old.medians, max_len=args.max_len,
                              special_tokens=old.special_tokens)
    model.tokenizer = None
    model.attach_tokenizer(tok)
    return model.eval(), hf, adata[rows].copy()


def _hf_embedding(hf, ids: list[int], n_special: int) -> torch.Tensor:
    """What the published tool runs per copy: ``BertForMaskedLM`` with hidden states (and
    so the logits over the vocabulary), then the mean over the gene tokens."""
    x = torch.tensor([ids], device=hf.device)
    out = hf(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True)
    return out.hidden_states[-1][0, x[0] >= n_special].mean(0, keepdim=True)


@torch.inference_mode()
def reference(model: CellModel, batch: TokenBatch, max_copies: int, *, heads: bool = False,
              hf=None) -> tuple[int, float]:
    """One forward pass per copy, one cell at a time, through sclcm's model or through
    transformers (``hf``); returns (copies, seconds)."""
    n_special = model.config.n_special_tokens
    done, start = 0, time.perf_counter()
    for c in range(batch.n_cells):
        ids, values = (a.tolist() for a in batch.cell(c))
        one = batch[c]
        if hf is not None:
            o = _hf_embedding(hf, ids, n_special)
        else:
            o = model(**model.inputs(one), heads=heads)["cell_embedding"]
        for i, gene in enumerate(ids):
            if gene < n_special:
                continue
            copy_ids, copy_values = ids[:i] + ids[i + 1:], values[:i] + values[i + 1:]
            if hf is not None:
                p = _hf_embedding(hf, copy_ids, n_special)
            else:
                copy = TokenBatch(np.array(copy_ids, np.int32),
                                  np.array(copy_values, np.float32),
                                  np.array([0, len(copy_ids)]), one.cell_index)
                p = model(**model.inputs(copy), heads=heads)["cell_embedding"]
            F.cosine_similarity(o, p)
            done += 1
            if done == max_copies:
                return done, _since(start)
    return done, _since(start)


def _since(start: float) -> float:
    """Seconds since ``start``, once the GPU (if used) has finished what was queued."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _sclcm(adata: ad.AnnData, model: CellModel, precision: str, n_copies: int
           ) -> tuple[float, ad.AnnData]:
    """sclcm.tl.perturb end to end; returns (copies per second, the AnnData with results)."""
    device = next(model.parameters()).device
    sclcm.tl.perturb(adata[:2].copy(), "all", model=model, n_null=2, precision=precision,
                     device=device)
    adata = adata.copy()
    start = time.perf_counter()
    sclcm.tl.perturb(adata, "all", model=model, n_null=10, precision=precision, device=device)
    seconds = time.perf_counter() - start  # perturb returns results on the host: synchronized
    done = int(np.isfinite(adata.obsm["sclcm_perturb"]).sum())
    assert done == n_copies, (done, n_copies)
    return n_copies / seconds, adata


def _runs(rates: list[float]) -> str:
    return f"{max(rates):.1f}" + (f" (best of {', '.join(f'{r:.1f}' for r in rates)})"
                                   if len(rates) > 1 else "")


def _agreement(a: ad.AnnData, b: ad.AnnData) -> str:
    """How far bf16 scores are from float32 ones: per copy, and the table's ranking."""
    from scipy.stats import pearsonr, spearmanr

    x, y = a.obsm["sclcm_perturb"], b.obsm["sclcm_perturb"]
    ok = np.isfinite(x)
    ta = a.uns["sclcm_perturb"]["table"].set_index("gene")
    tb = b.uns["sclcm_perturb"]["table"].set_index("gene").loc[ta.index]
    top = len(set(ta.index[:20]) & set(tb.sort_values("mean_shift", ascending=False
                                                     ).index[:20]))
    rel = np.median(np.abs(x[ok] - y[ok]) / np.abs(x[ok]))
    return (f"bfloat16 vs float32 scores: Pearson r {pearsonr(x[ok], y[ok])[0]:.4f} over "
            f"{ok.sum()} copies (median relative difference {rel:.3f}); table mean shifts "
            f"Spearman {spearmanr(ta.mean_shift, tb.mean_shift)[0]:.4f}, top 20 genes in "
            f"common {top}/20")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--max-len", type=int, default=64, help="tokens per cell (default 64)")
    p.add_argument("--ref-copies", type=int, default=600,
                   help="copies the reference is timed on, then extrapolated")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each measurement, interleaved; the best counts (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--model", help="a saved Geneformer-family model (default: random weights)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where both sides run (default cpu)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here.")
    if args.threads:
        torch.set_num_threads(args.threads)
    sclcm.settings.verbosity, sclcm.settings.progress = "warning", False
    with tempfile.TemporaryDirectory() as workdir:
        model, hf, adata = model_and_cells(args, Path(workdir))
    cfg = model.config
    batch = model.tokenizer.encode(adata.X, model.tokenizer.column_map(adata))
    n_copies = int((batch.gene_ids >= cfg.n_special_tokens).sum())
    load = os.getloadavg()[0]
    cuda = args.device == "cuda"
    bf16 = cuda or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    weights = "weights from " + args.model if args.model else "random weights"
    where = (f"CUDA ({torch.cuda.get_device_name()})" if cuda else
             f"CPU ({torch.backends.cpu.get_cpu_capability()}, native bf16: "
             f"{'yes' if bf16 else 'no'})")
    print(f"model: geneformer {cfg.n_layers} layers x {cfg.d_model}, {cfg.n_heads} heads, "
          f"{cfg.vocab_size} tokens ({weights}); {where}, {torch.get_num_threads()} torch "
          f"thread(s), load average {load:.1f} on {os.cpu_count()} cores")
    print(f"cells: {batch.n_cells} pbmc3k cells cut to --max-len {args.max_len} tokens "
          f"(mean {batch.lengths.mean():.1f}); genes='all', mode='delete': {n_copies} "
          f"perturbed copies")
    if torch.get_num_threads() > 1 and load > (os.cpu_count() or 1):
        print("note: the machine is busy; with more than one thread, every op of a small "
              "forward pass waits for the other threads, which slows the reference most "
              "(compare --threads 1)")

    precisions = ("float32", "bfloat16") if bf16 else ("float32",)
    refs = [("sclcm's model, encoder only, float32", None, "float32")]
    if bf16:
        refs.append(("sclcm's model, encoder only, bfloat16", None, "bfloat16"))
    if hf is not None:
        with torch.inference_mode():  # the same weights on both sides
            ids = batch.cell(0)[0].tolist()
            diff = (_hf_embedding(hf, ids, cfg.n_special_tokens)
                    - model(**model.inputs(batch[0]))["cell_embedding"]).abs().max()
        refs.insert(0, ("transformers BertForMaskedLM with hidden states and MLM logits, "
                        f"float32 (what the published tool runs; same weights: max |diff| "
                        f"of embeddings {float(diff):.1e})", hf, "float32"))
    rates = {p: [] for p in precisions}
    ref_rates: list[list[float]] = [[] for _ in refs]
    results, ref_k = {}, 0
    for _ in range(args.repeats):
        for precision in precisions:
            rate, results[precision] = _sclcm(adata, model, precision, n_copies)
            rates[precision].append(rate)
        for i, (_, ref_hf, precision) in enumerate(refs):
            with torch.autocast(args.device, dtype=torch.bfloat16,
                                enabled=precision == "bfloat16"):
                reference(model, batch[:1], 5, hf=ref_hf)  # warm up
                ref_k, t = reference(model, batch, args.ref_copies, hf=ref_hf)
            ref_rates[i].append(ref_k / t)

    for precision in precisions:
        print(f"sclcm.tl.perturb, {precision}: {_runs(rates[precision])} perturbed cells/s "
              f"(end to end, statistics included: {n_copies} copies in "
              f"{n_copies / max(rates[precision]):.1f} s)")
    if bf16:
        print("    " + _agreement(results["float32"], results["bfloat16"]))
    else:
        print("    (bfloat16 not timed: this CPU has no native bf16, where it is slower)")
    if hf is None:
        print("(--model: the transformers reference needs a Geneformer checkpoint; "
              "only sclcm's model is timed one copy at a time)")
    for (what, _, _), runs in zip(refs, ref_rates, strict=True):
        ref_rate = max(runs)
        print(f"reference, one forward per copy: {what}: timed on the first {ref_k} copies: "
              f"{_runs(runs)} perturbed cells/s; extrapolated to all {n_copies} copies: "
              f"{n_copies / ref_rate:.0f} s")
        print("    speed-up of sclcm: " + ", ".join(
            f"{max(r) / ref_rate:.1f}x ({name})" for name, r in rates.items()))
    if args.json:
        import json

        args.json.write_text(json.dumps({
            "device": args.device, "cells": batch.n_cells, "max_len": args.max_len,
            "copies": n_copies, "ref_copies": ref_k,
            "sclcm": {p: max(r) for p, r in rates.items()},
            "references": [{"name": what.split(" (")[0], "copies_per_s": max(runs),
                            "transformers": ref_hf is not None, "precision": prec}
                           for (what, ref_hf, prec), runs in zip(refs, ref_rates,
                                                                 strict=True)]}, indent=1))


if __name__ == "__main__":
    main()
