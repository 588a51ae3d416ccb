"""PretrainModule: the LightningModule that owns the pretraining loss and the optimizer."""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch

from ..data import MaskingCollator
from ._config import ObjectivesConfig
from ._objectives import batch_terms, check_objective, total_loss

if TYPE_CHECKING:
    from ..models import CellModel
    from ._batching import MicroBatch

#: Added to the seed of the held-out masks, so that they differ from any training step's.
EVAL_SEED_OFFSET = 1_000_003


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; training stopped before the weights did."""


class WarmupCosine:
    """Learning-rate factor: linear warmup over ``warmup_steps``, then cosine decay to
    ``min_ratio`` at ``max_steps`` (and ``min_ratio`` after).

    >>> f = WarmupCosine(warmup_steps=10, max_steps=110, min_ratio=0.1)
    >>> [round(f(s), 3) for s in (0, 9, 10, 60, 110, 500)]
    [0.1, 1.0, 1.0, 0.55, 0.1, 0.1]
    """

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float = 0.1) -> None:
        self.warmup_steps, self.max_steps = int(warmup_steps), int(max_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:  # step 0 trains too: (step + 1) / warmup
            return (step + 1) / self.warmup_steps
        span = max(self.max_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_seed(*keys: int) -> int:
    """A 32-bit seed from integers (seed, step, rank): the same step draws the same
    dropout masks in a resumed run (Lightning does not checkpoint RNG states)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class PretrainModule(L.LightningModule):
    """Pretrain a :class:`~sclcm.models.CellModel`, for any preset, on its token objective
    and the cell-level objectives, weighted by ``objectives``.

    The token loss follows ``model.config.objective`` (see ``sclcm.train._objectives``):
    cross-entropy over the vocabulary (``mlm``) or the bins (``bin``) of the masked tokens,
    or their squared error (``value``, plus scGPT's MVC term when ``config.mvc``;
    ``depth_value`` through scFoundation's decoder). The cell-level losses (reconstruction
    of a gene panel from the cell embedding, contrastive views) are in
    ``sclcm.train._cell_objectives``. Masks and views come from
    :class:`~sclcm.data.MaskingCollator`, seeded with the step, as do the dropout masks: a
    resumed run trains exactly as an uninterrupted one.

    Parameters
    ----------
    model
        The model to train.
    lr, weight_decay, betas
        AdamW; weight decay on matrices and embeddings only (``model.param_groups``).
    warmup_steps, max_steps, min_lr_ratio
        Linear warmup, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``
        (default: the trainer's ``max_steps``); stepped after every optimizer step.
    mask_prob, generative
        Masking (see :class:`~sclcm.data.MaskingCollator`).
    mvc_weight
        Weight of scGPT's MVC loss.
    objectives
        The weight of each objective (:class:`~sclcm.train.ObjectivesConfig` or a dict of
        its fields; default: the token objective alone).
    seed
        Seeds masks and dropout (with the step and the rank).
    throughput_window
        Steps over which ``train/tokens_per_s`` is averaged.

    Notes
    -----
    Logged: ``train/loss`` (the weighted sum), ``train/objective`` (the token objective),
    ``train/mvc``, ``train/reconstruction``, ``train/contrastive``, ``train/lr``,
    ``train/tokens_per_s`` (real tokens, no padding, of all ranks), ``train/cells_per_s``,
    and ``val/loss`` (weighted) with ``val/<term>`` per objective.
    """

    def __init__(self, model: CellModel, *, lr: float = 1e-4, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0,
                 max_steps: int | None = None, min_lr_ratio: float = 0.1,
                 mask_prob: float = 0.15, generative: bool = False, mvc_weight: float = 1.0,
                 objectives: ObjectivesConfig | dict[str, Any] | None = None,
                 seed: int = 0, throughput_window: int = 50) -> None:
        super().__init__()
        check_objective(model.config)
        self.model = model
        obj = objectives if isinstance(objectives, ObjectivesConfig) else \
            ObjectivesConfig(**(objectives or {}))
        if obj.reconstruction > 0 and model.recon_head is None:
            msg = ("objectives.reconstruction needs a model with a reconstruction head: "
                   "build it with ModelConfig(recon_panel=...) (sclcm.train.pretrain does).")
            raise ValueError(msg)
        self.objectives = obj
        self.save_hyperparameters(ignore=["model", "objectives"])
        self.hparams["objectives"] = dataclasses.asdict(obj)
        self.collator = MaskingCollator(model.config, mask_prob=mask_prob,
                                        generative=generative, seed=seed)
        self.eval_collator = MaskingCollator(model.config, mask_prob=mask_prob,
                                             generative=generative,
                                             seed=seed + EVAL_SEED_OFFSET)
        self._window: deque[tuple[float, int, int]] = deque(maxlen=throughput_window + 1)

    # --- loss ----------------------------------------------------------------------
    def masked_loss(self, batch: MicroBatch, step: int, *, collator: MaskingCollator | None = None
                    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, float]]]:
        """The weighted loss of ``batch`` (masks and views drawn for ``step``) and its terms
        (``{term: (sum, count)}``, see :func:`~sclcm.train.batch_terms`)."""
        terms = batch_terms(self.model, batch.tokens, step=step,
                            collator=collator or self.collator, objectives=self.objectives,
                            device=self.device)
        return total_loss(terms, self.objectives, self.hparams.mvc_weight), terms

    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        accumulate = self.trainer.accumulate_grad_batches
        step = self.global_step * accumulate + batch_idx % accumulate
        torch.manual_seed(step_seed(self.hparams.seed, step, self.global_rank))
        loss, terms = self.masked_loss(batch, step)
        self._check_finite(loss, batch, batch_idx)
        n = batch.n_cells
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        if len(terms) > 1 or "objective" not in terms:
            for k, (total, count) in terms.items():
                self.log(f"train/{k}", total.detach() / max(count, 1.0), batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return loss

    def _check_finite(self, loss: torch.Tensor, batch: MicroBatch, batch_idx: int) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        if self.trainer.world_size > 1:  # stop every rank, or the others wait forever
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        if bool(bad > 0):
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            msg = (f"The training loss is {float(loss.detach())} (on some rank) at step "
                   f"{self.global_step} (epoch {self.current_epoch}, batch {batch_idx}, "
                   f"{batch.n_cells} cells); training stopped. Lower the learning rate "
                   f"(now {lr:.3g}; a longer warmup or gradient clipping helps too), or check "
                   "the input: raw counts without NaN or inf (sclcm.pp.check_counts). "
                   "precision='32-true' rules out a bf16 overflow.")
            raise NonFiniteLossError(msg)

    def on_train_batch_end(self, outputs: Any, batch: MicroBatch, batch_idx: int) -> None:
        self._window.append((time.perf_counter(), batch.n_tokens, batch.n_cells))
        if len(self._window) > 1:
            elapsed = self._window[-1][0] - self._window[0][0]
            tokens = sum(w[1] for w in list(self._window)[1:])
            cells = sum(w[2] for w in list(self._window)[1:])
            world = self.trainer.world_size  # every rank trains alike: scale rank 0's rate
            self.log("train/tokens_per_s", world * tokens / elapsed, batch_size=1)
            self.log("train/cells_per_s", world * cells / elapsed, batch_size=1)

    def on_train_epoch_start(self) -> None:
        self._window.clear()  # the epoch's first batch waits for the stream to restart

    def validation_step(self, batch: MicroBatch, batch_idx: int) -> None:
        loss, terms = self.masked_loss(batch, batch_idx, collator=self.eval_collator)
        opts = dict(sync_dist=True, on_step=False, on_epoch=True)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch.n_cells, **opts)
        for k, (total, count) in terms.items():
            # weighted by what the term sums over: the epoch's value is the pooled mean, as
            # evaluate() and metrics.json report it
            self.log(f"val/{k}", total / max(count, 1.0), batch_size=max(int(count), 1), **opts)

    # --- optimizer -----------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        max_steps = hp.max_steps if hp.max_steps is not None else self.trainer.max_steps
        if max_steps is None or max_steps < 1:
            msg = "Set max_steps (of the module or the Trainer): the cosine schedule needs it."
            raise ValueError(msg)
        opt = torch.optim.AdamW(self.model.param_groups(hp.weight_decay), lr=hp.lr,
                                betas=tuple(hp.betas))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, WarmupCosine(hp.warmup_steps, max_steps, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            # the norm is over shards on all ranks: FSDP's own method, not torch's (Lightning's
            # FSDP precision plugin refuses to clip by norm)
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # enough to rebuild the model from the checkpoint alone (model_from_checkpoint)
        from ..models._io import FORMAT_VERSION

        vocab = self.model.vocab
        checkpoint["sclcm"] = {"model_config": self.model.config.to_dict(),
                               "format_version": FORMAT_VERSION,
                               "vocab": vocab.to_dict() if vocab is not None else None}


def model_from_checkpoint(path: str, *, map_location: str | torch.device = "cpu") -> CellModel:
    """The :class:`~sclcm.models.CellModel` of a pretraining checkpoint (``.ckpt``), e.g. to
    ``save_pretrained`` an intermediate step or embed with it; the run's tokenizer (written
    to ``out_dir/tokenizer`` when the run starts) is attached when it is found beside the
    ``checkpoints`` folder."""
    from pathlib import Path

    from ..genes import GeneVocab
    from ..models import CellModel, ModelConfig
    from ..models._io import config_defaults_since
    from ..tokenizers import load_tokenizer

    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if "sclcm" not in ckpt:
        msg = f"{path} is not a checkpoint of sclcm.train.PretrainModule."
        raise ValueError(msg)
    meta = ckpt["sclcm"]
    vocab = GeneVocab.from_dict(meta["vocab"]) if meta["vocab"] is not None else None
    # a checkpoint written before a config field existed lacks it: the model it trained is
    # the one that field's documented default builds (format_version is recorded since then)
    defaults = config_defaults_since(meta.get("format_version", 1))
    model = CellModel(ModelConfig.from_dict(meta["model_config"], source=str(path),
                                            defaults=defaults), vocab=vocab)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
             if k.startswith("model.")}
    model.load_state_dict(state)
    run_tokenizer = Path(path).resolve().parent.parent / "tokenizer"
    if (run_tokenizer / "tokenizer.json").is_file():
        model.attach_tokenizer(load_tokenizer(run_tokenizer))
    return model
