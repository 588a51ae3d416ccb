"""Majority voting over an over-clustering (CellTypist's refinement of per-cell labels).

A cell's label alone is noisy; a fine cluster of the query is a small group of cells of
one type, so each cluster takes the label most of its cells got.
"""

from __future__ import annotations

import numpy as np


def over_cluster_resolution(n_cells: int) -> float:
    """Leiden resolution for an over-clustering of ``n_cells`` (finer for more cells: the
    size steps CellTypist uses).

    >>> over_cluster_resolution(3000), over_cluster_resolution(50_000)
    (5.0, 20.0)
    """
    for limit, res in ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0),
                       (200_000, 25.0)):
        if n_cells < limit:
            return res
    return 30.0


def over_cluster(embedding: np.ndarray, *, seed: int = 0, n_neighbors: int = 15
                 ) -> np.ndarray:
    """Leiden clusters (as strings) of an embedding's kNN graph at
    :func:`over_cluster_resolution`; cells with a NaN embedding get cluster ``"none"``.

    Needs igraph (``pip install 'sclcm[bench]'`` or ``pip install igraph``).
    """
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    from ..metrics import _require_igraph

    _require_igraph()
    ok = ~np.isnan(embedding).any(axis=1)
    out = np.full(len(embedding), "none", dtype=object)
    if ok.sum() <= n_neighbors:  # too few cells for a graph: one cluster
        out[ok] = "0"
        return out
    tmp = ad.AnnData(obsm={"X": np.asarray(embedding[ok], dtype=np.float32)},
                     obs=pd.DataFrame(index=np.arange(int(ok.sum())).astype(str)))
    # exact kNN (scikit-learn), as sclcm.metrics: deterministic at any size
    sc.pp.neighbors(tmp, use_rep="X", n_neighbors=n_neighbors, transformer="sklearn",
                    random_state=seed)
    sc.tl.leiden(tmp, resolution=over_cluster_resolution(int(ok.sum())), flavor="igraph",
                 n_iterations=2, directed=False, random_state=seed)
    out[ok] = tmp.obs["leiden"].astype(str).to_numpy()
    return out


def majority_vote(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Each cell's cluster's most common label (ties: the first in sorted order).

    >>> majority_vote(np.array(["a", "b", "b", "c"]), np.array([0, 0, 0, 1])).tolist()
    ['b', 'b', 'b', 'c']
    """
    import pandas as pd

    table = pd.crosstab(np.asarray(clusters), np.asarray(labels, dtype=object))
    winner = table.idxmax(axis=1)  # columns are sorted: ties go to the first
    return winner.loc[np.asarray(clusters)].to_numpy(dtype=object)
