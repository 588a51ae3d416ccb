"""Pretraining: a LightningModule per objective, token-budget micro-batches, exact resume.

- :func:`pretrain` runs a whole configuration (``sclcm pretrain --config ...``): builds
  the streams, vocabulary and fitted tokenizer, trains with Lightning, saves the model
  (``save_pretrained``) and its held-out metrics.
- :class:`PretrainModule`: the loss of ``model.config.objective`` on masked tokens, AdamW
  with warmup + cosine decay, a guard against non-finite losses.
- :class:`PretrainDataModule` / :class:`MicroBatchLoader`: stream blocks cut into
  micro-batches of at most ``max_tokens`` padded tokens, cells grouped by length; the data
  position is saved in every checkpoint.
- :func:`load_config` and :class:`PretrainConfig`: the YAML configuration; presets ship in
  ``sclcm/train/configs``.
- Cell-level objectives (:class:`ObjectivesConfig`): reconstruction of a highly variable
  gene panel from the cell embedding (:class:`PanelTargets` makes its targets) and
  contrastive gene-subset views, weighted with the token objective (:func:`batch_terms`,
  :func:`total_loss`).
"""

from ._batching import MicroBatch, group_by_length, micro_batches, split_further
from ._cell_objectives import PanelTargets, choose_panel, info_nce, reconstruction_loss
from ._config import ConfigError, ObjectivesConfig, PretrainConfig, load_config
from ._datamodule import PretrainDataModule
from ._finetune import FinetuneModule, finetune, load_classifier, load_labels, save_labels
from ._finetune_config import FinetuneConfig, load_finetune_config, run_finetune
from ._module import (
    NonFiniteLossError,
    PretrainModule,
    WarmupCosine,
    model_from_checkpoint,
)
from ._objectives import FrequencyBaseline, batch_terms, evaluate, masked_losses, total_loss
from ._resume import MicroBatchLoader
from ._run import pretrain

__all__ = [
    "ConfigError",
    "FinetuneConfig",
    "FinetuneModule",
    "FrequencyBaseline",
    "MicroBatch",
    "MicroBatchLoader",
    "NonFiniteLossError",
    "ObjectivesConfig",
    "PanelTargets",
    "PretrainConfig",
    "PretrainDataModule",
    "PretrainModule",
    "WarmupCosine",
    "batch_terms",
    "choose_panel",
    "evaluate",
    "finetune",
    "group_by_length",
    "info_nce",
    "load_classifier",
    "load_config",
    "load_finetune_config",
    "load_labels",
    "masked_losses",
    "micro_batches",
    "model_from_checkpoint",
    "pretrain",
    "reconstruction_loss",
    "run_finetune",
    "save_labels",
    "split_further",
    "total_loss",
]
