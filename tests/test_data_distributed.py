"""Two CPU ranks (Lightning DDP over gloo) read the local Census and a backed .h5ad.

The streams are made in the test process, before Lightning starts the ranks, as a user's
script makes them; CellDataModule.setup tells each stream its rank. Each rank reads through
one DataLoader worker: a spawned one for the Census (tiledbsoma-ml 0.1.0 refuses CSR
blocks in workers; the stream lifts that), a forked one for the .h5ad.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from conftest import KANG_IFNB, data_path
from test_data_inputs import N_HUMAN, local_census

from sclcm.data import AnnDataStream, CellDataModule, CensusStream

EPOCHS = 2


class Recorder(L.LightningModule):
    """Records the cell ids each rank receives, per epoch, and writes them at the end."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.out = out
        self.seen: dict[str, list[np.ndarray]] = {}

    def _record(self, key: str, block) -> None:
        self.seen.setdefault(f"{key}{self.current_epoch}", []).append(block.cell_ids)

    def training_step(self, block, batch_idx):
        self._record("census", block)
        return (self.w * 0.0).sum()  # the gradient all-reduce still runs over gloo

    def validation_step(self, block, batch_idx) -> None:
        self._record("h5ad", block)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self) -> None:
        ids = {k: np.concatenate(v) for k, v in self.seen.items()}
        lengths = {f"len_{k}": len(v) for k, v in self.seen.items()}
        np.savez(f"{self.out}/rank{self.global_rank}.npz", **ids, **lengths)


@pytest.mark.slow
def test_two_ranks_read_disjoint_shares_that_change_by_epoch(tmp_path):
    census = CensusStream(uri=local_census(), organism="Homo sapiens", block_size=128,
                          chunk_size=32, seed=3)
    h5ad = AnnDataStream(data_path(KANG_IFNB), block_size=128, chunk_size=32,
                         buffer_size=512, seed=3)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=EPOCHS,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Recorder(str(tmp_path)), datamodule=CellDataModule(census, h5ad, num_workers=1))
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]

    expected = {"census": np.arange(N_HUMAN), "h5ad": np.arange(1556)}
    for key, everything in expected.items():
        orders = []
        for epoch in range(EPOCHS):
            a, b = (r[f"{key}{epoch}"] for r in ranks)
            assert len(a) == len(b) == len(everything) // 2
            assert not set(a) & set(b), f"{key} epoch {epoch}: ranks overlap"
            assert np.array_equal(np.sort(np.concatenate([a, b])), everything)
            assert ranks[0][f"len_{key}{epoch}"] == -(-len(a) // 128)  # blocks == len(stream)
            orders.append(np.concatenate([a, b]))
        assert not np.array_equal(orders[0], orders[1]), f"{key}: same order in both epochs"
