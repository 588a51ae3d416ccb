"""``map_species(query, reference)``: one model embeds both species; labels cross over."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import logging as logg
from .._checks import InputError
from ._annotate import UNASSIGNED, _check_args, _classifier, _forward, _reference_labels
from ._cells import CellTokens
from ._embed import _model_id
from ._forward import precision_for
from ._transfer import DEFAULT_K, transfer_labels

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from ..models import CellModel

METHODS = ("knn", "classifier")
#: Default score below which a query cell is "Unassigned". kNN: higher than
#: ``tl.annotate``'s 0.02, because a type the other species lacks sits nearer to some
#: reference type across species than within one; on Baron 2016 (``benchmarks/
#: cross_species.py``, shipped model) 0.1 left 2.4-2.8% of the shared types' cells and
#: 74-78% of the reference-lacking types' cells Unassigned (0.02: 0% and 4-39%).
THRESHOLDS = {"knn": 0.1, "classifier": 0.5}


def map_species(query: AnnData, reference: AnnData, *,
                model: str | Path | CellModel | None = None, label_key: str,
                method: str = "knn", orthologs: str = "one2one", k: int = DEFAULT_K,
                threshold: float | None = None, finetune: dict[str, Any] | None = None,
                layer: str | None = None, reference_layer: str | None = None,
                key_added: str = "sclcm", batch_size: int | None = None,
                device: str | torch.device | None = None, precision: str | None = None
                ) -> AnnData:
    """Map the cells of one species onto a labelled reference of another.

    One model embeds both (each species' genes reach the model's vocabulary through
    orthologs, under the rule ``orthologs``), and every query cell gets a reference label
    with a confidence, or ``"Unassigned"`` where the reference seems to lack its type.
    The result is one AnnData of both, reference cells first, with the joint embedding
    where ``sc.pp.neighbors(joint, use_rep=f"X_{key_added}")`` finds it.

    Parameters
    ----------
    query
        The cells to label (counts), e.g. mouse; in memory or ``backed="r"``. Not changed.
    reference
        The labelled cells (counts), e.g. human. Not changed.
    model
        ``method="knn"``: any model :func:`sclcm.tl.embed` takes (``None``: the default
        shipped one). ``method="classifier"``: a classifier fine-tuned on this reference
        (a ``finetune(..., out_dir=...)`` directory or the model it returned), or a model
        to fine-tune on ``reference`` here (``None``: the default).
    label_key
        The ``obs`` column of ``reference`` with its labels (NaN: left out).
    method
        ``"knn"``: each query cell takes the distance-weighted vote of its ``k`` nearest
        reference cells in the joint embedding (``sclcm.tl._transfer.transfer_labels``, as
        :func:`sclcm.tl.annotate` with ``method="knn"``);
        no training. ``"classifier"``: the head of a classifier fine-tuned on the reference
        (:func:`sclcm.train.finetune`, with ``finetune`` as its options; reference types
        with fewer than 5 cells are left out of it, with a warning).
    orthologs
        ``"one2one"`` or ``"all"`` (``sclcm.genes.ORTHOLOG_RULES``): which orthologs
        carry a species' genes onto the model's; see :func:`sclcm.tl.embed`. It applies
        to the embeddings, the query's labels and a classifier fine-tuned here.
    k
        ``method="knn"``: reference neighbours per query cell.
    threshold
        Query cells whose score is below it are ``"Unassigned"``; ``None``: the method's
        default (``sclcm.tl._map_species.THRESHOLDS``: kNN 0.1, classifier 0.5).
    finetune
        ``method="classifier"``: keyword arguments of :func:`sclcm.train.finetune` when the
        classifier is fine-tuned here (e.g. ``{"max_steps": 300}``).
    layer, reference_layer
        Where the counts of ``query`` and ``reference`` are (default ``X``).
    key_added
        Base of every key written (see Returns).
    batch_size, device, precision
        As in :func:`sclcm.tl.embed`.

    Returns
    -------
    A new AnnData of ``reference.n_obs + query.n_obs`` cells and no genes (its ``X`` is
    empty: the two species' genes differ; use :func:`sclcm.genes.to_species` for counts
    on shared genes). ``obs_names`` are the inputs' (``"-reference"`` and ``"-query"``
    appended to all when the two share a name). It holds:

    ``obs["dataset"]``
        ``"reference"`` or ``"query"``.
    ``obs["species"]``
        Each cell's species (``"homo_sapiens"``, ``"mus_musculus"``).
    ``obs[label_key]``
        The reference's labels, and the query's own where it has that column (NaN
        elsewhere), to compare with.
    ``obs[f"{key_added}_label"]``
        Categorical: the reference's label for reference cells, the transferred label
        (or ``"Unassigned"``) for query cells.
    ``obs[f"{key_added}_score"]``
        float32, the query cells' confidence (kNN: vote share x typicality, as
        :func:`sclcm.tl.annotate`; classifier: highest class probability); NaN for
        reference cells and for cells with no count on the model's genes. kNN also
        writes ``obs[f"{key_added}_typicality"]`` and ``obs[f"{key_added}_vote"]``.
    ``obsm[f"X_{key_added}"]``
        float32, the joint embedding (one model, both species).
    ``obsm[f"{key_added}_probabilities"]``
        float32 per class (``uns[key_added]["classes"]``); NaN for reference cells.
    ``uns[key_added]``
        ``method``, ``model``, ``classes``, ``species`` (per dataset), ``orthologs`` (per
        dataset where it was mapped: how many of its genes and counts reach the model's
        vocabulary; :meth:`sclcm.genes.SpeciesMap.coverage`), ``gene_coverage`` and
        ``count_coverage`` (per dataset), ``n_unassigned``, ``params``.

    Raises
    ------
    sclcm.InputError
        A missing ``label_key``, an unknown method or ortholog rule, a species the gene
        tables do not hold, no gene of the model's vocabulary, and the input errors of
        :func:`sclcm.tl.embed`. Nothing is changed on ``query`` or ``reference``.

    Examples
    --------
    >>> joint = sclcm.tl.map_species(mouse, human, label_key="cell_type")  # doctest: +SKIP
    >>> sc.pp.neighbors(joint, use_rep="X_sclcm"); sc.tl.umap(joint)        # doctest: +SKIP
    >>> sclcm.pl.map_species(joint, label_key="cell_type")                  # doctest: +SKIP
    """
    threshold = THRESHOLDS[method] if threshold is None and method in THRESHOLDS else \
        threshold
    _check(query, reference, label_key=label_key, method=method, threshold=threshold,
           orthologs=orthologs, key_added=key_added, layer=layer,
           reference_layer=reference_layer, k=k)
    ref_labels = _reference_labels(reference, label_key)
    net = _model(model, method, reference, label_key, reference_layer, finetune, device,
                 orthologs)
    dev = next(net.parameters()).device
    precision = precision_for(precision, dev)
    ref_cells = CellTokens.prepare(reference, net.tokenizer, layer=reference_layer,
                                   orthologs=orthologs)
    cells = CellTokens.prepare(query, net.tokenizer, layer=layer, orthologs=orthologs)
    species = {"reference": ref_cells.report.species, "query": cells.report.species}
    start = logg.info(f"mapping {query.n_obs} {species['query']} cells onto "
                      f"{reference.n_obs} {species['reference']} cells ({method}, "
                      f"orthologs={orthologs!r})")
    forward = dict(batch_size=batch_size, device=dev, precision=precision)
    logits = method == "classifier"
    ref_emb, _ = _forward(net, ref_cells, logits=logits, desc="embedding reference",
                          **forward)
    ref_cells.warn_low_coverage()
    emb, probs = _forward(net, cells, logits=logits, desc="embedding query", **forward)
    cells.warn_low_coverage()
    extra: dict[str, np.ndarray] = {}
    if method == "knn":
        usable = ~np.isnan(ref_emb).any(axis=1) & ~ref_labels.isna().to_numpy()
        result = transfer_labels(ref_emb[usable], emb, ref_labels.to_numpy()[usable], k=k)
        classes, probs = result.classes, result.probabilities
        score = result.vote * result.typicality
        extra = {"vote": result.vote, "typicality": result.typicality}
    else:
        classes = list(net.labels)
        score = np.full(query.n_obs, np.nan, dtype=np.float32)
        known = ~np.isnan(probs).any(axis=1)
        score[known] = probs[known].max(axis=1)
    known = ~np.isnan(score)
    assigned = known & (score >= threshold)
    best = np.nan_to_num(probs, nan=-1).argmax(axis=1)
    labels = np.array([*classes, UNASSIGNED], dtype=object)[
        np.where(assigned, best, len(classes))]

    params = {"method": method, "orthologs": orthologs, "label_key": label_key,
              "threshold": float(threshold), "key_added": key_added, "layer": layer,
              "reference_layer": reference_layer, "batch_size": batch_size}
    if method == "knn":
        params["k"] = k
    record = {"method": method, "model": _model_id(model), "classes": list(classes),
              "species": species,
              "gene_coverage": {"reference": ref_cells.gene_coverage,
                                "query": cells.gene_coverage},
              "count_coverage": {"reference": ref_cells.count_coverage,
                                 "query": cells.count_coverage},
              "n_unassigned": int((~assigned).sum()),
              "params": {k_: v for k_, v in params.items() if v is not None}}
    mapped = {name: c.species_record() for name, c in (("reference", ref_cells),
                                                         ("query", cells))}
    record["orthologs"] = {name: r for name, r in mapped.items() if r is not None}
    joint = _joint(query, reference, label_key=label_key, key_added=key_added,
                   species=species, ref_labels=ref_labels.to_numpy(), labels=labels,
                   classes=classes, score=score, extra=extra, emb=(ref_emb, emb),
                   probs=probs)
    joint.uns[key_added] = record
    logg.info(f"    finished: {record['n_unassigned']} of {query.n_obs} query cells "
              f"{UNASSIGNED}", time=start)
    logg.hint(f"returned a joint AnnData: obsm['X_{key_added}'], obs['{key_added}_label'], "
              f"obs['{key_added}_score'], uns[{key_added!r}]; next: "
              f"sc.pp.neighbors(joint, use_rep='X_{key_added}')")
    return joint


def _check(query: AnnData, reference: AnnData, *, label_key: str, method: str,
           threshold: float | None, orthologs: str, key_added: str, layer: str | None,
           reference_layer: str | None, k: int) -> None:
    """Every check that needs no model, before any work."""
    from ..genes._orthologs import check_rule

    check_rule(orthologs)
    if method not in METHODS:
        msg = f"method must be one of {METHODS}, not {method!r}."
        raise InputError(msg)
    if method == "knn" and (not isinstance(k, int) or k < 1):
        msg = f"k must be a positive number of neighbours, not {k!r}."
        raise InputError(msg)
    if threshold is None:
        msg = "threshold must be in [0, 1], not None."
        raise InputError(msg)
    # the checks of annotate(method="knn"): key, threshold, both AnnData, the label column
    _check_args(query, "knn", reference, label_key, threshold, key_added, layer,
                reference_layer, None, copy=False)


def _model(model: Any, method: str, reference: AnnData, label_key: str,
           reference_layer: str | None, finetune: dict[str, Any] | None,
           device: Any, orthologs: str) -> CellModel:
    """The model that embeds both: as given (kNN, or an already fine-tuned classifier), or
    fine-tuned on the reference here."""
    from ._model_ref import get_model

    if method == "knn":
        return get_model(model, device=device)
    fine_tuned = getattr(model, "labels", None) is not None or (
        isinstance(model, str | Path) and (Path(model).expanduser() / "labels.json").is_file())
    if fine_tuned:
        return _classifier(model, device)[0]
    from ..train import finetune as finetune_
    from ..train._finetune import MIN_CELLS_PER_CLASS

    counts = reference.obs[label_key].value_counts()
    rare = list(counts.index[(counts > 0) & (counts < MIN_CELLS_PER_CLASS)])
    if rare and not reference.isbacked:
        # a type too rare to train and validate on: the kNN method can still use it
        logg.warning(f"reference types with fewer than {MIN_CELLS_PER_CLASS} cells are left "
                     f"out of the classifier: {', '.join(map(str, rare))}")
        reference = reference[~reference.obs[label_key].isin(rare).to_numpy()]
    options = {"layer": reference_layer, "orthologs": orthologs, "progress_bar": False,
               **(finetune or {})}
    logg.info(f"fine-tuning a classifier on the {reference.n_obs} reference cells")
    return get_model(finetune_(reference, label_key, model, **options), device=device)


def _joint(query: AnnData, reference: AnnData, *, label_key: str, key_added: str,
           species: dict[str, str], ref_labels: np.ndarray, labels: np.ndarray,
           classes: list[str], score: np.ndarray, extra: dict[str, np.ndarray],
           emb: tuple[np.ndarray, np.ndarray], probs: np.ndarray) -> AnnData:
    """Reference then query cells: obs, the joint embedding, the query's results."""
    import anndata as ad
    import pandas as pd

    n_ref, n_q = reference.n_obs, query.n_obs
    names = [pd.Index(reference.obs_names), pd.Index(query.obs_names)]
    if names[0].intersection(names[1]).size:
        names = [names[0] + "-reference", names[1] + "-query"]
    obs = pd.DataFrame(index=names[0].append(names[1]).astype(str))
    obs["dataset"] = pd.Categorical(["reference"] * n_ref + ["query"] * n_q,
                                    categories=["reference", "query"])
    obs["species"] = pd.Categorical([species["reference"]] * n_ref + [species["query"]] * n_q)
    own = (query.obs[label_key].astype(object).to_numpy() if label_key in query.obs
           else np.full(n_q, np.nan, dtype=object))
    obs[label_key] = pd.Categorical(np.r_[ref_labels.astype(object), own])
    categories = list(classes) + ([UNASSIGNED] if UNASSIGNED not in classes else [])
    obs[f"{key_added}_label"] = pd.Categorical(
        np.r_[ref_labels.astype(object), labels], categories=categories)
    pad = np.full(n_ref, np.nan, dtype=np.float32)
    obs[f"{key_added}_score"] = np.r_[pad, score.astype(np.float32)]
    for name, values in extra.items():
        obs[f"{key_added}_{name}"] = np.r_[pad, np.asarray(values, dtype=np.float32)]
    joint = ad.AnnData(obs=obs)
    joint.obsm[f"X_{key_added}"] = np.vstack(emb).astype(np.float32)
    joint.obsm[f"{key_added}_probabilities"] = np.vstack(
        [np.full((n_ref, len(classes)), np.nan, np.float32), probs.astype(np.float32)])
    return joint
