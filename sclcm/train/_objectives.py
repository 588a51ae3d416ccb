"""Pretraining losses per objective, the frequency baseline, and held-out evaluation.

- ``mlm`` (geneformer): cross-entropy over the vocabulary; baseline: the cross-entropy of
  the training cells' gene-token frequencies.
- ``bin`` (scbert): cross-entropy over the bins; baseline: the training bins' frequencies.
- ``value`` (scgpt): squared error of the value (plus, with MVC, that of the value
  predicted from the cell embedding); baseline: the training mean value.
- ``depth_value`` (scfoundation): squared error of the value, through the decoder with
  the read-depth tokens; baseline: the training mean value.

The baseline is what a model knowing nothing but the training set's marginal distribution
scores: a pretrained model must beat it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..data import MaskingCollator
    from ..models import CellModel, ModelConfig
    from ..tokenizers import TokenBatch
    from ._batching import MicroBatch

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


def masked_losses(model: CellModel, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Summed losses over the masked tokens of one collated batch.

    Parameters
    ----------
    model
        The model; runs in whatever mode (train / eval) it is in.
    inputs
        The output of :class:`~sclcm.data.MaskingCollator` on the model's device.

    Returns
    -------
    ``objective`` (the summed cross-entropy or squared error of the objective), ``mvc``
    (scGPT's MVC squared error, when the model has it) and ``n`` (masked tokens).
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
    return result


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
    """

    objective: str
    probs: np.ndarray | None = None
    mean: float | None = None

    @classmethod
    def fit(cls, batches: Iterable[TokenBatch], config: ModelConfig) -> FrequencyBaseline:
        """From training cells: the distribution of the tokens masking can choose (genes,
        never special tokens)."""
        check_objective(config)
        size = config.vocab_size if config.objective == "mlm" else max(config.n_bins, 1)
        counts, total, n = np.zeros(size), 0.0, 0
        for batch in batches:
            genes = batch.gene_ids >= config.n_special_tokens
            if config.objective == "mlm":
                counts += np.bincount(batch.gene_ids[genes], minlength=size)
            elif config.objective == "bin":
                counts += np.bincount(batch.values[genes].astype(np.int64), minlength=size)
            else:
                total += float(batch.values[genes].astype(np.float64).sum())
                n += int(genes.sum())
        if config.objective in CLASSIFICATION:
            counts = counts + 1
            if config.objective == "mlm":  # only genes can be masked labels
                counts[:config.n_special_tokens] = 0
            return cls(config.objective, probs=counts / counts.sum())
        return cls(config.objective, mean=total / max(n, 1))

    def loss_sum(self, labels: torch.Tensor) -> float:
        """Summed cross-entropy (or squared error) of the baseline on these labels."""
        y = labels.detach().cpu().numpy()
        if self.probs is not None:
            return float(-np.log(self.probs[y.astype(np.int64)]).sum())
        return float(((y.astype(np.float64) - self.mean) ** 2).sum())

    @property
    def kind(self) -> str:
        return {"mlm": "cross-entropy of the training gene-token frequencies",
                "bin": "cross-entropy of the training bin frequencies"}.get(
            self.objective, "squared error of the training mean value")


@torch.no_grad()
def evaluate(model: CellModel, batches: Iterable[TokenBatch | MicroBatch],
             collator: MaskingCollator, *,
             baseline: FrequencyBaseline | None = None,
             device: str | torch.device | None = None) -> dict[str, float]:
    """Mean masked loss of ``model`` on ``batches`` (and of the baseline on the same tokens).

    Masks are drawn by ``collator`` with ``step`` = the batch's index, so the same batches
    are masked alike at every evaluation.

    Returns
    -------
    ``loss`` (mean over masked tokens: cross-entropy or squared error), ``mvc`` (scGPT),
    ``baseline``, ``n_tokens`` (masked tokens), ``n_cells``.
    """
    device = next(model.parameters()).device if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {"objective": 0.0, "mvc": 0.0, "baseline": 0.0, "n": 0.0}
    n_cells = 0
    try:
        for i, batch in enumerate(batches):
            batch = getattr(batch, "tokens", batch)  # a MicroBatch or a TokenBatch
            inputs = to_device(collator(batch, step=i), device)
            out = masked_losses(model, inputs)
            for k in ("objective", "mvc", "n"):
                if k in out:
                    sums[k] += float(out[k])
            if baseline is not None:
                sums["baseline"] += baseline.loss_sum(inputs["labels"])
            n_cells += batch.n_cells
    finally:
        model.train(was_training)
    n = max(sums["n"], 1.0)
    result = {"loss": sums["objective"] / n, "n_tokens": int(sums["n"]), "n_cells": n_cells}
    if model.mvc is not None:
        result["mvc"] = sums["mvc"] / n
    if baseline is not None:
        result["baseline"] = sums["baseline"] / n
    return result
