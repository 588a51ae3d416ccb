"""``sclcm finetune --config run.yaml``: a fine-tuning run described in YAML.

The file has the sections of :func:`sclcm.train.finetune`'s arguments::

    data:
      h5ad: ${SCLCM_DATA}/reference.h5ad   # counts, labels in obs
      label_key: cell_type
      groupby: donor                        # whole donors validated (optional)
    model:
      start: sclcm-small                    # shipped name or model directory
      freeze_layers: 0
    optim:
      max_steps: 500
      lr: 1.0e-4
    trainer:
      devices: 1
      strategy: auto                        # ddp with devices: N
      checkpoint_every: 100
    out_dir: my-classifier

Keys are checked as in pretraining configs (an unknown key names the closest known one);
relative paths are taken from the config file's folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._config import ConfigError, _build, _set_dotted, expand, read_sections

if TYPE_CHECKING:
    from ..models import CellModel


@dataclass
class FinetuneDataConfig:
    h5ad: str | None = None
    label_key: str | None = None
    groupby: str | None = None
    layer: str | None = None
    orthologs: str = "one2one"
    backed: bool = False


@dataclass
class FinetuneModelConfig:
    start: str | None = None  # None: the default shipped model
    freeze_layers: int = 0
    classifier_layers: int | None = None


@dataclass
class FinetuneOptimConfig:
    max_steps: int = 500
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    class_weights: bool = True
    gene_dropout: float = 0.0
    max_tokens: int = 16_384


@dataclass
class FinetuneTrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "auto"
    val_fraction: float = 0.2
    val_every: int | None = None
    checkpoint_every: int | None = None
    calibrate: bool = True
    seed: int = 0
    resume: str | None = None


@dataclass
class FinetuneConfig:
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    trainer: FinetuneTrainerConfig = field(default_factory=FinetuneTrainerConfig)
    out_dir: str = "sclcm_finetune"
    source: str | None = None  # the file read


def load_finetune_config(config: str | Path | dict, *,
                         overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """Read and check a fine-tuning config (a YAML file or a dict of the same shape).

    Raises
    ------
    ConfigError
        An unknown key, a value of the wrong type, or no ``data.h5ad`` / ``data.label_key``.

    Examples
    --------
    >>> cfg = load_finetune_config({"data": {"h5ad": "ref.h5ad", "label_key": "cell_type"}},
    ...                            overrides={"optim.lr": "3e-4"})
    >>> cfg.optim.lr, cfg.model.start
    (0.0003, None)
    """
    source = None
    if isinstance(config, dict):
        raw = dict(config)
    else:
        path = Path(config)
        if not path.is_file():
            msg = f"No fine-tuning config at {path}."
            raise ConfigError(msg)
        raw, source = read_sections(path), str(path)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    cfg = _build(FinetuneConfig, raw, "")
    cfg.source = source
    for key in ("h5ad", "label_key"):
        if not getattr(cfg.data, key):
            msg = (f"data.{key} is not set: a fine-tuning run needs the reference "
                   "(data.h5ad, counts in X) and its obs column of labels (data.label_key).")
            raise ConfigError(msg)
    return cfg


def run_finetune(config: str | Path | dict | FinetuneConfig, *,
                 overrides: dict[str, Any] | None = None) -> CellModel:
    """Run :func:`sclcm.train.finetune` as a config describes; the model is saved to
    ``out_dir``."""
    import anndata as ad

    from .._settings import settings
    from ._finetune import finetune

    cfg = config if isinstance(config, FinetuneConfig) else \
        load_finetune_config(config, overrides=overrides)
    base = Path(cfg.source).parent if cfg.source else Path.cwd()
    path = Path(expand(cfg.data.h5ad, key="data.h5ad"))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        msg = f"data.h5ad: no file {path}."
        raise ConfigError(msg)
    out_dir = Path(expand(cfg.out_dir, key="out_dir"))
    out_dir = out_dir if out_dir.is_absolute() else base / out_dir
    adata = ad.read_h5ad(path, backed="r" if cfg.data.backed else None)
    o, t = dataclasses.asdict(cfg.optim), cfg.trainer
    return finetune(adata, cfg.data.label_key, cfg.model.start, groupby=cfg.data.groupby,
                    layer=cfg.data.layer, orthologs=cfg.data.orthologs,
                    freeze_layers=cfg.model.freeze_layers,
                    classifier_layers=cfg.model.classifier_layers, **o,
                    val_fraction=t.val_fraction, val_every=t.val_every,
                    calibrate=t.calibrate, out_dir=out_dir, accelerator=t.accelerator,
                    devices=t.devices, strategy=t.strategy, precision=t.precision,
                    checkpoint_every=t.checkpoint_every, resume=t.resume,
                    progress_bar=settings.progress, seed=t.seed)
