"""Pretraining losses per objective, the frequency baseline, and held-out evaluation.

- ``mlm`` (geneformer): cross-entropy over the vocabulary; baseline: the cross-entropy of
  the training cells' gene-token frequencies.
- ``bin`` (scbert): cross-entropy over the bins; baseline: the training bins' frequencies.
- ``value`` (scgpt): squared error of the value (plus, with MVC, that of the value
  predicted from the cell embedding); baseline: the training mean value.
- ``depth_value`` (scfoundation): squared error of the value, through the decoder with
  the read-depth tokens; baseline: the training mean value.

The baseline is what a model knowing nothing but the training set's marginal distribution
scores: a pretrained model must beat it. The cell-level objectives (reconstruction,
contrastive) are in :mod:`sclcm.train._cell_objectives`; :func:`batch_terms` computes every
objective of a batch in one forward pass and :func:`total_loss` weighs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ._cell_objectives import gene_subset_views, info_nce, reconstruction_loss
from ._config import ObjectivesConfig

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..data import MaskingCollator
    from ..models import CellModel, ModelConfig
    from ..tokenizers import TokenBatch
    from ._batching import MicroBatch

#: The terms :func:`batch_terms` can return, each as (summed loss, count).
TERMS = ("objective", "mvc", "reconstruction", "contrastive")

CLASSIFICATION = ("mlm", "bin")
REGRESSION = ("value", "depth_value")


def check_objective(config: ModelConfig) -> None:
    """Raise ``ValueError`` unless the model has a pretraining objective."""
    if config.objective not in CLASSIFICATION + REGRESSION:
        msg = (f"The model has objective {config.objective!r}: pretraining needs one of "
               f"{list(CLASSIFICATION + REGRESSION)} (the presets have one).")
        raise ValueError(msg)


def to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of ``inputs`` on ``device`` (other entries as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}


def masked_losses(model: CellModel, inputs: dict[str, Any], *, return_outputs: bool = False
                  ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict]:
    """Summed losses over the masked tokens of one collated batch.

    Parameters
    ----------
    model
        The model; runs in whatever mode (train / eval) it is in.
    inputs
        The output of :class:`~sclcm.data.MaskingCollator` on the model's device.

    Returns
    -------
    dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict]
        ``objective`` (the summed cross-entropy or squared error of the objective), ``mvc``
        (scGPT's MVC squared error, when the model has it) and ``n`` (masked tokens); and the
        model's outputs when ``return_outputs``.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    out = model(**inputs)
    objective = model.config.objective
    if objective in CLASSIFICATION:  # float32 logits: bf16 cross-entropy loses digits
        loss = F.cross_entropy(out["logits"].float(), labels, reduction="sum")
    else:
        loss = F.mse_loss(out["pred"].float(), labels.float(), reduction="sum")
    result = {"objective": loss, "n": torch.tensor(labels.numel(), device=labels.device)}
    if "mvc_pred" in out:
        result["mvc"] = F.mse_loss(out["mvc_pred"].float(), labels.float(), reduction="sum")
    return (result, out) if return_outputs else result


def batch_terms(model: CellModel, tokens: TokenBatch, *, step: int, collator: MaskingCollator,
                objectives: ObjectivesConfig | None = None,
                device: torch.device | None = None) -> dict[str, tuple[torch.Tensor, float]]:
    """Every objective's summed loss on one batch, and what it is summed over.

    One forward pass: with a token objective the cells go in masked (``collator`` with
    ``step``), else as they are; with the contrastive objective as two gene-subset views
    each (drawn from the collator's seed and ``step``).

    Returns
    -------
    dict[str, tuple[torch.Tensor, float]]
        ``{term: (sum, count)}`` for ``objective`` and ``mvc`` (over masked tokens),
        ``reconstruction`` (over measured panel genes of the cells) and ``contrastive`` (over
        views); only the terms with a weight.
    """
    obj = objectives or ObjectivesConfig()
    cfg = model.config
    device = next(model.parameters()).device if device is None else device
    if obj.contrastive > 0:
        rng = np.random.default_rng([collator.seed, step, 2])
        tokens = gene_subset_views(tokens, obj.view_keep, rng, n_special=cfg.n_special_tokens)
    terms: dict[str, tuple[torch.Tensor, float]] = {}
    if obj.token > 0:
        inputs = to_device(collator(tokens, step=step), device)
        parts, out = masked_losses(model, inputs, return_outputs=True)
        n = float(parts["n"])
        terms["objective"] = (parts["objective"], n)
        if "mvc" in parts:
            terms["mvc"] = (parts["mvc"], n)
    else:
        out = model(**model.inputs(tokens, device=device), heads=False)
    cell = out["cell_embedding"]
    if obj.reconstruction > 0:
        if model.recon_head is None or "panel" not in tokens.extras:
            msg = ("The reconstruction objective needs a model with a recon_panel and batches "
                   "with their panel targets (sclcm.train.PanelTargets).")
            raise ValueError(msg)
        target = torch.from_numpy(tokens.extras["panel"]).to(device)
        total, count = reconstruction_loss(model.recon_head(cell), target)
        terms["reconstruction"] = (total, float(count))
    if obj.contrastive > 0:
        terms["contrastive"] = (info_nce(cell, obj.temperature) * len(cell), float(len(cell)))
    return terms


def total_loss(terms: dict[str, tuple[torch.Tensor, float]], objectives: ObjectivesConfig,
               mvc_weight: float = 1.0) -> torch.Tensor:
    """The training loss: each term's mean, weighted."""
    weights = {"objective": objectives.token, "mvc": objectives.token and mvc_weight,
               "reconstruction": objectives.reconstruction,
               "contrastive": objectives.contrastive}
    return sum(weights[k] * total / max(count, 1.0) for k, (total, count) in terms.items())


@dataclass
class FrequencyBaseline:
    """Predict every masked token from the training set's marginal distribution.

    Attributes
    ----------
    objective
        The model's objective.
    probs
        ``mlm``: frequency of each token id among the training cells' gene tokens;
        ``bin``: frequency of each bin (add-one smoothed: no label has probability 0).
    mean
        ``value``, ``depth_value``: mean value of the gene tokens.
    panel_mean
        Reconstruction: each panel gene's mean target over the training cells (the
        prediction of a model that knows no cell apart).
    """

    objective: str
    probs: np.ndarray | None = None
    mean: float | None = None
    panel_mean: np.ndarray | None = None

    @classmethod
    def fit(cls, batches: Iterable[TokenBatch], config: ModelConfig) -> FrequencyBaseline:
        """From training cells: the distribution of the tokens masking can choose (genes,
        never special tokens), and the mean panel target when the batches carry one."""
        check_objective(config)
        size = config.vocab_size if config.objective == "mlm" else max(config.n_bins, 1)
        counts, total, n = np.zeros(size), 0.0, 0
        panel_sum = panel_n = None
        for batch in batches:
            genes = batch.gene_ids >= config.n_special_tokens
            if config.objective == "mlm":
                counts += np.bincount(batch.gene_ids[genes], minlength=size)
            elif config.objective == "bin":
                counts += np.bincount(batch.values[genes].astype(np.int64), minlength=size)
            else:
                total += float(batch.values[genes].astype(np.float64).sum())
                n += int(genes.sum())
            if "panel" in batch.extras:
                target = batch.extras["panel"].astype(np.float64)
                finite = np.isfinite(target)
                panel_sum = np.where(finite, target, 0).sum(0) + (
                    0 if panel_sum is None else panel_sum)
                panel_n = finite.sum(0) + (0 if panel_n is None else panel_n)
        panel_mean = None if panel_sum is None else panel_sum / np.maximum(panel_n, 1)
        if config.objective in CLASSIFICATION:
            counts = counts + 1
            if config.objective == "mlm":  # only genes can be masked labels
                counts[:config.n_special_tokens] = 0
            return cls(config.objective, probs=counts / counts.sum(), panel_mean=panel_mean)
        return cls(config.objective, mean=total / max(n, 1), panel_mean=panel_mean)

    def loss_sum(self, labels: torch.Tensor) -> float:
        """Summed cross-entropy (or squared error) of the baseline on these labels."""
        y = labels.detach().cpu().numpy()
        if self.probs is not None:
            return float(-np.log(self.probs[y.astype(np.int64)]).sum())
        return float(((y.astype(np.float64) - self.mean) ** 2).sum())

    def panel_loss_sum(self, target: np.ndarray) -> float:
        """Summed squared error of the mean panel on these (finite) targets."""
        err = (target.astype(np.float64) - self.panel_mean) ** 2
        return float(np.where(np.isfinite(err), err, 0).sum())

    @property
    def kind(self) -> str:
        return {"mlm": "cross-entropy of the training gene-token frequencies",
                "bin": "cross-entropy of the training bin frequencies"}.get(
            self.objective, "squared error of the training mean value")


@torch.no_grad()
def evaluate(model: CellModel, batches: Iterable[TokenBatch | MicroBatch],
             collator: MaskingCollator, *,
             baseline: FrequencyBaseline | None = None,
             objectives: ObjectivesConfig | None = None,
             device: str | torch.device | None = None) -> dict[str, float]:
    """Mean held-out loss of each objective of ``model`` on ``batches`` (and of the
    baseline on the same tokens).

    Masks (and contrastive views) are drawn by ``collator`` with ``step`` = the batch's
    index, so the same batches are masked alike at every evaluation.

    Returns
    -------
    dict[str, float]
        ``loss`` (the token objective: mean over masked tokens of the cross-entropy or squared
        error), ``mvc`` (scGPT), ``baseline``, ``n_tokens`` (masked tokens), ``n_cells``; with
        the cell objectives ``reconstruction`` (mean squared error per panel gene and cell),
        ``reconstruction_baseline`` and ``contrastive`` (InfoNCE per view).
    """
    obj = objectives or ObjectivesConfig()
    device = next(model.parameters()).device if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    sums = {k: [0.0, 0.0] for k in TERMS}
    base = {"objective": 0.0, "reconstruction": 0.0}
    n_cells = 0
    try:
        for i, batch in enumerate(batches):
            batch = getattr(batch, "tokens", batch)  # a MicroBatch or a TokenBatch
            terms = batch_terms(model, batch, step=i, collator=collator, objectives=obj,
                                device=device)
            for k, (total, count) in terms.items():
                sums[k][0] += float(total)
                sums[k][1] += count
            if baseline is not None and obj.token > 0:
                labels = collator(batch, step=i)["labels"]
                base["objective"] += baseline.loss_sum(labels)
            if baseline is not None and baseline.panel_mean is not None and \
                    obj.reconstruction > 0:  # once per view, as the model's term
                views = 2 if obj.contrastive > 0 else 1
                base["reconstruction"] += views * baseline.panel_loss_sum(batch.extras["panel"])
            n_cells += batch.n_cells
    finally:
        model.train(was_training)

    def mean(k: str, total: float | None = None) -> float:
        return (sums[k][0] if total is None else total) / max(sums[k][1], 1.0)

    result: dict[str, float] = {"n_cells": n_cells}
    if obj.token > 0:
        result.update(loss=mean("objective"), n_tokens=int(sums["objective"][1]))
        if model.mvc is not None:
            result["mvc"] = mean("mvc")
        if baseline is not None:
            result["baseline"] = mean("objective", base["objective"])
    if obj.reconstruction > 0:
        result["reconstruction"] = mean("reconstruction")
        if baseline is not None and baseline.panel_mean is not None:
            result["reconstruction_baseline"] = mean("reconstruction", base["reconstruction"])
    if obj.contrastive > 0:
        result["contrastive"] = mean("contrastive")
    return result
