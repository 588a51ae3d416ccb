"""Cell-embedding throughput: sclcm (packed cells) vs transformers' BertModel (padded, SDPA).

Both run the same Geneformer-shaped weights (a random ``BertForMaskedLM`` saved by
transformers and read with :func:`sclcm.models.import_geneformer`) on the same pbmc3k cells,
tokenized with sclcm's Geneformer tokenizer, in batches of the same cells in the same order.
Prints tokens/s and cells/s of each and their ratio, for the ``small`` and ``base`` shapes;
on CPU in float32 and, where CUDA is available, in bf16 (sclcm with flash-attn when
installed). Reads pbmc3k from ``$SCLCM_DATA`` (default ``../shared/data``).

    python benchmarks/model_forward.py [--cells-small 128] [--cells-base 16]
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py would shadow the standard library's tokenize module, which numpy's
# imports load: keep this script's folder off the import path.
if os.path.dirname(os.path.abspath(__file__)) in sys.path:
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))

import argparse
import pickle
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import sclcm
from sclcm.genes import GeneVocab, resolve
from sclcm.models import import_geneformer
from sclcm.models._attention import flash_attn_varlen_func
from sclcm.tokenizers import GeneformerTokenizer

PBMC3K = "sctypegsea_10x_pbmc3k_raw_2700.h5ad"
# Geneformer gf-6L-30M (small) and V2-104M (base): layers, hidden, heads, ffn, positions
SHAPES = {"small": (6, 256, 4, 512, 2048), "base": (12, 768, 12, 3072, 4096)}


def peer_checkpoint(vocab: GeneVocab, medians: np.ndarray, shape: str, directory: Path) -> None:
    """A random transformers BertForMaskedLM of Geneformer's shape, saved with its dicts."""
    from transformers import BertConfig, BertForMaskedLM

    n_layers, d, heads, ff, max_pos = SHAPES[shape]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=d, num_hidden_layers=n_layers,
                     num_attention_heads=heads, intermediate_size=ff, hidden_act="relu",
                     max_position_embeddings=max_pos, layer_norm_eps=1e-12, pad_token_id=0)
    BertForMaskedLM(cfg).save_pretrained(directory)
    with (directory / "token_dictionary.pkl").open("wb") as fh:
        pickle.dump({t: i for i, t in enumerate(vocab.tokens)}, fh)
    with (directory / "gene_median_dictionary.pkl").open("wb") as fh:
        pickle.dump(dict(zip(vocab.genes, medians.tolist(), strict=True)), fh)


@torch.inference_mode()
def peer_embed(bert, batch, *, batch_size: int, n_special: int, device) -> np.ndarray:
    """Mean of the last hidden states over gene tokens, on padded batches (as users do)."""
    out = []
    for i in range(0, batch.n_cells, batch_size):
        ids, _, mask = batch[i:i + batch_size].to_padded(pad_id=0)
        ids = torch.from_numpy(ids).long().to(device)
        mask_t = torch.from_numpy(mask).to(device)
        h = bert(input_ids=ids, attention_mask=mask_t.long()).last_hidden_state
        w = (mask_t & (ids >= n_special)).to(h.dtype)[..., None]
        out.append(((h * w).sum(1) / w.sum(1)).float().cpu())
    return torch.cat(out).numpy()


def timed(fn, device) -> tuple[float, np.ndarray]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def run(shape: str, n_cells: int, data, *, batch_size: int, device, dtype, rng) -> None:
    vocab, medians, adata, report = data
    from transformers import BertForMaskedLM

    with tempfile.TemporaryDirectory() as tmp:
        peer_checkpoint(vocab, medians, shape, Path(tmp))
        model = import_geneformer(tmp)
        bert = BertForMaskedLM.from_pretrained(tmp, attn_implementation="sdpa").bert
    tok = GeneformerTokenizer(vocab, medians, max_len=SHAPES[shape][4])
    cells = np.sort(rng.choice(adata.n_obs, n_cells, replace=False))
    batch = tok.tokenize(adata[cells], report=report)
    model.eval().to(device, dtype)
    bert.eval().to(device, dtype)
    n_special = len(vocab.special_tokens)

    def ours(b):
        return model.embed(b, batch_size=batch_size)

    def peer(b):
        return peer_embed(bert, b, batch_size=batch_size, n_special=n_special, device=device)

    ours(batch[:2]), peer(batch[:2])  # warm-up
    # The same batches of cells in the dataset's order for both, timed batch by batch in
    # turns so that a background load hits both alike; the length-sorted peer gets the
    # batches of the cells sorted by length (its best case).
    by_len = batch[np.argsort(-batch.lengths, kind="stable")]
    t = {"ours": 0.0, "peer": 0.0, "sorted": 0.0}
    e_ours, e_peer = [], []
    for i in range(0, batch.n_cells, batch_size):
        chunk, sorted_chunk = batch[i:i + batch_size], by_len[i:i + batch_size]
        dt, e = timed(lambda c=chunk: ours(c), device)
        t["ours"] += dt
        e_ours.append(e)
        dt, e = timed(lambda c=chunk: peer(c), device)
        t["peer"] += dt
        e_peer.append(e)
        t["sorted"] += timed(lambda c=sorted_chunk: peer(c), device)[0]
    diff = np.abs(np.concatenate(e_ours) - np.concatenate(e_peer)).max()

    n_tok, lens = batch.n_tokens, batch.lengths
    padded = sum(int(lens[i:i + batch_size].max()) * len(lens[i:i + batch_size])
                 for i in range(0, batch.n_cells, batch_size))
    backend = "flash-attn varlen" if device.type == "cuda" and flash_attn_varlen_func else \
        "sdpa, length buckets"
    cfg = model.config
    print(f"\n[{shape}] {cfg.n_layers} layers x {cfg.d_model} hidden, {cfg.n_heads} heads, "
          f"{model.get_num_params() / 1e6:.1f}M parameters | {device.type} "
          f"{str(dtype).removeprefix('torch.')}")
    print(f"  {batch.n_cells} cells, {n_tok} tokens (length {lens.min()}..{lens.max()}, mean "
          f"{lens.mean():.0f}); batches of {batch_size} cells; padding them gives {padded} "
          f"positions ({padded / n_tok:.2f}x the tokens)")
    print(f"  max |cell embedding difference| sclcm vs transformers: {diff:.2e}")
    rows = [(f"sclcm, packed ({backend})", t["ours"]),
            ("transformers BertModel, padded (sdpa)", t["peer"]),
            ("transformers, padded, cells sorted by length", t["sorted"])]
    for name, sec in rows:
        print(f"  {name:<46} {n_tok / sec:>9,.0f} tokens/s {batch.n_cells / sec:>7.2f} cells/s"
              f" {sec:>7.2f} s")
    print(f"  sclcm speed-up: {t['peer'] / t['ours']:.2f}x vs the padded peer, "
          f"{t['sorted'] / t['ours']:.2f}x vs the length-sorted peer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells-small", type=int, default=128)
    parser.add_argument("--cells-base", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shapes", nargs="+", default=["small", "base"], choices=list(SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sclcm.settings.verbosity = "warning"
    sclcm.settings.progress = False
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(os.environ.get("SCLCM_DATA", default)) / PBMC3K
    adata = ad.read_h5ad(path)
    report = resolve(adata, count_coverage=False)
    vocab = GeneVocab.from_report(report)
    medians = GeneformerTokenizer(vocab).fit(adata, report=report).medians
    print(f"pbmc3k: {adata.n_obs} cells from {path}; vocabulary of {vocab.n_genes} genes; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; load average "
          f"{os.getloadavg()[0]:.2f} (other processes slow both sides alike: batches are timed "
          "in turns)")
    data = (vocab, medians, adata, report)
    n = {"small": args.cells_small, "base": args.cells_base}
    for shape in args.shapes:
        run(shape, n[shape], data, batch_size=args.batch_size, device=torch.device("cpu"),
            dtype=torch.float32, rng=np.random.default_rng(args.seed))
    if torch.cuda.is_available():
        for shape in args.shapes:
            run(shape, 8 * n[shape], data, batch_size=4 * args.batch_size,
                device=torch.device("cuda"), dtype=torch.bfloat16,
                rng=np.random.default_rng(args.seed))
    else:
        print("\nno CUDA device: the bf16 / flash-attn comparison was not run")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
