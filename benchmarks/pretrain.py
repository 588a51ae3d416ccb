"""Pretraining throughput, in cells/s: the data streams (and, to come, training).

    python benchmarks/pretrain.py [--data DIR] [--block-size 1024] [--workers 0]

Stream part: writes a local Census of every dataset in the shared data folder into a
temporary directory, and the same human cells (the Census's genes, Ensembl IDs) as one
.h5ad; then reads every human cell once per epoch, for two epochs, through

- ``CensusStream`` (tiledbsoma-ml over the local Census), and
- ``AnnDataStream`` over the .h5ad opened ``backed="r"``.

Both shuffle (chunks of 64 cells, then within a buffer) and yield CSR blocks with their
obs. Epoch 0 of the Census stream includes tiledbsoma-ml's numba compilation (several
seconds per process); epoch 1 is the steady state.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("SCLCM_DATA",
                                                                         DEFAULT_DATA)))
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    args = parser.parse_args()

    import cellxgene_census

    from sclcm.data import AnnDataStream, CensusStream, write_local_census

    files = sorted(args.data.glob("*.h5ad"))
    if not files:
        raise SystemExit(f"No .h5ad files in {args.data}; pass --data or set SCLCM_DATA.")
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
            source = Loader(stream, args.workers) if args.workers else stream
            for epoch, (n, rate) in enumerate(stream_rate(source)):
                print(f"{name:<45} {epoch:>5} {n:>8} {rate:>10,.0f}")
            del source  # stop its persistent workers before the next stream's start
            gc.collect()

        # ==========================================================================
        # TRAINING THROUGHPUT: to be added by the owners of sclcm.models / sclcm.train.
        # Feed `streams` (tokenized with `stream.tokenize(tokenizer)`) to the
        # pretraining LightningModule through sclcm.data.CellDataModule and print
        # cells/s and tokens/s of training steps next to the stream rates above.
        # ==========================================================================


if __name__ == "__main__":
    main()
