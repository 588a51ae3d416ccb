"""tiledbsoma-ml's ExperimentDataset, allowed to send CSR blocks from DataLoader workers.

Imported only when a Census stream is read (tiledbsoma-ml loads numba and TileDB).
"""

from __future__ import annotations

from tiledbsoma_ml import ExperimentDataset


class SparseExperimentDataset(ExperimentDataset):
    """``ExperimentDataset`` whose CSR blocks may come from DataLoader workers.

    tiledbsoma-ml 0.1.0 refuses ``return_sparse_X=True`` in a worker
    (``_multiproc_check``) because torch's default collation cannot send torch sparse
    tensors between processes; its blocks are scipy CSR matrices, which pickle as any
    object does. The rest of its checks (a seed when shuffling) are kept.
    """

    def _multiproc_check(self) -> None:
        if self.shuffle and self.seed is None:
            msg = "A shuffled ExperimentDataset needs an explicit seed."
            raise ValueError(msg)
