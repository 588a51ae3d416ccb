"""In-silico deletion of every gene: sclcm.tl.perturb vs one forward pass per perturbed copy.

Both sides run the same model (Geneformer's small shape, ``ModelConfig.preset("geneformer",
"small")``: 6 layers x 256, 4 heads; random weights unless ``--model`` is given, speed does
not depend on them) on the same pbmc3k cells, tokenized by the same Geneformer tokenizer, and
delete each expressed gene of each cell in turn (``genes="all"``). Prints perturbed copies
(perturbed cells) per second of each and their ratio.

- sclcm: ``sclcm.tl.perturb(adata, "all")`` end to end (tokenizing, the expression pass,
  the originals, every copy packed into forward passes by a token budget, the statistics).
- reference: what the published tool does per cell: a Python loop over cells, the copies
  of a cell made with list operations, one forward pass per copy (batch of one), the
  cosine to the original embedding. It is timed on the first ``--ref-copies`` copies and
  extrapolated per copy to all of them (said so in the output). ``--mlm-head`` also times it
  with the MLM logits over the vocabulary, which the published tool computes as well (it
  runs ``BertForMaskedLM``).

Cells are cut to ``--max-len`` tokens (default 64: ``<cls>``, the cell's 62 top-ranked
genes, ``<eos>``), because deleting each of a cell's ~850 genes costs ~850 forward passes of ~850
tokens, too many for a CPU; the work per copy grows with the length on both sides.

    python benchmarks/perturb_speed.py [--cells 200] [--max-len 64] [--ref-copies 400]
                                       [--threads N] [--model DIR]
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py would shadow the standard library's tokenize module
if os.path.dirname(os.path.abspath(__file__)) in sys.path:
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch
import torch.nn.functional as F

import sclcm
from sclcm.genes import GeneVocab, resolve
from sclcm.models import CellModel, ModelConfig
from sclcm.tokenizers import GeneformerTokenizer, TokenBatch

PBMC3K = "sctypegsea_10x_pbmc3k_raw_2700.h5ad"


def model_and_cells(args) -> tuple[CellModel, ad.AnnData]:
    data = Path(os.environ.get("SCLCM_DATA", Path(__file__).resolve().parents[2] / "shared"
                               / "data"))
    adata = ad.read_h5ad(data / PBMC3K)
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, args.cells, replace=False))
    if args.model:
        model = sclcm.tl.get_model(args.model, device="cpu")
        old = model.tokenizer
        tok = GeneformerTokenizer(old.vocab, old.medians, max_len=args.max_len,
                                  special_tokens=old.special_tokens)
    else:
        report = resolve(adata, count_coverage=False)
        vocab = GeneVocab.from_report(report)
        tok = GeneformerTokenizer(vocab, max_len=args.max_len).fit(adata, report=report)
        torch.manual_seed(0)
        model = CellModel(ModelConfig.preset("geneformer", "small", vocab=vocab))
    model.tokenizer = None
    model.attach_tokenizer(tok)
    return model.eval(), adata[rows].copy()


@torch.inference_mode()
def reference(model: CellModel, batch: TokenBatch, max_copies: int, *,
              heads: bool) -> tuple[int, float]:
    """One forward pass per copy, one cell at a time; returns (copies, seconds)."""
    n_special = model.config.n_special_tokens
    done, start = 0, time.perf_counter()
    for c in range(batch.n_cells):
        ids, values = (a.tolist() for a in batch.cell(c))
        one = batch[c]
        o = model(**model.inputs(one), heads=heads)["cell_embedding"]
        for i, gene in enumerate(ids):
            if gene < n_special:
                continue
            copy_ids, copy_values = ids[:i] + ids[i + 1:], values[:i] + values[i + 1:]
            copy = TokenBatch(np.array(copy_ids, np.int32), np.array(copy_values, np.float32),
                              np.array([0, len(copy_ids)]), one.cell_index)
            p = model(**model.inputs(copy), heads=heads)["cell_embedding"]
            F.cosine_similarity(o, p)
            done += 1
            if done == max_copies:
                return done, time.perf_counter() - start
    return done, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--max-len", type=int, default=64, help="tokens per cell (default 64)")
    p.add_argument("--ref-copies", type=int, default=400,
                   help="copies the reference is timed on, then extrapolated")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--mlm-head", action="store_true",
                   help="also time the reference with the MLM logits (as BertForMaskedLM)")
    p.add_argument("--model", help="a saved Geneformer-family model (default: random weights)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sclcm.settings.verbosity, sclcm.settings.progress = "warning", False
    model, adata = model_and_cells(args)
    cfg = model.config
    batch = model.tokenizer.encode(adata.X, model.tokenizer.column_map(adata))
    n_copies = int((batch.gene_ids >= cfg.n_special_tokens).sum())
    load = os.getloadavg()[0]
    print(f"model: geneformer {cfg.n_layers} layers x {cfg.d_model}, {cfg.n_heads} heads "
          f"({'weights from ' + args.model if args.model else 'random weights'}); "
          f"CPU, float32, {torch.get_num_threads()} torch thread(s), load average {load:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"cells: {batch.n_cells} pbmc3k cells cut to --max-len {args.max_len} tokens "
          f"(mean {batch.lengths.mean():.1f}); genes='all', mode='delete': {n_copies} "
          f"perturbed copies")
    if torch.get_num_threads() > 1 and load > (os.cpu_count() or 1):
        print("note: the machine is busy; with more than one thread, every op of a small "
              "forward pass waits for the other threads, which slows the reference most "
              "(compare --threads 1)")

    sclcm.tl.perturb(adata[:2].copy(), "all", model=model, n_null=2)  # warm up
    start = time.perf_counter()
    sclcm.tl.perturb(adata, "all", model=model, n_null=10)
    t_sclcm = time.perf_counter() - start
    done = int(np.isfinite(adata.obsm["sclcm_perturb"]).sum())
    assert done == n_copies, (done, n_copies)
    rate = n_copies / t_sclcm
    print(f"sclcm.tl.perturb: {n_copies} copies in {t_sclcm:.1f} s = {rate:.1f} perturbed "
          f"cells/s (end to end, statistics included)")

    rows = [("reference, one forward per copy (encoder only)", False)]
    if args.mlm_head:
        rows.append(("reference, one forward per copy + MLM logits", True))
    for what, heads in rows:
        reference(model, batch[:1], 5, heads=heads)  # warm up
        k, t = reference(model, batch, args.ref_copies, heads=heads)
        ref_rate = k / t
        print(f"{what}: timed on the first {k} copies ({t:.1f} s) = {ref_rate:.1f} perturbed "
              f"cells/s; extrapolated to all {n_copies} copies: {n_copies / ref_rate:.0f} s")
        print(f"    speed-up of sclcm: {rate / ref_rate:.1f}x")


if __name__ == "__main__":
    main()
