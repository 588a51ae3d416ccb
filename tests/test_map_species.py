"""sclcm.tl.map_species on real Baron 2016 pancreas cells (human reference, mouse query)."""

from __future__ import annotations

from functools import cache

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from conftest import data_path

import sclcm
from sclcm import InputError

pytestmark = pytest.mark.slow  # each test maps a few hundred real cells with the shipped model

HUMAN = "came_baron2016_pancreas_human_2142"
MOUSE = "came_baron2016_pancreas_mouse_1886"
#: Types both species have in numbers (the rest are too rare for a small subset).
TYPES = ["alpha", "beta", "delta", "ductal", "endothelial", "quiescent_stellate"]


@cache
def _subset(name: str, per_type: int, seed: int) -> ad.AnnData:
    """Up to ``per_type`` cells of each of :data:`TYPES` (a fixed random draw)."""
    full = ad.read_h5ad(data_path(name))
    rng = np.random.default_rng(seed)
    rows = []
    for t in TYPES:
        idx = np.flatnonzero(full.obs["cell_type"].astype(str).to_numpy() == t)
        rows.append(rng.choice(idx, min(per_type, len(idx)), replace=False))
    out = full[np.sort(np.concatenate(rows))].copy()
    out.obs["cell_type"] = out.obs["cell_type"].astype(str)
    return out


@pytest.fixture(scope="module")
def data():
    return _subset(HUMAN, 40, 0), _subset(MOUSE, 25, 1)


@pytest.fixture(scope="module")
def joint(data):
    human, mouse = data[0].copy(), data[1].copy()
    return sclcm.tl.map_species(mouse, human, label_key="cell_type", orthologs="all")


def same(a: ad.AnnData, b: ad.AnnData) -> bool:
    return (a.var_names.equals(b.var_names) and a.obs.equals(b.obs)
            and (a.X != b.X).nnz == 0 and list(a.obsm) == list(b.obsm)
            and list(a.uns) == list(b.uns) and a.var.equals(b.var))


def test_joint_object_holds_both_and_scanpy_reads_it(data, joint, tmp_path):
    human, mouse = data
    assert joint.n_obs == human.n_obs + mouse.n_obs
    assert joint.obs["dataset"].tolist() == ["reference"] * human.n_obs + ["query"] * mouse.n_obs
    ref, query = joint[joint.obs["dataset"] == "reference"], joint[
        joint.obs["dataset"] == "query"]
    assert set(ref.obs["species"]) == {"homo_sapiens"}
    assert set(query.obs["species"]) == {"mus_musculus"}
    assert list(ref.obs_names) == list(human.obs_names)
    assert ref.obs["sclcm_label"].astype(str).tolist() == human.obs["cell_type"].tolist()
    assert ref.obs["sclcm_score"].isna().all()
    classes = joint.uns["sclcm"]["classes"]
    assert set(query.obs["sclcm_label"].astype(str)) <= {*classes, "Unassigned"}
    probs = query.obsm["sclcm_probabilities"]
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    assert joint.obsm["X_sclcm"].shape == (joint.n_obs, 128)
    # the record: the mouse side was mapped under "all"; the human side not at all
    rec = joint.uns["sclcm"]
    assert set(rec["orthologs"]) == {"query"}
    assert rec["orthologs"]["query"]["orthologs"] == "all"
    # most counts of both reach the model (measured 0.98 each with the shipped weights)
    assert 0.9 < rec["count_coverage"]["query"] <= 1
    assert 0.9 < rec["count_coverage"]["reference"] <= 1
    assert rec["n_unassigned"] == int((query.obs["sclcm_label"] == "Unassigned").sum())

    joint = joint.copy()  # the module's object stays without a UMAP for the figure test
    sc.pp.neighbors(joint, use_rep="X_sclcm", n_neighbors=10)
    sc.tl.umap(joint, random_state=0)
    path = tmp_path / "joint.h5ad"
    joint.write_h5ad(path)
    back = ad.read_h5ad(path)
    pd.testing.assert_frame_equal(back.obs, joint.obs)
    np.testing.assert_array_equal(back.obsm["X_sclcm"], joint.obsm["X_sclcm"])
    assert back.uns["sclcm"]["orthologs"]["query"]["n_genes_in_vocab"] == \
        rec["orthologs"]["query"]["n_genes_in_vocab"]


def test_mouse_cells_get_their_human_type(joint):
    query = joint[joint.obs["dataset"] == "query"].obs
    truth, label = query["cell_type"].astype(str), query["sclcm_label"].astype(str)
    assigned = label != "Unassigned"
    # six types at 1/6 each: chance is 0.17; the full sets give 0.93 (benchmarks/)
    assert (truth[assigned] == label[assigned]).mean() >= 0.85
    assert assigned.mean() >= 0.8


def test_a_type_the_reference_lacks_comes_out_unassigned(data):
    human, mouse = data
    no_ductal = human[human.obs["cell_type"] != "ductal"].copy()
    j = sclcm.tl.map_species(mouse, no_ductal, label_key="cell_type")
    query = j.obs[j.obs["dataset"] == "query"]
    ductal = (query["cell_type"] == "ductal").to_numpy()
    unassigned = (query["sclcm_label"] == "Unassigned").to_numpy()
    assert "ductal" not in j.uns["sclcm"]["classes"]
    assert unassigned[ductal].mean() >= 0.5
    assert unassigned[~ductal].mean() <= 0.2


def test_inputs_are_never_changed(data):
    human, mouse = data[0].copy(), data[1].copy()
    h0, m0 = human.copy(), mouse.copy()
    sclcm.tl.map_species(mouse, human, label_key="cell_type", k=5)
    assert same(human, h0)
    assert same(mouse, m0)
    for bad in (dict(label_key="nope"), dict(label_key="cell_type", method="svm"),
                dict(label_key="cell_type", orthologs="many"),
                dict(label_key="cell_type", threshold=2.0)):
        with pytest.raises(InputError):
            sclcm.tl.map_species(mouse, human, **bad)
        assert same(human, h0)
        assert same(mouse, m0)


def test_shared_cell_names_are_made_unique(data):
    human, mouse = data[0][:30].copy(), data[1][:20].copy()
    mouse.obs_names = human.obs_names[:20]
    j = sclcm.tl.map_species(mouse, human, label_key="cell_type", k=5)
    assert j.obs_names.is_unique
    assert j.obs_names[0].endswith("-reference")
    assert j.obs_names[-1].endswith("-query")


@pytest.mark.slow
def test_classifier_fine_tuned_on_the_reference(data):
    human, mouse = data
    full = ad.read_h5ad(data_path(HUMAN))
    epsilon = full[(full.obs["cell_type"] == "epsilon").to_numpy()]  # 3 cells: too few
    human = ad.concat([human, epsilon], merge="same")
    human.obs["cell_type"] = human.obs["cell_type"].astype(str)
    j = sclcm.tl.map_species(mouse, human, label_key="cell_type", method="classifier",
                             finetune={"max_steps": 4, "val_every": 2})
    query = j.obs[j.obs["dataset"] == "query"]
    assert j.uns["sclcm"]["method"] == "classifier"
    assert sorted(j.uns["sclcm"]["classes"]) == sorted(TYPES)  # epsilon left out of it
    assert (j.obs["cell_type"] == "epsilon").sum() == 3  # but its cells are in the joint
    probs = j.obsm["sclcm_probabilities"][(j.obs["dataset"] == "query").to_numpy()]
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    score = query["sclcm_score"].to_numpy()
    np.testing.assert_allclose(score, probs.max(axis=1), rtol=1e-6)
    assert ((query["sclcm_label"] == "Unassigned").to_numpy() == (score < 0.5)).all()


def test_figure_of_species_labels_and_shared_types(joint, tmp_path):
    j = joint.copy()
    with pytest.raises(KeyError, match=r"sc\.tl\.umap"):
        sclcm.pl.map_species(j, label_key="cell_type", save=str(tmp_path / "no.png"))
    sc.pp.neighbors(j, use_rep="X_sclcm", n_neighbors=10)
    sc.tl.umap(j, random_state=0)
    path = tmp_path / "map.png"
    fig = sclcm.pl.map_species(j, label_key="cell_type", save=str(path))
    assert path.stat().st_size > 10_000
    titles = [ax.get_title() for ax in fig.axes]
    assert "species" in titles
    query = j.obs[j.obs["dataset"] == "query"]
    acc = (query["sclcm_label"].astype(str) == query["cell_type"].astype(str)).mean()
    assert any(f"accuracy {acc:.3f}" in t for t in titles)
