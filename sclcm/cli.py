"""The ``sclcm`` command line (also ``python -m sclcm``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _read(path: Path):
    import anndata as ad

    return ad.read_h5ad(path, backed="r")


def genes_command(paths: list[Path], species: str | None, to_species: str | None,
                  out: Path | None) -> pd.DataFrame:
    """Resolve each file's genes and print the coverage table."""
    from .genes import resolve

    rows = {}
    for path in paths:
        adata = _read(path)
        report = resolve(adata, species)
        if to_species is not None:
            report = report.to_species(to_species)
        rows[path.name] = report.summary()
        adata.file.close()
    table = pd.DataFrame(rows).T
    print(table.drop(columns="methods").to_string())
    if out is not None:
        out.write_text(json.dumps(rows, indent=1, default=float))
    return table


def demo(data: Path, out: Path, model: str | None = None) -> None:
    """Check counts, resolve genes, map mouse to human, tokenize with the four families,
    then embed Kang 2018 ctrl with ``model`` (default: the shipped one) and draw its UMAP."""
    from . import pl, pp
    from .genes import GeneVocab, resolve

    files = sorted(data.glob("*.h5ad"))
    if not files:
        msg = f"No .h5ad files in {data}; set SCLCM_DATA to the folder of the shared data."
        raise SystemExit(msg)
    out.mkdir(parents=True, exist_ok=True)
    vocab = GeneVocab.from_reference("human")
    print(f"sclcm demo: {len(files)} real datasets from {data}\n"
          f"vocabulary: {vocab.n_genes} human genes (protein coding + lncRNA) "
          f"+ {len(vocab.special_tokens)} special tokens\n")
    reports, rows, adatas = {}, [], {}
    for path in files:
        adata = _read(path)
        pp.check_counts(adata)  # raw counts, finite, no empty cells
        report = resolve(adata)
        human = report.to_species("human")
        ids = vocab.lookup(adata, report=report)
        in_vocab = ids >= 0
        counts = report.var_counts
        reports[path.stem.split("_")[0] + f" ({report.species.split('_')[0]})"] = report
        adatas[path.name] = (adata, report)
        rows.append({
            "dataset": path.name, "cells": adata.n_obs, "genes": adata.n_vars,
            "species": report.species, "gene_coverage": report.coverage,
            "count_coverage": report.count_coverage,
            "ortholog_coverage": human.ortholog_coverage,
            "duplicated_ids": len(report.duplicates), "ambiguous": len(report.ambiguous),
            "tokens_in_vocab": len(np.unique(ids[in_vocab])),
            "vocab_count_coverage": float(counts[in_vocab].sum() / counts.sum()),
        })
    table = pd.DataFrame(rows).set_index("dataset")
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 250):
        print(table.to_string())
    table.to_csv(out / "gene_coverage.csv")
    vocab.save(out / "vocab.json")
    pl.gene_coverage(reports, save=out / "gene_coverage.png", show=False)

    tok_table, geneformer = _demo_tokenize(adatas, vocab, out)
    with pd.option_context("display.float_format", "{:,.0f}".format, "display.width", 250):
        print("\n" + tok_table.to_string())
    tok_table.to_csv(out / "tokenization.csv")
    for adata, _ in adatas.values():
        adata.file.close()
    _demo_census(files, geneformer, out)
    print("\nWhat this did: checked each matrix holds raw counts; resolved every gene to an "
          "Ensembl ID (gene_/count_coverage); mapped mouse genes onto one-to-one human "
          "orthologs (ortholog_coverage); looked every dataset up in one human vocabulary "
          "(vocab_count_coverage: share of counts a model sees); fitted Geneformer's gene "
          "medians on all sets (mouse through orthologs) and tokenized every cell of every "
          f"set with the four families (table above; scBERT on the first {SCBERT_CELLS:,} "
          "cells of each set); wrote pbmc3k as a memory-mappable Geneformer corpus; wrote a "
          "Census-shaped SOMA store and streamed a tokenized epoch from it.\n"
          f"Outputs in {out}/: gene_coverage.csv/.png, vocab.json, tokenization.csv, "
          "pbmc3k_geneformer/ (corpus + tokenizer), census/ (local Census).")
    from ._demo_embed import demo_embed

    demo_embed(data, out, model)


SCBERT_CELLS = 1_000


def _demo_tokenize(adatas: dict, vocab, out: Path) -> pd.DataFrame:
    """Tokenize every dataset with the four families; returns a summary table."""
    import anndata as ad
    from scipy import sparse

    from . import pp
    from .genes import GeneVocab
    from .tokenizers import (
        GeneformerTokenizer,
        ScBERTTokenizer,
        ScFoundationTokenizer,
        ScGPTTokenizer,
    )

    # gene medians from all sets on human genes, pooled (each set contributes its genes)
    pooled = ad.concat([r.to_species("human").collapse(a) for a, r in adatas.values()],
                       join="outer", fill_value=0)
    pooled.X = sparse.csr_matrix(pooled.X)
    geneformer = GeneformerTokenizer(vocab).fit(pooled)
    panel = GeneVocab.from_reference("human", biotypes=["protein_coding"])
    families = [geneformer, ScGPTTokenizer(vocab), ScBERTTokenizer(panel),
                ScFoundationTokenizer(vocab)]
    rows = []
    for name, (adata, report) in adatas.items():
        for tok in families:
            # scBERT has every panel gene in every cell (20k tokens): 1,000 cells suffice
            part = adata[:SCBERT_CELLS].to_memory() if tok.name == "scbert" else adata
            start = time.perf_counter()
            batch = pp.tokenize(part, tok, report=report)
            rows.append({"dataset": name.split("_")[0], "family": tok.name,
                         "cells": batch.n_cells, "tokens": batch.n_tokens,
                         "mean_length": batch.lengths.mean(),
                         "cells_per_s": batch.n_cells / (time.perf_counter() - start)})
    pbmc = next((v for k, v in adatas.items() if "pbmc3k" in k), None)
    if pbmc is not None:
        corpus = pp.tokenize(pbmc[0], geneformer, report=pbmc[1],
                             out=out / "pbmc3k_geneformer", overwrite=True)
        first = corpus[0:1]
        genes = vocab.decode(first.gene_ids[1:11])
        symbols = [s or g for g, s in zip(genes, _symbols(genes), strict=True)]
        print(f"\npbmc3k cell {pbmc[0].obs_names[0]} as Geneformer reads it (top 10 of "
              f"{first.n_tokens - 2} genes): {' '.join(symbols)}")
    return pd.DataFrame(rows).set_index(["dataset", "family"]), geneformer


def _demo_census(files: list[Path], tokenizer, out: Path) -> None:
    """Write a Census-shaped SOMA store and stream one tokenized epoch from it."""
    import cellxgene_census

    from .data import CensusStream, write_local_census

    start = time.perf_counter()
    uri = write_local_census(files, out / "census", overwrite=True)
    with cellxgene_census.open_soma(uri=uri) as census:
        info = census["census_info"]["summary_cell_counts"].read().concat().to_pandas()
    counts = info.groupby("organism")["total_cell_count"].max().to_dict()
    print(f"\nlocal Census at {uri} ({time.perf_counter() - start:.1f} s): "
          + ", ".join(f"{k} {v:,} cells" for k, v in counts.items()))
    stream = CensusStream(uri=uri, organism="Homo sapiens", block_size=2048).tokenize(
        tokenizer)
    start = time.perf_counter()
    cells = tokens = 0
    for batch in stream:
        cells += batch.n_cells
        tokens += batch.n_tokens
    elapsed = time.perf_counter() - start
    print(f"one shuffled epoch of human cells streamed from it with tiledbsoma-ml and "
          f"tokenized: {cells:,} cells, {tokens:,} tokens in {elapsed:.1f} s "
          f"(includes tiledbsoma-ml's one-off compile)")


def _symbols(ids: list[str]) -> list[str | None]:
    from .genes import gene_table

    return gene_table("human").symbol.reindex(ids).tolist()


def pretrain_command(config: str, out: Path | None, resume: str | None,
                     sets: list[str]) -> dict:
    """Run ``sclcm.train.pretrain`` on a config file or shipped preset; print the metrics."""
    from .train import pretrain

    _, metrics = _run_config("pretrain", pretrain, config, out, resume, sets)
    if metrics:
        shown = {k: v for k, v in metrics.items() if k != "config"}
        print(json.dumps(shown, indent=1, default=str))
    return metrics


def finetune_command(config: str, out: Path | None, resume: str | None,
                     sets: list[str]) -> None:
    """Run ``sclcm.train.finetune`` on a YAML config; print the validation metrics."""
    from .train import run_finetune

    model = _run_config("finetune", run_finetune, config, out, resume, sets)
    m = getattr(model, "finetune_metrics", None)
    if m:  # rank 0 (the other DDP ranks return without metrics)
        shown = {k: v for k, v in m.items() if k != "val_history"}
        print(json.dumps({"labels": model.labels, **shown}, indent=1, default=str))


def _run_config(command: str, run, config: str, out: Path | None, resume: str | None,
                sets: list[str]):
    """``run(config, overrides=...)`` with ``--set``, ``--out`` and ``--resume`` applied; a
    config or data error exits with its message (the fix; a traceback is noise)."""
    from ._checks import InputError

    overrides = _overrides(sets)
    if out is not None:
        overrides["out_dir"] = str(out)
    if resume is not None:
        overrides["trainer.resume"] = resume
    try:
        return run(config, overrides=overrides)
    except InputError as e:  # ConfigError is one
        raise SystemExit(f"sclcm {command}: {e}") from None


def _overrides(sets: list[str]) -> dict:
    import yaml

    overrides = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            msg = f"--set takes KEY=VALUE (e.g. optim.max_steps=100), not {item!r}."
            raise SystemExit(msg)
        overrides[key.strip()] = yaml.safe_load(value)  # numbers, lists, null as in YAML
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sclcm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("genes", help="resolve the genes of .h5ad files and report coverage")
    g.add_argument("paths", nargs="+", type=Path)
    g.add_argument("--species", help="human or mouse (inferred when omitted)")
    g.add_argument("--to-species", help="map to one-to-one orthologs of this species")
    g.add_argument("--json", type=Path, help="write the reports' summaries here")
    d = sub.add_parser("demo", help="run the furthest real step on the shared datasets")
    d.add_argument("--data", type=Path, required=True, help="folder of .h5ad files")
    d.add_argument("--out", type=Path, default=Path("demo_output"))
    d.add_argument("--model", help="model directory or shipped name for the embedding step "
                   "(default: the shipped default model)")
    p = sub.add_parser("pretrain", help="pretrain a model from a YAML config (see "
                       "docs/pretraining.md)")
    p.add_argument("--config", required=True,
                   help="a YAML file, or a shipped preset: geneformer, scgpt, scbert, "
                   "scfoundation")
    p.add_argument("--out", type=Path, help="output folder (overrides out_dir)")
    p.add_argument("--resume", help="a checkpoint to resume from, or 'last'")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.max_steps=100 (repeatable)")
    f = sub.add_parser("finetune", help="fine-tune a cell-type classifier from a YAML "
                       "config (see docs/annotation.md)")
    f.add_argument("--config", required=True, help="a YAML file (data, model, optim, "
                   "trainer, out_dir)")
    f.add_argument("--out", type=Path, help="output folder (overrides out_dir)")
    f.add_argument("--resume", help="'last' or a checkpoint of a killed run to continue")
    f.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.max_steps=100 (repeatable)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    if args.command == "genes":
        genes_command(args.paths, args.species, args.to_species, args.json)
    elif args.command == "demo":
        demo(args.data, args.out, args.model)
    elif args.command == "pretrain":
        pretrain_command(args.config, args.out, args.resume, args.sets)
    elif args.command == "finetune":
        finetune_command(args.config, args.out, args.resume, args.sets)


if __name__ == "__main__":
    main(sys.argv[1:])
