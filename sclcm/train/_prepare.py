"""From a config to what training reads: streams, vocabulary, fitted tokenizer, baseline.

One pass over (up to ``data.stats_cells``) training cells counts in how many cells each
reference gene is detected, which restricts the vocabulary to the genes of the data
(small models stay small) and picks scBERT's panel; Geneformer's gene medians are fit in
the same pass. A second pass over the tokenized cells fits the frequency baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import logging as logg
from ..genes import GeneVocab
from ._cell_objectives import ExpressionMoments, PanelTargets, choose_panel
from ._config import ConfigError, data_paths, expand
from ._objectives import FrequencyBaseline

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..data import CellBlock, CellStream
    from ..models import CellModel, ModelConfig
    from ..tokenizers import Tokenizer
    from ._config import PretrainConfig

DEFAULT_HELD_OUT_FRACTION = 0.05


@dataclass
class Prepared:
    """What :func:`prepare` makes from a config."""

    train: CellStream
    held_out: CellStream | None
    vocab: GeneVocab
    tokenizer: Tokenizer
    summary: dict[str, Any]
    panel: np.ndarray | None = None  # token ids of the reconstruction panel
    panel_mean: np.ndarray | None = None  # their mean target over the training cells
    start: CellModel | None = None  # model.start: the model whose training continues

    def targets(self, stream: CellStream | None) -> PanelTargets | None:
        """What adds the reconstruction target to each tokenized block of ``stream`` (None
        without a reconstruction objective)."""
        return None if self.panel is None or stream is None else \
            PanelTargets(self.panel, self.tokenizer, stream)


# --- streams --------------------------------------------------------------------------
def build_streams(cfg: PretrainConfig, species: str | None = None
                  ) -> tuple[CellStream, CellStream | None]:
    """The training stream (shuffled by ``(trainer.seed, epoch)``) and the held-out one (in
    order), both of raw-count :class:`~sclcm.data.CellBlock` s, in ``species`` (default:
    the vocabulary's)."""
    d, seed = cfg.data, cfg.trainer.seed
    blocks = dict(block_size=d.block_size, chunk_size=d.chunk_size, seed=seed)
    if d.census is not None:
        return _census_streams(cfg, blocks)
    from ..data import AnnDataStream

    files = data_paths(cfg, d.h5ad, key="data.h5ad")
    # in the vocabulary's species, so that files of another reach it through orthologs
    if species is None:
        species = cfg.vocab.species if cfg.vocab.path is None else \
            reference_vocab(cfg).species
    opts = dict(layer=d.layer, species=species, orthologs=d.orthologs, **blocks)
    if d.held_out_files:
        held = data_paths(cfg, d.held_out_files, key="data.held_out_files")
        return (AnnDataStream(files, buffer_size=d.buffer_size, **opts),
                AnnDataStream(held, shuffle=False, **opts))
    fraction = DEFAULT_HELD_OUT_FRACTION if d.held_out_fraction is None else d.held_out_fraction
    if fraction == 0:
        return AnnDataStream(files, buffer_size=d.buffer_size, **opts), None
    whole = AnnDataStream(files, **opts)
    # a random fraction of each file's cells, at most held_out_max_cells in all
    rng = np.random.default_rng(seed)
    sizes = [src.n_obs for src in whole.sources]
    n_held = [round(fraction * n) for n in sizes]
    cap = d.held_out_max_cells / max(sum(n_held), 1)
    if cap < 1:
        n_held = [int(k * cap) for k in n_held]
    perms = [rng.permutation(n) for n in sizes]
    held_rows = [p[:k] for p, k in zip(perms, n_held, strict=True)]
    train_rows = [p[k:] for p, k in zip(perms, n_held, strict=True)]
    train = AnnDataStream(files, rows=train_rows, buffer_size=d.buffer_size, **opts)
    held = AnnDataStream(files, rows=held_rows, shuffle=False, **opts)
    return train, held


def _census_streams(cfg: PretrainConfig, blocks: dict) -> tuple[CellStream, CellStream | None]:
    from ..data import CensusStream

    c, d = cfg.data.census, cfg.data
    uri = expand(c.uri, key="data.census.uri") if c.uri is not None else None
    if uri is not None and "://" not in uri and cfg.source:
        from pathlib import Path

        path = Path(uri)
        uri = str(path if path.is_absolute() else Path(cfg.source).parent / path)

    def stream(value_filter: str | None, *, shuffle: bool) -> CensusStream:
        kw = {} if d.buffer_size is None else {"buffer_size": d.buffer_size}
        return CensusStream(uri=uri, census_version=c.census_version, organism=c.organism,
                            value_filter=value_filter, var_value_filter=c.var_value_filter,
                            shuffle=shuffle, **blocks, **kw)

    def both(*filters: str | None) -> str | None:
        return " and ".join(f"({f})" for f in filters if f) or None

    if d.held_out_filter is None:
        logg.warning("data.census has no held_out_filter: no held-out cells, so no held-out "
                     "loss or baseline in the metrics.")
        return stream(c.obs_value_filter, shuffle=True), None
    return (stream(both(c.obs_value_filter, f"not ({d.held_out_filter})"), shuffle=True),
            stream(both(c.obs_value_filter, d.held_out_filter), shuffle=False))


def first_blocks(stream: CellStream, n_cells: int) -> Iterator[CellBlock]:
    """Blocks of epoch 0 of ``stream`` until ``n_cells`` cells (a random sample of the
    cells when it shuffles)."""
    stream.set_epoch(0)
    seen = 0
    for block in stream:
        yield block
        seen += block.n_cells
        if seen >= n_cells:
            return


# --- vocabulary and tokenizer ---------------------------------------------------------
def reference_vocab(cfg: PretrainConfig) -> GeneVocab:
    v = cfg.vocab
    if v.path is not None:
        return GeneVocab.load(expand(v.path, key="vocab.path"))
    return GeneVocab.from_reference(v.species, biotypes=v.biotypes)


def gene_statistics(cfg: PretrainConfig, train: CellStream, reference: GeneVocab
                    ) -> tuple[np.ndarray, np.ndarray | None, int, ExpressionMoments | None]:
    """Per reference gene: cells it is detected in, and (Geneformer) its non-zero median
    of normalized expression; the number of cells read; and (for the reconstruction
    objective) the moments of counts per 10,000 that choose its panel."""
    from ..tokenizers import GeneformerTokenizer, ScFoundationTokenizer

    geneformer = cfg.family == "geneformer"
    # any family's column map will do for counting; Geneformer's is needed for medians
    mapper = GeneformerTokenizer(reference) if geneformer else ScFoundationTokenizer(reference)
    detected = np.zeros(len(reference), dtype=np.int64)
    moments = ExpressionMoments(len(reference)) if cfg.objectives.reconstruction else None
    n_cells = 0

    def blocks():  # counts detection on the way through the median fit
        nonlocal n_cells
        for block in first_blocks(train, cfg.data.stats_cells):
            cmap = block.column_map(mapper)
            X = block.X
            slots = cmap.slot[X.indices]
            hit = (slots >= 0) & (X.data != 0)
            detected[:] += np.bincount(cmap.token_ids[slots[hit]], minlength=len(reference))
            if moments is not None:
                moments.add(X, cmap.column_token_ids)
            n_cells += block.n_cells
            yield X, cmap

    if geneformer:
        mapper.fit_blocks(blocks(), method=cfg.tokenizer.medians)
        medians = mapper.medians
    else:
        for _ in blocks():
            pass
        medians = None
    return detected, medians, n_cells, moments


def build_vocab_and_tokenizer(cfg: PretrainConfig, train: CellStream
                              ) -> tuple[GeneVocab, Tokenizer, dict[str, Any],
                                         np.ndarray | None, np.ndarray | None]:
    """The vocabulary (restricted to the training genes, or scBERT's panel), the
    tokenizer of ``cfg.family`` over it, fitted on the training cells, the token ids of the
    reconstruction panel and their mean target (None without that objective)."""
    from ..tokenizers import (
        GeneformerTokenizer,
        ScBERTTokenizer,
        ScFoundationTokenizer,
        ScGPTTokenizer,
    )

    start = logg.info(f"reading up to {cfg.data.stats_cells:,} training cells for the "
                      "vocabulary and tokenizer")
    reference = reference_vocab(cfg)
    detected, medians, n_cells, moments = gene_statistics(cfg, train, reference)
    n_special = len(reference.special_tokens)
    genes = detected[n_special:]
    keep = genes >= cfg.vocab.min_cells if cfg.vocab.restrict_to_data else \
        np.ones(reference.n_genes, dtype=bool)
    if cfg.family == "scbert":  # the panel: most-detected genes, in vocabulary order
        score = np.where(keep, genes, 0)
        top = np.argsort(-score, kind="stable")[:cfg.tokenizer.panel_size]
        keep = np.zeros_like(keep)
        keep[top[score[top] > 0]] = True
    if not keep.any():
        msg = ("No gene of the vocabulary is detected in the training cells: check the data "
               f"holds raw counts of {reference.species} genes (vocab.species) and "
               "sclcm.genes.resolve(adata) finds them.")
        raise ConfigError(msg)
    vocab = GeneVocab(reference.genes[keep], species=reference.species,
                      special_tokens=reference.special_tokens)
    classes = {"geneformer": GeneformerTokenizer, "scgpt": ScGPTTokenizer,
               "scbert": ScBERTTokenizer, "scfoundation": ScFoundationTokenizer}
    options = dict(cfg.tokenizer.options)
    if cfg.family == "geneformer":
        options["medians"] = medians[keep]
    try:
        tokenizer = classes[cfg.family](vocab, **options)
    except TypeError as e:
        msg = f"tokenizer.options do not fit the {cfg.family} tokenizer: {e}"
        raise ConfigError(msg) from None
    logg.info(f"    {n_cells:,} cells: {vocab.n_genes:,} of {reference.n_genes:,} reference "
              f"genes in the vocabulary; {tokenizer!r}", time=start)
    summary = {"stats_cells": n_cells, "reference_genes": reference.n_genes,
               "vocab_genes": vocab.n_genes}
    panel = panel_mean = None
    if moments is not None:
        # reference token id -> vocabulary token id of the kept genes
        kept = n_special + np.flatnonzero(keep)
        chosen = choose_panel(moments, kept, cfg.objectives.panel_size)
        panel = (n_special + np.searchsorted(kept, chosen)).astype(np.int64)
        panel_mean = moments.log1p_mean(chosen)
        summary.update(panel_size=len(panel), panel_rule=(
            f"the {cfg.objectives.panel_size} most variable vocabulary genes of {n_cells:,} "
            "training cells (Seurat dispersion of counts per 10,000, 20 mean bins)"))
        logg.info(f"    reconstruction panel: {len(panel):,} highly variable genes")
    return vocab, tokenizer, summary, panel, panel_mean


def fit_baseline(cfg: PretrainConfig, train: CellStream, tokenizer: Tokenizer,
                 config: ModelConfig, targets: PanelTargets | None = None
                 ) -> FrequencyBaseline:
    """The frequency baseline from up to ``data.stats_cells`` tokenized training cells
    (and the mean panel, with ``targets``)."""
    blocks = first_blocks(train, cfg.data.stats_cells)
    batches = (b.tokenize(tokenizer) if targets is None else targets(b, b.tokenize(tokenizer))
               for b in blocks)
    return FrequencyBaseline.fit(batches, config)


def prepare(cfg: PretrainConfig) -> Prepared:
    """Streams, vocabulary, fitted tokenizer and reconstruction panel of a run."""
    if cfg.model.start is not None:
        return prepare_start(cfg)
    train, held = build_streams(cfg)
    vocab, tokenizer, summary, panel, panel_mean = build_vocab_and_tokenizer(cfg, train)
    return Prepared(train, held, vocab, tokenizer, summary, panel, panel_mean)


def prepare_start(cfg: PretrainConfig) -> Prepared:
    """A run that continues ``model.start``: its vocabulary, tokenizer (medians as fitted on
    its own corpus, so that its embeddings keep their meaning) and reconstruction panel."""
    from ..tl._model_ref import get_model

    base = get_model(cfg.model.start)
    if base.tokenizer is None:
        msg = (f"model.start {cfg.model.start!r} has no tokenizer: save it with "
               "save_pretrained(..., tokenizer=...) first.")
        raise ConfigError(msg)
    if base.config.tokenizer != cfg.model.preset:
        msg = (f"model.start {cfg.model.start!r} is a {base.config.tokenizer} model: set "
               f"model.preset: {base.config.tokenizer}.")
        raise ConfigError(msg)
    panel = None
    if cfg.objectives.reconstruction:
        if not base.config.recon_panel:
            msg = (f"model.start {cfg.model.start!r} has no reconstruction head: set "
                   "objectives.reconstruction: 0 to continue it.")
            raise ConfigError(msg)
        panel = np.asarray(base.config.recon_panel, dtype=np.int64)
    train, held = build_streams(cfg, species=base.vocab.species)
    start = base.__class__(base.config, vocab=base.vocab, tokenizer=base.tokenizer)
    start.load_state_dict(base.state_dict())  # a copy: the shipped model stays as it was
    logg.info(f"continuing {cfg.model.start!r}: {base.vocab.n_genes:,} genes, "
              f"{base.get_num_params():,} parameters; {base.tokenizer!r}")
    summary = {"start": str(cfg.model.start), "vocab_genes": base.vocab.n_genes}
    if panel is not None:
        summary["panel_size"] = len(panel)
    return Prepared(train, held, base.vocab, base.tokenizer, summary, panel, start=start)
