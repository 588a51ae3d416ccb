"""Shared by the embedding benchmarks: where the data is, and a random model of a preset.

A random-init model has the shape, tokenizer and cost of a trained one, so it measures
speed and memory (not quality) while no trained model is shipped. Its vocabulary is
pbmc3k's genes; Geneformer's medians are fitted on pbmc3k.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np

DATA = Path(os.environ.get("SCLCM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PBMC3K = "sctypegsea_10x_pbmc3k_raw_2700.h5ad"
PRESETS = ("geneformer", "scgpt", "scbert", "scfoundation")


def random_model(preset: str, size: str, *, max_len: int | None = None, data: Path = DATA,
                 seed: int = 0):
    """A random :class:`~sclcm.models.CellModel` of ``preset`` at ``size``, tokenizer attached.

    ``max_len`` caps the tokens per cell (Geneformer and scFoundation keep the top genes,
    scGPT a random subset; scBERT's panel is the ``max_len`` genes with most counts,
    default 2,000).
    """
    import torch

    from sclcm.genes import GeneVocab, resolve
    from sclcm.models import CellModel, ModelConfig
    from sclcm.tokenizers import (
        GeneformerTokenizer,
        ScBERTTokenizer,
        ScFoundationTokenizer,
        ScGPTTokenizer,
    )

    pbmc = ad.read_h5ad(data / PBMC3K)
    report = resolve(pbmc, count_coverage=False)
    vocab = GeneVocab.from_report(report)
    if preset == "geneformer":
        positions = ModelConfig.preset(preset, size, vocab=vocab).max_position
        tok = GeneformerTokenizer(vocab, max_len=min(max_len or positions, positions))
        tok.fit(pbmc, report=report)
    elif preset == "scgpt":
        tok = ScGPTTokenizer(vocab, **({"max_len": max_len} if max_len else {}))
    elif preset == "scfoundation":
        tok = ScFoundationTokenizer(vocab, max_len=max_len)
    elif preset == "scbert":
        ids = vocab.lookup(pbmc, report=report)
        counts = np.bincount(ids[ids >= 0], minlength=len(vocab),
                             weights=np.asarray(pbmc.X.sum(0)).ravel()[ids >= 0])
        top = np.sort(np.argsort(-counts)[:max_len or 2000])
        tok = ScBERTTokenizer(GeneVocab(vocab.decode(top), species=vocab.species))
    else:
        msg = f"preset must be one of {PRESETS}, not {preset!r}."
        raise ValueError(msg)
    torch.manual_seed(seed)
    return CellModel(ModelConfig.preset(preset, size, vocab=tok.vocab), tokenizer=tok).eval()


def load_model_arg(args) -> str | None:
    """The ``model`` argument of ``sclcm.tl.embed`` from ``--model`` / ``--preset``: a
    directory (a random model is saved to ``args.workdir``), or ``None`` for the default."""
    if args.model is not None:
        return str(args.model)
    if args.preset is not None:
        path = Path(args.workdir) / f"random-{args.preset}-{args.size}"
        random_model(args.preset, args.size, max_len=args.max_len,
                     data=args.data).save_pretrained(path)
        return str(path)
    import sclcm

    if not sclcm.tl.shipped_models():
        return None
    return sclcm.tl.DEFAULT_MODEL


def add_model_args(parser) -> None:
    parser.add_argument("--model", type=Path, help="a model directory (default: the shipped "
                        "default model)")
    parser.add_argument("--preset", choices=PRESETS, help="build a random-init model of this "
                        "family instead (speed and memory only)")
    parser.add_argument("--size", default="tiny", choices=("tiny", "small", "base"),
                        help="shape of the --preset model")
    parser.add_argument("--max-len", type=int, help="tokens per cell of the --preset model")
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the shared .h5ad")
