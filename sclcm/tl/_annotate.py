"""``annotate(query, model)``: cell types from a fine-tuned classifier or by kNN label
transfer from a labelled reference, with "Unassigned" and majority voting."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import logging as logg
from .._checks import InputError
from ._cells import CellTokens, check_tool_input, output_object
from ._embed import BLOCK_CELLS, _model_id
from ._forward import Budget, autocast, plan_batches, precision_for
from ._transfer import DEFAULT_K, transfer_labels, typicality
from ._vote import majority_vote, over_cluster

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from ..models import CellModel

#: The label of cells whose confidence is below the threshold (CellTypist's word).
UNASSIGNED = "Unassigned"
METHODS = ("classifier", "knn")
#: Default threshold per method on score = (top probability or vote share) x typicality,
#: chosen by holding one type out of the reference (docs/annotation.md,
#: benchmarks/annotation.py). kNN: on Kang 2018 ctrl (each of 4 types held out of 4
#: donors, the fifth annotated; 20 splits) 0.02 rejected 81-99% of the held-out type's
#: cells (20% for CD4 T cells, half the query) and 0.8% of the known types' (at most
#: 2.6%); under IFN-beta stimulation and from human to mouse pancreas, 0.6% and 0% of the
#: known types' cells. Classifier (shipped model, 30 steps, NK cells held out, donor 1015
#: annotated): 0.05 rejected 75% of the NK cells and 1.3% of the others (0.02: 44%, 0%;
#: its calibrated probability alone rejected none of the NK cells at 0.5).
THRESHOLDS = {"classifier": 0.05, "knn": 0.02}
#: The default for a classifier without training-cell embeddings (CellTypist's).
PROBABILITY_THRESHOLD = 0.5


def annotate(query: AnnData, model: str | Path | CellModel | None = None, *,
             method: str = "classifier", reference: AnnData | None = None,
             label_key: str | None = None, reference_layer: str | None = None,
             k: int = DEFAULT_K, threshold: float | None = None, majority_voting: bool = False,
             over_clustering: str | None = None, key_added: str = "sclcm_label",
             layer: str | None = None, batch_size: int | None = None,
             device: str | torch.device | None = None, precision: str | None = None,
             seed: int = 0, copy: bool = False) -> AnnData | None:
    """Label every cell of ``query`` with a fine-tuned classifier or from a reference.

    Parameters
    ----------
    query
        Cells x genes (counts, as the model's family reads them), in memory or
        ``backed="r"``; human or mouse genes (mapped through orthologs onto the model's).
    model
        ``method="classifier"``: a fine-tuned model directory (``finetune(...,
        out_dir=...)``) or the :class:`~sclcm.models.CellModel` that
        :func:`~sclcm.train.finetune` returned (it carries ``labels``).
        ``method="knn"``: any model :func:`sclcm.tl.embed` takes (``None``: the default).
    method
        ``"classifier"``: the softmax of the fine-tuned head. ``"knn"``: no training; the
        reference and the query are embedded with ``model`` and each query cell takes
        the distance-weighted vote of its ``k`` nearest reference cells
        (``sclcm.tl._transfer.transfer_labels``).
    reference, label_key, reference_layer
        ``method="knn"``: the labelled reference, its ``obs`` column of labels (NaN
        labels are left out, with a warning that counts them) and the layer it is read
        from (default ``X``).
    k
        ``method="knn"``: reference neighbours per query cell.
    threshold
        Cells whose score is below it are ``"Unassigned"``; 0 assigns every cell.
        ``None``: 0.05 for the classifier, 0.02 for knn (``THRESHOLDS`` in the module),
        chosen by measuring how often cells of a type the reference lacks are rejected
        (docs/annotation.md); 0.5 for a classifier saved without training-cell embeddings
        (its score is the probability alone).
    majority_voting
        Also give every cell the most common label of its cluster in an over-clustering
        (CellTypist's majority voting), in ``obs[f"{key_added}_majority"]``.
    over_clustering
        An ``obs`` column of clusters to vote in; ``None`` clusters the query by Leiden
        on the model's embedding at a high resolution (more cells, more clusters;
        written to ``obs[f"{key_added}_cluster"]``).
    key_added
        Prefix of every key written (see Returns).
    layer
        Read ``query.layers[layer]`` instead of ``X``.
    batch_size, device, precision
        As in :func:`sclcm.tl.embed`.
    seed
        Seeds the Leiden over-clustering.
    copy
        Return a new AnnData instead of writing into ``query``.

    Returns
    -------
    ``None``, or the new AnnData when ``copy=True``. Sets:

    ``obs[key_added]``
        Categorical: the most probable class, or ``"Unassigned"`` where the score is
        below ``threshold`` or the cell has no count on the model's genes.
    ``obs[f"{key_added}_score"]``
        float32 confidence (NaN for cells without a gene token): the highest class
        probability (classifier) or the winning share of the neighbours' vote (knn),
        times the cell's typicality (see Notes).
    ``obsm[f"{key_added}_probabilities"]``
        float32, ``n_obs x n_classes`` (columns in ``uns[key_added]["classes"]`` order):
        the head's softmax, or the neighbours' weighted vote.
    ``obs[f"{key_added}_typicality"]``
        The cell's typicality against the reference (knn) or the classifier's training
        cells (saved by :func:`~sclcm.train.finetune`).
    ``obs[f"{key_added}_uncertainty"]``
        ``method="knn"``: ``1 -`` the winning vote share.
    ``obs[f"{key_added}_majority"]``, ``obs[f"{key_added}_cluster"]``
        With ``majority_voting``: the cluster's majority label, and the clusters when
        computed here.
    ``uns[key_added]``
        ``classes``, ``method``, ``model``, ``n_unassigned``, ``gene_coverage``,
        ``count_coverage``, ``species`` (query's, and the reference's for knn),
        ``distance_shift`` (knn: the query's shift, see
        ``sclcm.tl._transfer.transfer_labels``), ``params`` (every argument that
        changes the result).

    Raises
    ------
    sclcm.InputError
        A classifier model without a trained head or class names; ``method="knn"``
        without a reference or ``label_key``, a ``label_key`` missing from the reference,
        all labels NaN; a threshold outside [0, 1]; an ``over_clustering`` column that is
        missing; and the input errors of :func:`sclcm.tl.embed` (no gene of the
        vocabulary, values the model cannot read).

    Notes
    -----
    **Score.** A probability or a vote share says whether the head or the neighbours
    agree, not whether the cell looks like anything in the reference: a cell of a type
    the reference lacks often sits, far from everything, next to one reference type,
    which then wins unanimously (a softmax head is as sure of it). The typicality (the
    share of reference cells at least as far from their own ``k`` nearest reference
    cells as this cell is from its ``k`` nearest, in the model's embedding, after the
    query's overall shift is divided out) is near 0 for such a cell, so the score, their
    product, leaves it ``"Unassigned"``. A classifier measures it against up to 2,000 of
    its training cells' embeddings, saved beside its weights.

    Nothing is written to ``query`` (or ``reference``) until every cell is scored.
    """
    _check_args(query, method, reference, label_key, 0.5 if threshold is None else threshold,
                key_added, layer, reference_layer, over_clustering, copy=copy)
    if method == "knn":
        ref_labels = _reference_labels(reference, label_key)
        net = _get_model(model, device)
    else:
        net, classes = _classifier(model, device)
    # a classifier without training-cell embeddings (saved before they were) has no
    # typicality: its score is the probability alone, thresholded as CellTypist does
    ref_emb = getattr(net, "reference_embedding", None) if method == "classifier" else None
    typical_score = method == "knn" or ref_emb is not None
    if threshold is None:
        threshold = THRESHOLDS[method] if typical_score else PROBABILITY_THRESHOLD
    dev = next(net.parameters()).device
    precision = precision_for(precision, dev)
    cells = CellTokens.prepare(query, net.tokenizer, layer=layer)
    species = {"query": cells.report.species}
    want_embedding = typical_score or (majority_voting and over_clustering is None)
    if method == "knn":
        ref_cells = CellTokens.prepare(reference, net.tokenizer, layer=reference_layer)
        species["reference"] = ref_cells.report.species
        if species["reference"] != species["query"]:
            logg.info(f"the query is {species['query']} and the reference "
                      f"{species['reference']}: both are mapped through orthologs onto the "
                      f"model's {net.vocab.species or ''} genes, so only the genes with an "
                      "ortholog are compared")
    start = logg.info(f"annotating {query.n_obs} cells ({method})")
    forward = dict(batch_size=batch_size, device=dev, precision=precision)
    extra: dict[str, np.ndarray] = {}
    if method == "knn":
        ref_emb, _ = _forward(net, ref_cells, logits=False, desc="embedding reference",
                              **forward)
        ref_cells.warn_low_coverage()
        usable = ~np.isnan(ref_emb).any(axis=1) & ~ref_labels.isna().to_numpy()
        emb, _ = _forward(net, cells, logits=False, desc="embedding query", **forward)
        result = transfer_labels(ref_emb[usable], emb, ref_labels.to_numpy()[usable], k=k)
        classes, probs = result.classes, result.probabilities
        score = result.vote * result.typicality
        extra = {"uncertainty": result.uncertainty, "typicality": result.typicality}
    else:
        emb, probs = _forward(net, cells, logits=True, embedding=want_embedding,
                              desc="annotating", **forward)
        score = np.full(query.n_obs, np.nan, dtype=np.float32)
        known = ~np.isnan(probs).any(axis=1)
        score[known] = probs[known].max(axis=1)
        if ref_emb is not None:  # far from every training cell: a type the head never saw
            typical, shift = typicality(ref_emb, emb, k=min(k, len(ref_emb) - 1))
            score = score * typical
            extra = {"typicality": typical}
    cells.warn_low_coverage()
    known = ~np.isnan(score)
    best = np.where(known, np.nan_to_num(probs, nan=-1).argmax(axis=1), -1)
    assigned = known & (score >= threshold)
    names = np.array([*classes, UNASSIGNED], dtype=object)
    labels = names[np.where(assigned, best, len(classes))]
    n_unassigned = int((~assigned).sum())

    clusters = majority = None
    if majority_voting:
        clusters = (query.obs[over_clustering].astype(str).to_numpy() if over_clustering
                    else over_cluster(emb, seed=seed))
        majority = majority_vote(labels, clusters)
    params = {"method": method, "threshold": float(threshold), "key_added": key_added,
              "layer": layer, "batch_size": batch_size, "majority_voting": majority_voting,
              "over_clustering": over_clustering, "seed": seed}
    if method == "knn":
        params.update(k=k, label_key=label_key, reference_layer=reference_layer,
                      n_reference=int(usable.sum()))
    record = {"classes": list(classes), "method": method, "model": _model_id(model),
              "n_unassigned": n_unassigned, "gene_coverage": cells.gene_coverage,
              "count_coverage": cells.count_coverage, "species": species,
              # None is left out: older anndata cannot write it to h5ad
              "params": {k_: v for k_, v in params.items() if v is not None}}
    if typical_score:  # how much farther the query sits from the reference than it does
        record["distance_shift"] = result.shift if method == "knn" else shift
    out = output_object(query, copy=copy)  # everything is computed: only now touch it
    _write(out, key_added=key_added, labels=labels, classes=classes, score=score,
           probs=probs, extra=extra, clusters=clusters, majority=majority,
           computed_clusters=over_clustering is None, record=record)
    logg.info(f"    finished: {n_unassigned} of {query.n_obs} cells Unassigned", time=start)
    logg.hint(f"added obs[{key_added!r}] and obs['{key_added}_*'], "
              f"obsm['{key_added}_probabilities'], uns[{key_added!r}]")
    return out if copy else None


def _write(out: AnnData, *, key_added: str, labels: np.ndarray, classes: list[str],
           score: np.ndarray, probs: np.ndarray, extra: dict[str, np.ndarray],
           clusters: np.ndarray | None, majority: np.ndarray | None,
           computed_clusters: bool, record: dict[str, Any]) -> None:
    import pandas as pd

    categories = list(classes) + ([UNASSIGNED] if UNASSIGNED not in classes else [])
    out.obs[key_added] = pd.Categorical(labels, categories=categories)
    out.obs[f"{key_added}_score"] = score
    for name, values in extra.items():
        out.obs[f"{key_added}_{name}"] = values
    out.obsm[f"{key_added}_probabilities"] = probs
    if majority is not None:
        out.obs[f"{key_added}_majority"] = pd.Categorical(majority, categories=categories)
        if computed_clusters:
            out.obs[f"{key_added}_cluster"] = pd.Categorical(clusters)
    out.uns[key_added] = record


def _check_args(query: AnnData, method: str, reference: AnnData | None,
                label_key: str | None, threshold: float, key_added: str, layer: str | None,
                reference_layer: str | None, over_clustering: str | None, *,
                copy: bool) -> None:
    """Every check that needs no model, before any work."""
    if not isinstance(key_added, str) or not key_added:
        msg = f"key_added must be a non-empty string, not {key_added!r}."
        raise ValueError(msg)
    if method not in METHODS:
        msg = f"method must be one of {METHODS}, not {method!r}."
        raise InputError(msg)
    if not 0 <= threshold <= 1:
        msg = f"threshold must be in [0, 1], not {threshold!r}."
        raise InputError(msg)
    check_tool_input(query, layer, copy=copy)
    if over_clustering is not None and over_clustering not in query.obs:
        msg = (f"over_clustering {over_clustering!r} is not a column of query.obs; pass an "
               "obs column of clusters, or None to over-cluster the query here.")
        raise InputError(msg)
    if method == "knn":
        if reference is None or label_key is None:
            msg = ("method='knn' transfers labels from a labelled reference: pass "
                   "reference=<AnnData with labels in obs> and label_key=<that obs "
                   "column>, e.g. annotate(query, method='knn', reference=ref, "
                   "label_key='cell_type').")
            raise InputError(msg)
        check_tool_input(reference, reference_layer)
        if label_key not in reference.obs:
            msg = (f"label_key {label_key!r} is not a column of reference.obs; its columns "
                   f"are {list(reference.obs.columns)}.")
            raise InputError(msg)
    elif reference is not None:
        msg = ("reference= is read by method='knn' only; a classifier carries its classes. "
               "Pass method='knn', or leave reference out.")
        raise InputError(msg)


def _reference_labels(reference: AnnData, label_key: str):
    """The reference's labels as strings (NaN kept as NaN), with the NaN checks."""
    from ..train._finetune_labels import missing_labels

    labels = reference.obs[label_key]
    missing = missing_labels(reference, label_key, name="reference", cells="reference cells",
                             use="the vote")
    return labels.astype(object).where(~missing).map(
        lambda x: x if x is None or x != x else str(x))


def _get_model(model: Any, device: Any) -> CellModel:
    from ._model_ref import get_model

    return get_model(model, device=device)


def _classifier(model: Any, device: Any) -> tuple[CellModel, list[str]]:
    """The model and its class names, from a directory or a fine-tuned ``CellModel``."""
    from ..models import CellModel
    from ._model_ref import get_model

    if isinstance(model, CellModel):
        net, labels = get_model(model, device=device), getattr(model, "labels", None)
    elif isinstance(model, str | Path) and Path(model).expanduser().is_dir():
        from ..train._finetune import load_classifier

        net = get_model(load_classifier(Path(model).expanduser()), device=device)
        labels = net.labels
    else:
        msg = (f"model must be a fine-tuned model directory or the CellModel "
               f"sclcm.train.finetune returned, not {model!r}. Fine-tune one first: "
               "model = sclcm.train.finetune(reference, label_key).")
        raise InputError(msg)
    if net.classifier is None or labels is None or len(labels) != net.config.n_classes:
        msg = ("This model has no trained classification head with class names: fine-tune "
               "it first, model = sclcm.train.finetune(reference, label_key), or load a "
               "fine-tuned directory with sclcm.train.load_classifier(path).")
        raise InputError(msg)
    return net, list(labels)


def _forward(model: CellModel, cells: CellTokens, *, logits: bool, embedding: bool = True,
             desc: str, batch_size: int | None, device: torch.device, precision: str
             ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Cell embeddings and/or class probabilities per cell, in one pass over the cells
    (NaN rows for cells without a gene token)."""
    import torch

    from ..train._finetune import class_logits
    from ._embed import _run

    if not logits:
        return _run(model, cells, batch_size=batch_size, gene_embeddings=False,
                    device=device, precision=precision).cells, None
    n = cells.adata.n_obs
    temperature = float(getattr(model, "temperature", 1.0))  # finetune(calibrate=True)
    probs = np.full((n, model.config.n_classes), np.nan, dtype=np.float32)
    emb = np.full((n, model.config.d_model), np.nan, dtype=np.float32) if embedding else None
    budget = Budget.for_device(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, precision):
            for first, batch, empty in cells.batches(block_size=BLOCK_CELLS, desc=desc):
                keep = np.flatnonzero(~empty)
                for part in plan_batches(batch.lengths[keep], n_heads=model.config.n_heads,
                                         batch_size=batch_size, budget=budget):
                    rows = keep[part]
                    inputs = model.inputs(batch.select(rows), device=device)
                    if embedding:  # the embedding and the head from one forward pass
                        res = model(**inputs, heads=model.config.normalize_embedding)
                        emb[first + rows] = res["cell_embedding"].float().cpu().numpy()
                        out = (res["class_logits"] if model.config.normalize_embedding
                               else model.classifier(res["cell_embedding"]))
                    else:
                        out = class_logits(model, inputs)
                    probs[first + rows] = torch.softmax(out.float() / temperature,
                                                        -1).cpu().numpy()
    finally:
        model.train(was_training)
    return emb, probs
