"""``annotate(query, model)``: cell types from a fine-tuned classifier, with "Unassigned"."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import logging as logg
from .._checks import InputError
from ._cells import CellTokens, check_tool_input, output_object
from ._embed import BLOCK_CELLS, _model_id
from ._forward import Budget, autocast, plan_batches, precision_for

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from ..models import CellModel

#: The label of cells whose confidence is below the threshold (CellTypist's word).
UNASSIGNED = "Unassigned"


def annotate(query: AnnData, model: str | Path | CellModel, *, threshold: float = 0.5,
             key_added: str = "sclcm_label", layer: str | None = None,
             batch_size: int | None = None, device: str | torch.device | None = None,
             precision: str | None = None, copy: bool = False) -> AnnData | None:
    """Label every cell of ``query`` with a classifier from :func:`sclcm.train.finetune`.

    Parameters
    ----------
    query
        Cells x genes (counts, as the model's family reads them), in memory or
        ``backed="r"``.
    model
        A fine-tuned model directory (``finetune(..., out_dir=...)``) or the
        :class:`~sclcm.models.CellModel` that :func:`~sclcm.train.finetune` returned
        (it carries ``labels``).
    threshold
        Cells whose highest class probability is below it are ``"Unassigned"``; 0 assigns
        every cell.
    key_added
        ``obs[key_added]`` the label, ``obs[f"{key_added}_score"]`` the confidence,
        ``obsm[f"{key_added}_probabilities"]`` the class probabilities, ``uns[key_added]``
        the class names and parameters.
    layer
        Read ``query.layers[layer]`` instead of ``X``.
    batch_size, device, precision
        As in :func:`sclcm.tl.embed`.
    copy
        Return a new AnnData instead of writing into ``query``.

    Returns
    -------
    ``None``, or the new AnnData when ``copy=True``. Sets:

    ``obs[key_added]``
        Categorical: the most probable class, or ``"Unassigned"`` where its probability
        is below ``threshold`` or the cell has no count on the model's genes.
    ``obs[f"{key_added}_score"]``
        float32, the highest class probability (NaN for cells without a gene token).
    ``obsm[f"{key_added}_probabilities"]``
        float32, ``n_obs x n_classes``, softmax of the head (columns in
        ``uns[key_added]["classes"]`` order).
    ``uns[key_added]``
        ``classes``, ``model``, ``n_unassigned``, ``gene_coverage``, ``count_coverage``,
        ``params`` (``threshold``, ``layer``, ``key_added``, ``batch_size``).

    Raises
    ------
    sclcm.InputError
        A model without a trained head or class names, a threshold outside [0, 1], and
        the input errors of :func:`sclcm.tl.embed`.
    """
    import pandas as pd

    if not isinstance(key_added, str) or not key_added:
        msg = f"key_added must be a non-empty string, not {key_added!r}."
        raise ValueError(msg)
    if not 0 <= threshold <= 1:
        msg = f"threshold must be a probability in [0, 1], not {threshold!r}."
        raise InputError(msg)
    check_tool_input(query, layer, copy=copy)
    net, classes = _classifier(model, device)
    dev = next(net.parameters()).device
    precision = precision_for(precision, dev)
    cells = CellTokens.prepare(query, net.tokenizer, layer=layer)
    start = logg.info(f"annotating {query.n_obs} cells into {len(classes)} classes")
    probs = _probabilities(net, cells, batch_size=batch_size, device=dev, precision=precision)
    cells.warn_low_coverage()
    known = ~np.isnan(probs).any(axis=1)
    score = np.full(query.n_obs, np.nan, dtype=np.float32)
    score[known] = probs[known].max(axis=1)
    best = np.where(known, np.nan_to_num(probs, nan=-1).argmax(axis=1), -1)
    assigned = known & (score >= threshold)
    names = np.array([*classes, UNASSIGNED], dtype=object)
    labels = names[np.where(assigned, best, len(classes))]
    categories = list(classes) + ([UNASSIGNED] if UNASSIGNED not in classes else [])
    n_unassigned = int((~assigned).sum())
    params = {"threshold": float(threshold), "key_added": key_added, "layer": layer,
              "batch_size": batch_size}
    record = {"classes": list(classes), "model": _model_id(model),
              "n_unassigned": n_unassigned, "gene_coverage": cells.gene_coverage,
              "count_coverage": cells.count_coverage,
              # None is left out: older anndata cannot write it to h5ad
              "params": {k: v for k, v in params.items() if v is not None}}

    out = output_object(query, copy=copy)  # everything is computed: only now touch it
    out.obs[key_added] = pd.Categorical(labels, categories=categories)
    out.obs[f"{key_added}_score"] = score
    out.obsm[f"{key_added}_probabilities"] = probs
    out.uns[key_added] = record
    logg.info(f"    finished: {n_unassigned} of {query.n_obs} cells Unassigned", time=start)
    logg.hint(f"added obs[{key_added!r}], obs['{key_added}_score'], "
              f"obsm['{key_added}_probabilities'], uns[{key_added!r}]")
    return out if copy else None


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


def _probabilities(model: CellModel, cells: CellTokens, *, batch_size: int | None,
                   device: torch.device, precision: str) -> np.ndarray:
    """Class probabilities per cell (NaN rows for cells without a gene token)."""
    import torch

    from ..train._finetune import class_logits

    out = np.full((cells.adata.n_obs, model.config.n_classes), np.nan, dtype=np.float32)
    budget = Budget.for_device(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, precision):
            for first, batch, empty in cells.batches(block_size=BLOCK_CELLS,
                                                     desc="annotating"):
                keep = np.flatnonzero(~empty)
                for part in plan_batches(batch.lengths[keep], n_heads=model.config.n_heads,
                                         batch_size=batch_size, budget=budget):
                    rows = keep[part]
                    logits = class_logits(model, model.inputs(batch.select(rows),
                                                              device=device))
                    out[first + rows] = torch.softmax(logits.float(), -1).cpu().numpy()
    finally:
        model.train(was_training)
    return out
