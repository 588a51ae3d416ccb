"""Cell-embedding throughput: sclcm (packed cells) vs transformers' BertModel (padded, SDPA).

Both run the same Geneformer-shaped weights (a random ``BertForMaskedLM`` saved by
transformers and read with :func:`sclcm.models.import_geneformer`) on the same pbmc3k cells,
tokenized with sclcm's Geneformer tokenizer, in batches of the same cells in the same order.
Prints tokens/s and cells/s of each and their ratio, for the ``small`` and ``base`` shapes;
on CPU in float32 and, where CUDA is available, in bf16 (sclcm with flash-attn when
installed). Reads pbmc3k from ``$SCLCM_DATA`` (default ``../shared/data``).

``--shapes scgpt`` adds scGPT whole-human's shape (12 x 512, 8 heads, d_hid 512, cells of
up to 1,200 tokens): random weights in scGPT's key layout read with
:func:`sclcm.models.import_scgpt`, against torch's own ``nn.TransformerEncoder`` (the layers
scGPT is built of) on the same cells padded per batch.

    python benchmarks/model_forward.py [--cells-small 128] [--cells-base 16]
                                       [--shapes small base scgpt] [--cells-scgpt 32]
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
import torch.nn.functional as F

import sclcm
from sclcm.genes import GeneVocab, resolve
from sclcm.models import import_geneformer
from sclcm.models._attention import flash_attn_varlen_func
from sclcm.tokenizers import GeneformerTokenizer

PBMC3K = "sctypegsea_10x_pbmc3k_raw_2700.h5ad"
# Geneformer gf-6L-30M (small) and V2-104M (base): layers, hidden, heads, ffn, positions
SHAPES = {"small": (6, 256, 4, 512, 2048), "base": (12, 768, 12, 3072, 4096)}
# scGPT whole-human: layers, embsize, heads, d_hid, max_seq_len
SCGPT = (12, 512, 8, 512, 1200)


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


class ScGPTPeer(torch.nn.Module):
    """scGPT's encoder from torch's layers: gene embedding + layer norm, value MLP, torch's
    post-norm ``nn.TransformerEncoder`` on cells padded per batch; the ``<cls>`` state."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        super().__init__()
        n_layers, d, heads, ff, _ = SCGPT
        layer = torch.nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        prefix = "transformer_encoder."
        self.encoder.load_state_dict({k.removeprefix(prefix): v for k, v in sd.items()
                                      if k.startswith(prefix)})
        self.sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}

    def forward(self, ids: torch.Tensor, values: torch.Tensor, pad: torch.Tensor):
        w, d = self.sd, SCGPT[1]
        x = F.layer_norm(F.embedding(ids, w["encoder.embedding.weight"]), (d,),
                         w["encoder.enc_norm.weight"], w["encoder.enc_norm.bias"])
        v = F.relu(F.linear(values.clamp(max=512)[..., None], w["value_encoder.linear1.weight"],
                            w["value_encoder.linear1.bias"]))
        v = F.layer_norm(F.linear(v, w["value_encoder.linear2.weight"],
                                  w["value_encoder.linear2.bias"]), (d,),
                         w["value_encoder.norm.weight"], w["value_encoder.norm.bias"])
        return self.encoder(x + v, src_key_padding_mask=pad)[:, 0]

    def to(self, *args, **kwargs):  # the functional weights move too
        self.sd = {k: v.to(*args, **kwargs) for k, v in self.sd.items()}
        return super().to(*args, **kwargs)


def run_scgpt(n_cells: int, adata, *, batch_size: int, device, dtype, rng) -> None:
    from sclcm.models import import_scgpt, write_scgpt_checkpoint

    symbols = list(dict.fromkeys(adata.var_names))
    n_layers, d, heads, ff, _ = SCGPT
    with tempfile.TemporaryDirectory() as tmp:
        sd = write_scgpt_checkpoint(tmp, symbols, n_layers=n_layers, d_model=d, n_heads=heads,
                                    d_ff=ff)
        model = import_scgpt(tmp, normalize=False)
    peer = ScGPTPeer(sd).eval().to(device, dtype)
    model.eval().to(device, dtype)
    cells = np.sort(rng.choice(adata.n_obs, n_cells, replace=False))
    batch = model.tokenizer.tokenize(adata[cells])
    # scGPT's id of each sclcm token: special tokens, then the genes in scGPT's order
    tokens = {t: i for i, t in enumerate([*symbols, "<pad>", "<cls>", "<eoc>"])}
    table = np.array([tokens.get(t, 0) for t in model.vocab.special_tokens]
                     + list(range(len(symbols))))
    pad_id = tokens["<pad>"]

    @torch.inference_mode()
    def peer_embed(b):
        ids, values, mask = b.to_padded(pad_id=0, pad_value=-2)
        ids = ids.copy()
        ids[mask] = table[b.gene_ids]
        ids[~mask] = pad_id
        out = peer(torch.from_numpy(ids).long().to(device),
                   torch.from_numpy(values).to(device, dtype), torch.from_numpy(~mask).to(device))
        return out.float().cpu().numpy()

    def ours(b):
        return model.embed(b, batch_size=batch_size)

    ours(batch[:2]), peer_embed(batch[:2])  # warm-up
    t = {"ours": 0.0, "peer": 0.0}
    e_ours, e_peer = [], []
    for i in range(0, batch.n_cells, batch_size):
        chunk = batch[i:i + batch_size]
        dt, e = timed(lambda c=chunk: ours(c), device)
        t["ours"] += dt
        e_ours.append(e)
        dt, e = timed(lambda c=chunk: peer_embed(c), device)
        t["peer"] += dt
        e_peer.append(e)
    diff = np.abs(np.concatenate(e_ours) - np.concatenate(e_peer)).max()
    n_tok, lens = batch.n_tokens, batch.lengths
    cfg = model.config
    print(f"\n[scgpt] {cfg.n_layers} layers x {cfg.d_model} hidden, {cfg.n_heads} heads, "
          f"{model.get_num_params() / 1e6:.1f}M parameters | {device.type} "
          f"{str(dtype).removeprefix('torch.')}")
    print(f"  {batch.n_cells} cells, {n_tok} tokens (length {lens.min()}..{lens.max()}, mean "
          f"{lens.mean():.0f}); batches of {batch_size} cells")
    print(f"  max |<cls> embedding difference| sclcm vs torch TransformerEncoder: {diff:.2e}")
    for name, sec in ((f"sclcm, packed ({cfg.attn_implementation})", t["ours"]),
                      ("torch nn.TransformerEncoder, padded per batch", t["peer"])):
        print(f"  {name:<46} {n_tok / sec:>9,.0f} tokens/s {batch.n_cells / sec:>7.2f} cells/s"
              f" {sec:>7.2f} s")
    print(f"  sclcm speed-up: {t['peer'] / t['ours']:.2f}x vs the padded torch encoder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells-small", type=int, default=128)
    parser.add_argument("--cells-base", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cells-scgpt", type=int, default=32)
    parser.add_argument("--shapes", nargs="+", default=["small", "base"],
                        choices=[*SHAPES, "scgpt"])
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
    n = {"small": args.cells_small, "base": args.cells_base, "scgpt": args.cells_scgpt}

    def one(shape: str, n_cells: int, batch_size: int, device, dtype) -> None:
        rng = np.random.default_rng(args.seed)
        if shape == "scgpt":
            run_scgpt(n_cells, adata, batch_size=batch_size, device=device, dtype=dtype, rng=rng)
        else:
            run(shape, n_cells, data, batch_size=batch_size, device=device, dtype=dtype,
                rng=rng)

    for shape in args.shapes:
        one(shape, n[shape], args.batch_size, torch.device("cpu"), torch.float32)
    if torch.cuda.is_available():
        for shape in args.shapes:
            one(shape, 8 * n[shape], 4 * args.batch_size, torch.device("cuda"), torch.bfloat16)
    else:
        print("\nno CUDA device: the bf16 / flash-attn comparison was not run")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
