"""Pretraining throughput: the data streams, and training on them, in cells/s and tokens/s.

    python benchmarks/pretrain.py [--data DIR] [--block-size 1024] [--workers 0]
                                  [--device cpu|cuda] [--train-cells N] [--max-tokens N]
                                  [--peak-tflops 989] [--skip-streams] [--size SIZE]
                                  [--stream-files GLOB ...] [--json PATH]

Stream part: writes a local Census of every dataset in the shared data folder into a
temporary directory, and the same human cells (the Census's genes, Ensembl IDs) as one
.h5ad; then reads every human cell once per epoch, for two epochs, through

- ``CensusStream`` (tiledbsoma-ml over the local Census), and
- ``AnnDataStream`` over the .h5ad opened ``backed="r"``.

Both shuffle (chunks of 64 cells, then within a buffer) and yield CSR blocks with their
obs. Epoch 0 of the Census stream includes tiledbsoma-ml's numba compilation (several
seconds per process); epoch 1 is the steady state. Then the same streams tokenized
(Geneformer, 2,048 tokens, gene medians of pbmc3k), which is what training reads.

Training part: pretraining steps of a Geneformer-shaped model (masked gene identity, AdamW,
gradient clipping) on real pbmc3k cells, the same cells two ways, timed step by step in
turns (a background load slows both alike):

- packed: micro-batches cut by ``--max-tokens`` with cells grouped by length
  (``sclcm.train.micro_batches``), as ``sclcm.train`` trains; attention by the ``sdpa``
  backend (per length bucket) on CPU; on CUDA flash-attn's varlen kernel, or torch's own
  (``torch.nn.attention.varlen``) when flash-attn is not installed;
- padded: cells in stream order under the same budget, each padded with ``<pad>`` tokens
  to the batch's longest cell, so every layer runs over the padding, as in a padded trainer.

tokens/s counts real tokens only. The ratio stream cells/s / training cells/s says whether
the stream keeps up (the pretraining issue asks for at least 5x). ``--device cuda`` trains
the ``base`` shape (12 x 768) in bf16 and reports the model FLOPs utilization:

    MFU = FLOPs per second / peak (``--peak-tflops``, default 989: H100 SXM dense bf16)
    FLOPs of a step = 6 * N_enc * T + 6 * N_head * M + 12 * L * d * sum_c len_c^2

with N_enc the encoder's parameters (all T tokens pass them; 2 FLOPs a multiply-add, x3
for forward + backward), N_head those of the MLM head (only the M masked tokens), and the
attention scores and weighted sums (4 d len FLOPs per token and layer forward, x3) over
each cell's own len_c tokens (attention never crosses cells); embeddings and norms are left
out, as is usual.

``--size tiny``, ``--stream-files`` (which of the data folder's files go into the local
Census) and a few ``--train-cells`` make a quick check of the same path
(``benchmarks/gpu.py --dry-run``); ``--json PATH`` writes the figures there too.
"""

from __future__ import annotations

import sys

# benchmarks/tokenize.py is named like the standard library's tokenize module, which
# numpy's imports load: take this folder off the path before importing anything else.
sys.path = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ["SCLCM_PROGRESS"] = "0"
os.environ["SCLCM_VERBOSITY"] = "warning"

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PBMC3K = "sctypegsea_10x_pbmc3k_raw_2700.h5ad"


def stream_rate(stream, epochs: int = 2) -> list[tuple[int, float]]:
    """``(cells, cells/s)`` of each epoch of ``stream`` (blocks counted as they arrive)."""
    out = []
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        start = time.perf_counter()
        n = sum(block.n_cells for block in stream)
        out.append((n, n / (time.perf_counter() - start)))
    return out


class Loader:
    """The DataLoader CellDataModule makes for ``stream``, its epoch set as a trainer would."""

    def __init__(self, stream, workers: int) -> None:
        from sclcm.data import CellDataModule

        module = CellDataModule(stream, num_workers=workers)  # persistent workers
        module.setup("fit")
        self.loader, self._epoch = module.train_dataloader(), 0
        self.loader.epoch = self.current_epoch

    def current_epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self):
        return iter(self.loader)


# --- training ---------------------------------------------------------------------
def padded_batches(batch, max_tokens: int, pad_id: int) -> list:
    """Cells in stream order, cut so that cells x longest <= ``max_tokens``, each cell
    padded with ``pad_id`` tokens to its batch's longest (every layer runs over them)."""
    import numpy as np

    from sclcm.tokenizers import TokenBatch

    out, start, lengths = [], 0, batch.lengths
    for i in range(1, batch.n_cells + 1):
        if i == batch.n_cells or (i + 1 - start) * int(lengths[start:i + 1].max()) > max_tokens:
            part = batch[np.arange(start, i)]
            ids, values, _ = part.to_padded(pad_id)
            n, L = ids.shape
            out.append((TokenBatch(ids.ravel(), values.ravel(), np.arange(n + 1) * L,
                                   part.cell_index, part.extras), part.lengths))
            start = i
    return out


def training_flops(model, n_tokens: int, n_masked: int, lengths) -> float:
    """Model FLOPs of one training step (see the module docstring)."""
    import numpy as np

    cfg = model.config
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_head = sum(p.numel() for p in model.head.parameters())  # the tied decoder included
    attention = 12 * cfg.n_layers * cfg.d_model * float(np.square(lengths.astype(float)).sum())
    return 6.0 * n_enc * n_tokens + 6.0 * n_head * n_masked + attention


def torch_varlen_attention(q_thd, k_thd, v_thd, packing, *, scale, dropout=0.0):
    """Torch's own flash varlen kernel on the packed tokens (when flash-attn is absent)."""
    from torch.nn.attention.varlen import varlen_attn

    if dropout:
        msg = "torch's varlen attention has no dropout; build the model with attn_dropout=0."
        raise ValueError(msg)
    cu = packing.cu_seqlens_i32
    return varlen_attn(q_thd, k_thd, v_thd, cu, cu, packing.max_len, packing.max_len,
                       scale=scale)


def cuda_backend(choice: str | None = None) -> str:
    """``choice``, or by default flash-attn if it imports, else torch's varlen flash kernel,
    else per-bucket sdpa."""
    from sclcm.models import register_attention
    from sclcm.models._attention import flash_attn_varlen_func

    if choice in ("flash", "sdpa"):
        return choice
    if choice is None and flash_attn_varlen_func is not None:
        return "flash"
    try:
        import torch.nn.attention.varlen  # noqa: F401  (torch >= 2.9)
    except ImportError:
        if choice is not None:
            raise SystemExit("--backend torch_varlen: this torch has no torch.nn.attention."
                             "varlen (torch >= 2.9).") from None
        return "sdpa"
    register_attention("torch_varlen", torch_varlen_attention)
    return "torch_varlen"


def train_rates(model, variants: dict, *, device, dtype, warmup: int = 2) -> dict:
    """Seconds, real tokens, cells and model FLOPs (of the real tokens: the useful work) of
    training steps of each variant, in turns; ``variants``: lists of (batch, real lengths)."""
    import itertools

    import torch

    from sclcm.train import PretrainModule

    module = PretrainModule(model, max_steps=10_000).to(device)
    opt = torch.optim.AdamW(model.param_groups(0.01), lr=1e-4, fused=device.type == "cuda")
    stats = {name: dict(seconds=0.0, tokens=0, cells=0, flops=0.0) for name in variants}
    rounds = itertools.zip_longest(*variants.values())
    for step, batches in enumerate(rounds):
        for name, item in zip(variants, batches, strict=True):
            if item is None:
                continue
            batch, lengths = item
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss, parts = module.masked_loss(batch, step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                s = stats[name]
                s["seconds"] += time.perf_counter() - start
                s["tokens"] += int(lengths.sum())
                s["cells"] += batch.n_cells
                # terms are {name: (sum, count)}; the token objective's count is the masked
                # tokens, the ones the MLM head runs on
                s["flops"] += training_flops(model, int(lengths.sum()),
                                             int(parts["objective"][1]), lengths)
    return stats


def training_benchmark(args, tokenizer, report: dict) -> float:
    """Print training throughput of packed vs padded batches (also into ``report``); return
    packed cells/s."""
    import anndata as ad
    import numpy as np
    import torch

    from sclcm.models import CellModel, ModelConfig
    from sclcm.train import MicroBatch, micro_batches

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here.")
    device = torch.device(args.device)
    size = args.size or ("base" if cuda else "small")
    backend = cuda_backend(args.backend) if cuda else "sdpa"
    dtype = torch.bfloat16 if cuda else torch.float32
    n_cells = args.train_cells or (2048 if cuda else 48)
    max_tokens = args.max_tokens or (32_768 if cuda else 8_192)

    pbmc = ad.read_h5ad(args.data / PBMC3K)
    rows = np.random.default_rng(0).choice(pbmc.n_obs, n_cells, replace=False)
    cells = tokenizer.tokenize(pbmc[np.sort(rows)])  # in file order: the stream's order
    vocab = tokenizer.vocab
    # ModelConfig admits only the built-in backend names; a registered one (torch_varlen) is
    # set on the built model, which reads it at every forward pass.
    config = ModelConfig.preset("geneformer", size, vocab=vocab, max_position=tokenizer.max_len,
                                dropout=0.0, attn_dropout=0.0,
                                attn_implementation="auto" if backend == "torch_varlen"
                                else backend)
    torch.manual_seed(0)
    model = CellModel(config, vocab=vocab).to(device)
    model.config.attn_implementation = backend
    packed = [(MicroBatch(b, 0, i), b.lengths) for i, b in enumerate(
        micro_batches(cells, max_tokens, rng=np.random.default_rng(0)))]
    padded = [(MicroBatch(b, 0, i), lengths) for i, (b, lengths) in enumerate(
        padded_batches(cells, max_tokens, vocab.pad_id))]
    n_padded = sum(b.n_tokens for b, _ in padded)
    print(f"\ntraining: geneformer {size} ({config.n_layers} x {config.d_model}, "
          f"{model.get_num_params() / 1e6:.1f}M parameters, vocabulary {len(vocab):,}) on "
          f"{device.type} {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} CPU "
          f"threads, load average {os.getloadavg()[0]:.2f}\n"
          f"  {cells.n_cells} pbmc3k cells, {cells.n_tokens:,} tokens (length "
          f"{cells.lengths.min()}..{cells.lengths.max()}, mean {cells.lengths.mean():.0f}); "
          f"max_tokens={max_tokens:,}: {len(packed)} packed, {len(padded)} padded batches "
          f"({n_padded / cells.n_tokens:.2f}x the tokens)")
    stats = train_rates(model, {f"packed ({backend}, length-grouped)": packed,
                                "padded (whole batch to its longest cell)": padded},
                        device=device, dtype=dtype)
    print(f"  {'batches':<44} {'tokens/s':>10} {'cells/s':>9}" + ("   MFU" if cuda else ""))
    rates = {}
    report["training"] = {"device": device.type, "dtype": str(dtype).removeprefix("torch."),
                          "size": size, "backend": backend, "cells": cells.n_cells,
                          "tokens": cells.n_tokens, "max_tokens": max_tokens,
                          "parameters": model.get_num_params(),
                          "peak_tflops": args.peak_tflops, "variants": {}}
    for name, s in stats.items():
        rates[name] = s["cells"] / s["seconds"]
        mfu = s["flops"] / s["seconds"] / (args.peak_tflops * 1e12)
        report["training"]["variants"][name] = {
            "tokens_per_s": s["tokens"] / s["seconds"], "cells_per_s": rates[name],
            "mfu": mfu if cuda else None, **s}
        print(f"  {name:<44} {s['tokens'] / s['seconds']:>10,.0f} {rates[name]:>9.2f}"
              + (f" {mfu:6.1%}" if cuda else ""))
    first, second = list(stats.values())
    speed = (first["tokens"] / first["seconds"]) / (second["tokens"] / second["seconds"])
    report["training"]["packed_over_padded"] = speed
    print(f"  packed / padded: {speed:.2f}x the real tokens per second")
    if cuda:
        print(f"  MFU = model FLOPs/s / {args.peak_tflops:g} TFLOP/s peak (FLOPs: 6 N_enc T + 6 "
              "N_head M + 12 L d sum len^2)")
    return next(iter(rates.values()))


def geneformer_tokenizer(data: Path, max_len: int):
    """Geneformer's tokenizer over pbmc3k's genes, with pbmc3k's gene medians."""
    import anndata as ad

    from sclcm.genes import GeneVocab, resolve
    from sclcm.tokenizers import GeneformerTokenizer

    pbmc = ad.read_h5ad(data / PBMC3K)
    report = resolve(pbmc, count_coverage=False)
    return GeneformerTokenizer(GeneVocab.from_report(report), max_len=max_len).fit(
        pbmc, report=report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("SCLCM_DATA",
                                                                         DEFAULT_DATA)))
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where training runs (cuda: base shape, bf16, flash)")
    parser.add_argument("--train-cells", type=int, default=0,
                        help="pbmc3k cells trained on (default 48 on CPU, 2048 on CUDA)")
    parser.add_argument("--max-tokens", type=int, default=0,
                        help="token budget of a batch (default 8192 on CPU, 32768 on CUDA)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="peak dense bf16 TFLOP/s of the GPU, for MFU (H100 SXM: 989)")
    parser.add_argument("--skip-streams", action="store_true", help="training part only")
    parser.add_argument("--size", choices=("tiny", "small", "base"),
                        help="model shape trained (default: base on CUDA, small on CPU)")
    parser.add_argument("--stream-files", nargs="+", default=["*.h5ad"], metavar="GLOB",
                        help="files of --data written into the local Census (default: all)")
    parser.add_argument("--backend", choices=("flash", "torch_varlen", "sdpa"),
                        help="attention on CUDA (default: flash-attn, else torch's varlen "
                        "kernel, else sdpa)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's); on a machine shared with "
                        "other jobs, 1 avoids OpenMP threads spinning against them")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import sclcm

    sclcm.settings.verbosity, sclcm.settings.progress = "warning", False
    if not (args.data / PBMC3K).exists():
        raise SystemExit(f"No {PBMC3K} in {args.data}; pass --data or set SCLCM_DATA.")
    tokenizer = geneformer_tokenizer(args.data, 4096 if args.device == "cuda" else 2048)
    report: dict = {}
    stream_rates = {} if args.skip_streams else streams_benchmark(args, tokenizer, report)
    train = training_benchmark(args, tokenizer, report)
    if stream_rates:
        print(f"\nstream / training (tokenized stream cells/s / packed training cells/s on "
              f"{args.device}; the issue asks for >= 5):")
        for name, rate in stream_rates.items():
            print(f"  {name:<45} {rate / train:>10,.0f}x")
        report["stream_over_training"] = {k: r / train for k, r in stream_rates.items()}
    if args.json:
        import json

        args.json.write_text(json.dumps(report, indent=1))


def streams_benchmark(args, tokenizer, report: dict) -> dict[str, float]:
    """Print the streams' rates, raw and tokenized (also into ``report``); return the
    tokenized epoch-1 rates."""
    import cellxgene_census

    from sclcm.data import AnnDataStream, CensusStream, write_local_census

    files = sorted({f for pattern in args.stream_files for f in args.data.glob(pattern)})
    report["streams"] = {}
    tokenized = {}
    with tempfile.TemporaryDirectory(prefix="sclcm_bench_") as tmp:
        start = time.perf_counter()
        uri = write_local_census(files, Path(tmp) / "census")
        print(f"local Census of {len(files)} datasets written in "
              f"{time.perf_counter() - start:.1f} s")
        with cellxgene_census.open_soma(uri=uri) as census, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anndata: integer index turned into strings
            human = cellxgene_census.get_anndata(census, "Homo sapiens")
        h5ad = Path(tmp) / "human.h5ad"
        human.write_h5ad(h5ad)
        print(f"human cells: {human.n_obs} x {human.n_vars} genes, {human.X.nnz} stored "
              f"values; block_size={args.block_size}, DataLoader workers={args.workers}\n")
        del human

        streams = {
            "CensusStream (tiledbsoma-ml, local Census)": CensusStream(
                uri=uri, organism="Homo sapiens", block_size=args.block_size),
            "AnnDataStream (.h5ad, backed='r')": AnnDataStream(
                h5ad, block_size=args.block_size),
        }
        print(f"{'stream':<45} {'epoch':>5} {'cells':>8} {'cells/s':>10}")
        for name, stream in streams.items():
            for label, s in ((name, stream), ("  + Geneformer tokenizer",
                                              stream.tokenize(tokenizer))):
                source = Loader(s, args.workers) if args.workers else s
                for epoch, (n, rate) in enumerate(stream_rate(source)):
                    print(f"{label:<45} {epoch:>5} {n:>8} {rate:>10,.0f}")
                    kind = "tokenized" if s is not stream else "raw"
                    report["streams"].setdefault(name, {})[f"{kind}_epoch{epoch}"] = rate
                if s is not stream:
                    tokenized[name] = rate  # epoch 1: the steady state
                del source  # stop its persistent workers before the next stream's start
                gc.collect()
    return tokenized


if __name__ == "__main__":
    main()
