"""``pretrain(config)``: a whole run, from a config to a saved model and its metrics."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from .. import logging as logg
from .._settings import settings
from ._config import ConfigError, expand, load_config
from ._module import PretrainModule
from ._objectives import evaluate
from ._prepare import fit_baseline, prepare
from ._resume import MicroBatchLoader

if TYPE_CHECKING:
    from collections.abc import Sequence

    import lightning as L

    from ..models import CellModel
    from ._config import PretrainConfig, TrainerConfig

METRICS = "metrics.json"
#: The fitted tokenizer, written when a run starts (see ``model_from_checkpoint``).
RUN_TOKENIZER = "tokenizer"


def resolve_precision(precision: str, accelerator: str) -> str:
    """``"auto"``: bf16 mixed precision on a CUDA GPU (fp16 on GPUs without bf16), else
    32-bit; other values are passed to Lightning as they are."""
    if precision != "auto":
        return precision
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def check_accelerator(t: TrainerConfig) -> None:
    """Raise :class:`ConfigError` when ``trainer.accelerator`` (or ``trainer.devices``) asks
    for hardware this machine lacks; Lightning would say so only once the data are
    prepared."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if t.accelerator in ("cuda", "gpu") and not (cuda or (t.accelerator == "gpu" and mps)):
        why = ("this torch is a CPU-only build" if torch.version.cuda is None else
               "torch.cuda.is_available() is False: no CUDA GPU is visible (check "
               "nvidia-smi and CUDA_VISIBLE_DEVICES)")
        msg = (f"trainer.accelerator is {t.accelerator!r}, but {why}. Set trainer.accelerator "
               "to 'cpu' (or 'auto': a GPU where there is one), e.g. --set "
               "trainer.accelerator=auto, or run on a machine with a GPU.")
        raise ConfigError(msg)
    if t.accelerator == "mps" and not mps:
        msg = ("trainer.accelerator is 'mps', but torch.backends.mps.is_available() is False "
               "(Apple GPUs only). Set trainer.accelerator to 'cpu' or 'auto'.")
        raise ConfigError(msg)
    n_gpus = torch.cuda.device_count()
    if t.accelerator in ("cuda", "gpu") and cuda and isinstance(t.devices, int) \
            and not isinstance(t.devices, bool) and t.devices > n_gpus:
        msg = (f"trainer.devices is {t.devices}, but this machine has {n_gpus} CUDA "
               f"GPU{'s' * (n_gpus != 1)}; set trainer.devices to at most {n_gpus} (or 'auto').")
        raise ConfigError(msg)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar over the whole run: optimizer steps out of ``max_steps``.

    A run is step-based (``max_epochs=-1``) over a stream without a length, so Lightning's
    own bars count batches per pass over the data with no total (and the rich one titles
    them ``Epoch 0/-2``). This one counts ``trainer.global_step`` (from the resumed step)
    and leaves out the logger's version (``v_num``).
    """

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        return Tqdm(desc="Training steps", total=trainer.max_steps, initial=trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the run: not reset at each pass over the data

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total):
            self._show(bar, trainer.global_step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the bar stays open until the run ends (on_train_end closes it)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule
                    ) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    @staticmethod
    def _show(bar: Any, n: int) -> None:
        if not bar.disable:
            bar.n = n
            bar.refresh()


class _NoTips(logging.Filter):
    """Drops Lightning's tips (install litlogger, litmodels, ...): advertisements, not news
    about the run. Its other lines (GPU available, max_steps reached) pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith("💡 Tip")


_NO_TIPS = _NoTips()


def quiet_lightning() -> None:
    """Install the tip filter on the logger Lightning's ``rank_zero_info`` writes to."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if _NO_TIPS not in log.filters:
            log.addFilter(_NO_TIPS)


def build_strategy(t: TrainerConfig) -> Any:
    """Lightning's strategy; ``fsdp`` shards per transformer block (and checkpoints the
    blocks' activations when ``activation_checkpointing``)."""
    if t.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from ..models._model import Block

        return FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full",
                            activation_checkpointing_policy={Block}
                            if t.activation_checkpointing else None)
    if t.activation_checkpointing:
        logg.warning("trainer.activation_checkpointing is applied with strategy 'fsdp' only.")
    return t.strategy


def build_trainer(cfg: PretrainConfig, out_dir: Path, *, validate: bool,
                  callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """The Lightning ``Trainer`` of a run: step-based (``max_steps``, validation and
    checkpoints every so many steps), CSV logs and checkpoints under ``out_dir``."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
    from lightning.pytorch.loggers import CSVLogger

    t, o = cfg.trainer, cfg.optim
    quiet_lightning()
    callbacks = list(callbacks)
    if settings.progress and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(StepProgressBar())
    if t.checkpoint_every:
        callbacks.append(ModelCheckpoint(
            dirpath=out_dir / "checkpoints", filename="step-{step:07d}",
            auto_insert_metric_name=False, every_n_train_steps=t.checkpoint_every,
            save_top_k=-1, save_last=True))
    # the train loader has no length (micro-batches per block depend on the cells), so
    # validation runs every `val_every` steps counted across epochs
    val = {"val_check_interval": t.val_every, "check_val_every_n_epoch": None} \
        if validate and t.val_every else {"limit_val_batches": 0}
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=build_strategy(t), precision=resolve_precision(t.precision, t.accelerator),
        max_steps=o.max_steps, max_epochs=-1, gradient_clip_val=o.grad_clip,
        accumulate_grad_batches=o.accumulate_grad_batches, log_every_n_steps=t.log_every,
        num_sanity_val_steps=0, logger=CSVLogger(out_dir, name="logs"),
        callbacks=callbacks, enable_checkpointing=bool(t.checkpoint_every),
        enable_progress_bar=settings.progress, enable_model_summary=False,
        default_root_dir=out_dir, **val)


def build_model(cfg: PretrainConfig, vocab, tokenizer, panel=None, panel_mean=None
                ) -> CellModel:
    """``ModelConfig.preset(model.preset, model.size, vocab=vocab, **model.overrides)``,
    with a reconstruction head over ``panel`` (token ids) when given, its bias set to
    ``panel_mean`` (see :mod:`sclcm.train._cell_objectives`)."""
    from ..models import CellModel, ModelConfig

    overrides = dict(cfg.model.overrides)
    if panel is not None:
        overrides["recon_panel"] = [int(g) for g in panel]
    max_len = getattr(tokenizer, "max_len", None)
    if cfg.model.preset == "geneformer" and max_len and "max_position" not in overrides:
        overrides["max_position"] = max_len  # no position rows the tokenizer never uses
    # the bins the tokenizer makes are the bins the model embeds
    if cfg.model.preset == "scgpt":
        if tokenizer.binned:
            overrides.setdefault("n_bins", tokenizer.n_bins)
        else:  # scGPT's continuous mode
            overrides.setdefault("value_encoder", "continuous")
    if cfg.model.preset == "scbert":
        overrides.setdefault("n_bins", tokenizer.max_level + 1)
    config = ModelConfig.preset(cfg.model.preset, cfg.model.size, vocab=vocab, **overrides)
    torch.manual_seed(cfg.trainer.seed)
    model = CellModel(config, vocab=vocab, tokenizer=tokenizer)
    if panel_mean is not None:
        with torch.no_grad():
            model.recon_head.bias.copy_(torch.as_tensor(panel_mean))
    return model


def held_out_batches(held: Any, cfg: PretrainConfig, tokenizer, targets=None) -> list:
    """The held-out micro-batches (all of them, whatever the ranks: read in this process)."""
    held.set_shard(0, 1)
    return list(MicroBatchLoader(held.tokenize(tokenizer, targets=targets),
                                 max_tokens=cfg.optim.max_tokens,
                                 seed=cfg.trainer.seed, max_cells=cfg.data.held_out_max_cells))


def pretrain(config: str | Path | dict | PretrainConfig, *,
             overrides: dict[str, Any] | None = None,
             callbacks: Sequence[L.Callback] = ()) -> tuple[CellModel, dict[str, Any]]:
    """Pretrain a model as ``config`` says; save it and its metrics in ``out_dir``.

    Parameters
    ----------
    config
        A YAML file, a shipped preset's name, a dict or a :class:`PretrainConfig` (see
        :func:`load_config` and ``docs/pretraining.md``).
    overrides
        Dotted keys to set, e.g. ``{"optim.max_steps": 100, "out_dir": "run1"}``.
    callbacks
        Extra Lightning callbacks.

    Returns
    -------
    tuple[CellModel, dict[str, Any]]
        The trained model (on rank 0; other ranks get their replica) and the metrics written to
        ``out_dir/metrics.json`` (rank 0): held-out masked loss at step 0 and at the end
        (``loss_step0``, ``loss_end``) and of the frequency baseline (``baseline``), ...

    Writes ``out_dir/tokenizer`` (the fitted tokenizer, before training starts),
    ``out_dir/model`` (:meth:`~sclcm.models.CellModel.save_pretrained`, with the
    tokenizer), ``out_dir/checkpoints`` (``last.ckpt`` and one per ``checkpoint_every``
    steps: model, optimizer, schedule and data position), ``out_dir/logs`` (CSV) and
    ``out_dir/metrics.json``.
    """
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only

    from ..models import CellModel
    from ._datamodule import PretrainDataModule

    cfg = load_config(config, overrides=overrides)  # every key and value, before any work
    check_accelerator(cfg.trainer)
    started = time.perf_counter()
    out_dir = Path(expand(cfg.out_dir, key="out_dir"))
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    prep = prepare(cfg)
    model = prep.start if prep.start is not None else \
        build_model(cfg, prep.vocab, prep.tokenizer, prep.panel, prep.panel_mean)
    o, objectives = cfg.optim, cfg.objectives
    module = PretrainModule(model, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                            warmup_steps=o.warmup_steps, max_steps=o.max_steps,
                            min_lr_ratio=o.min_lr_ratio, mask_prob=o.mask_prob,
                            generative=o.generative, mvc_weight=o.mvc_weight,
                            objectives=objectives, seed=cfg.trainer.seed,
                            throughput_window=cfg.trainer.log_every)
    tok, held = prep.tokenizer, prep.held_out
    data = PretrainDataModule(
        prep.train.tokenize(tok, targets=prep.targets(prep.train)),
        held.tokenize(tok, targets=prep.targets(held)) if held is not None else None,
        max_tokens=o.max_tokens, seed=cfg.trainer.seed, num_workers=cfg.data.num_workers,
        val_max_cells=cfg.data.held_out_max_cells)
    trainer = build_trainer(cfg, out_dir, validate=held is not None, callbacks=callbacks)
    if rank_zero_only.rank == 0:  # so that any checkpoint of the run loads into a usable model
        tok.save(out_dir / RUN_TOKENIZER)
    # rank 0 scores the held-out cells before training; with Lightning's launcher the
    # other ranks start inside fit(), so the rank comes from the environment here
    metrics: dict[str, Any] = {}
    baseline = batches = None
    if held is not None and rank_zero_only.rank == 0:
        baseline = fit_baseline(cfg, prep.train, tok, model.config, prep.targets(prep.train))
        batches = held_out_batches(held, cfg, tok, prep.targets(held))
        with _eval_context(trainer):
            step0 = evaluate(model.to(trainer.strategy.root_device), batches,
                             module.eval_collator, baseline=baseline, objectives=objectives)
        metrics.update(held_out_metrics(step0, "step0"))
        metrics["held_out_cells"] = step0["n_cells"]
        if "n_tokens" in step0:
            metrics["held_out_masked_tokens"] = step0["n_tokens"]
        logg.info(f"held-out losses at step 0: {_losses(step0)}")
    resume = cfg.trainer.resume
    with warnings.catch_warnings():
        # Lightning 2.6 on torch >= 2.10 warns about its own use of torch's pytree API
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        if resume is not None:  # resuming into the run's folder: it has checkpoints, sure
            warnings.filterwarnings("ignore", message="Checkpoint directory .* not empty")
        trainer.fit(module, datamodule=data,
                    ckpt_path=resume if resume in (None, "last") else expand(resume, key="resume"))

    state = trainer.strategy.lightning_module_state_dict()  # a collective under FSDP
    if not trainer.is_global_zero:
        return module.model, {}
    final = CellModel(model.config, vocab=prep.vocab, tokenizer=tok)
    final.load_state_dict({k.removeprefix("model."): v for k, v in state.items()
                           if k.startswith("model.")})
    final.eval()
    if batches is not None:
        with _eval_context(trainer):
            end = evaluate(final.to(trainer.strategy.root_device), batches,
                           module.eval_collator, baseline=baseline, objectives=objectives)
        metrics.update(held_out_metrics(end, "end"))
        logg.info(f"held-out losses after {trainer.global_step} steps: {_losses(end)} "
                  f"(step 0: {_losses(step0)})")
    final = final.cpu()
    final.save_pretrained(out_dir / "model", tokenizer=tok)
    metrics = {"preset": cfg.model.preset, "size": cfg.model.size,
               "objective": final.config.objective,
               "objectives": {k: v for k, v in dataclasses.asdict(objectives).items()},
               "loss_kind": "cross-entropy" if final.config.objective in ("mlm", "bin")
               else "mean squared error", **metrics,
               "baseline_kind": baseline.kind if baseline is not None else None,
               "steps": trainer.global_step, "n_params": final.get_num_params(),
               "train_cells": getattr(prep.train, "n_cells", None),
               **prep.summary, "wall_time_s": round(time.perf_counter() - started, 1),
               "config": cfg.to_dict()}
    (out_dir / METRICS).write_text(json.dumps(metrics, indent=1, default=str))
    logg.info(f"saved the model to {out_dir / 'model'} and the metrics to {out_dir / METRICS}")
    return final, metrics


def held_out_metrics(result: dict[str, float], when: str) -> dict[str, float]:
    """``evaluate``'s losses as metrics: ``loss_step0``, ``reconstruction_end``, ...; the
    baselines (the same at every step) without a suffix."""
    out = {f"{k}_{when}": result[k] for k in ("loss", "mvc", "reconstruction", "contrastive")
           if k in result}
    out.update({k: result[k] for k in ("baseline", "reconstruction_baseline") if k in result})
    return out


def _losses(result: dict[str, float]) -> str:
    names = {"loss": "token", "mvc": "mvc", "reconstruction": "reconstruction",
             "contrastive": "contrastive", "baseline": "token baseline",
             "reconstruction_baseline": "reconstruction baseline"}
    return ", ".join(f"{v} {result[k]:.4f}" for k, v in names.items() if k in result)


def _eval_context(trainer: L.Trainer):
    """Autocast as in training (bf16 on a GPU), so the held-out loss is the trained one's."""
    plugin = getattr(trainer, "precision_plugin", None)
    return plugin.forward_context() if plugin is not None else nullcontext()
