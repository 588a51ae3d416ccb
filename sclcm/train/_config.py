"""The pretraining configuration: YAML sections as dataclasses, checked on load.

A config is a YAML file (or a dict) with the sections ``data``, ``tokenizer``, ``vocab``,
``model``, ``optim``, ``objectives``, ``trainer`` and the key ``out_dir``; the presets ship as
``sclcm/train/configs/<preset>.yaml`` and load by name (``load_config("geneformer")``).
Every key and value is checked when the config is read, before any work: an unknown key is
an error that suggests the closest known one and lists them all, a value that takes one of a
few names lists them (``model.size``, ``trainer.accelerator``, ``model.overrides`` field
names and values, ...). Strings in paths expand ``$VARS`` / ``${VARS}``; relative data paths
are relative to the config file.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from .._checks import InputError
from ..genes import ORTHOLOG_RULES
from ..models._config import FAMILIES, SIZES, choice_problem, did_you_mean

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(InputError):
    """A pretraining configuration that cannot run; the message says what to change."""


@dataclass
class CensusSource:
    """Cells of a CELLxGENE Census (``census_version``) or a local one (``uri``)."""

    uri: str | None = None
    census_version: str | None = None
    organism: str = "Homo sapiens"
    obs_value_filter: str | None = None
    var_value_filter: str | None = None


@dataclass
class DataConfig:
    """Where the cells are, and which are held out.

    ``h5ad``: .h5ad files (globs allowed), read ``backed="r"``; or ``census``. The held-out
    cells are ``held_out_files``, or (Census) those of ``held_out_filter`` (an obs filter,
    e.g. ``dataset_id == '...'``), or a random ``held_out_fraction`` of each file's cells
    (default 0.05; 0 for none). ``stats_cells`` training cells are read to build the
    vocabulary, fit the tokenizer and the frequency baseline. Files of another species
    than ``vocab.species`` reach its genes through ``orthologs`` (``one2one`` or ``all``;
    see :class:`~sclcm.data.AnnDataStream`).
    """

    h5ad: list[str] = field(default_factory=list)
    layer: str | None = None
    orthologs: str = "one2one"
    census: CensusSource | None = None
    held_out_fraction: float | None = None
    held_out_files: list[str] = field(default_factory=list)
    held_out_filter: str | None = None
    held_out_max_cells: int = 5_000
    block_size: int = 1024
    chunk_size: int = 64
    buffer_size: int | None = 16_384
    num_workers: int = 0
    stats_cells: int = 200_000


@dataclass
class TokenizerConfig:
    """The tokenizer family (default: the model preset's) and its options.

    ``options`` go to the tokenizer's constructor (e.g. ``max_len``). ``panel_size``: scBERT's
    panel, the most-detected genes of the training cells. ``medians``: how Geneformer's gene
    medians are fit on the training cells (``histogram``: constant memory; ``exact``).
    """

    family: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    panel_size: int = 2_000
    medians: str = "histogram"


@dataclass
class VocabConfig:
    """The gene vocabulary: a reference (or a ``path`` to a vocab.json), restricted to the
    genes detected in at least ``min_cells`` training cells when ``restrict_to_data``."""

    path: str | None = None
    species: str = "human"
    biotypes: list[str] | None = field(default_factory=lambda: ["protein_coding", "lncRNA"])
    restrict_to_data: bool = True
    min_cells: int = 1


@dataclass
class ModelSection:
    """``ModelConfig.preset(preset, size, vocab=..., **overrides)``, or with ``start`` (a
    shipped name or model directory) that model, whose training continues: its
    architecture, vocabulary, tokenizer, reconstruction panel and weights (continued,
    domain-adaptive pretraining on the run's cells)."""

    preset: str = "geneformer"
    size: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    start: str | None = None


@dataclass
class OptimConfig:
    """AdamW, warmup + cosine schedule, micro-batches of ``max_tokens`` (padded) tokens."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 1_000
    max_steps: int = 100_000
    min_lr_ratio: float = 0.1
    max_tokens: int = 16_384
    grad_clip: float | None = 1.0
    accumulate_grad_batches: int = 1
    mask_prob: float = 0.15
    generative: bool = False
    mvc_weight: float = 1.0


@dataclass
class ObjectivesConfig:
    """What the loss is made of: each objective's weight (0: off).

    ``token``: the family's own objective (``mlm``, ``bin``, ``value`` or ``depth_value``,
    on ``optim.mask_prob`` of the tokens; scGPT's MVC term keeps ``optim.mvc_weight``);
    with weight 0 nothing is masked. ``reconstruction``: the bottleneck head predicting
    log1p counts per 10,000 of ``panel_size`` highly variable genes from the cell
    embedding. ``contrastive``: InfoNCE between two gene subsets of each cell (each gene
    kept with probability ``view_keep``) at ``temperature``. See
    :mod:`sclcm.train._cell_objectives`.
    """

    token: float = 1.0
    reconstruction: float = 0.0
    contrastive: float = 0.0
    panel_size: int = 2_000
    temperature: float = 0.1
    view_keep: float = 0.5


@dataclass
class TrainerConfig:
    """Lightning ``Trainer`` settings; ``precision: auto`` is bf16-mixed on a GPU, else 32."""

    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    activation_checkpointing: bool = False
    val_every: int = 1_000
    checkpoint_every: int = 1_000
    log_every: int = 50
    seed: int = 0
    resume: str | None = None


@dataclass
class PretrainConfig:
    """A whole pretraining run (see :func:`load_config` and ``docs/pretraining.md``)."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    out_dir: str = "sclcm_pretrain"
    name: str | None = None
    source: str | None = None  # the file read (set by load_config)

    @property
    def family(self) -> str:
        return self.tokenizer.family or self.model.preset

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading ------------------------------------------------------------------------
def load_config(config: str | Path | dict | PretrainConfig, *,
                overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """Read and check a pretraining configuration.

    Parameters
    ----------
    config
        A YAML file, the name of a shipped preset (``geneformer``, ``scgpt``, ``scbert``,
        ``scfoundation``), a dict of the same shape, or a :class:`PretrainConfig`.
    overrides
        Dotted keys set after reading, e.g. ``{"optim.max_steps": 100}``.

    Raises
    ------
    ConfigError
        An unknown key (with the closest known one), a value of the wrong type or not among
        a key's valid names (listed), ``model.overrides`` that make no valid model, or no
        data; a :class:`~sclcm.InputError`.

    Examples
    --------
    >>> cfg = load_config({"data": {"h5ad": ["cells.h5ad"]}, "model": {"size": "tiny"}},
    ...                   overrides={"optim.lr": "3e-4"})
    >>> cfg.model.preset, cfg.optim.lr
    ('geneformer', 0.0003)
    """
    if isinstance(config, PretrainConfig):
        raw, source = config.to_dict(), config.source
        raw.pop("source", None)
    elif isinstance(config, dict):
        raw, source = dict(config), None
    else:
        path = _config_path(config)
        raw, source = read_sections(path), str(path)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    cfg = _build(PretrainConfig, raw, "")
    cfg.source = source
    _check(cfg)
    return cfg


def read_sections(path: Path) -> dict:
    """A YAML config file's mapping of sections (also read by ``sclcm finetune``)."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        msg = f"{path} is not valid YAML: {e}"
        raise ConfigError(msg) from None
    if not isinstance(raw, dict):
        msg = f"{path} must hold a mapping of sections (data, model, optim, ...)."
        raise ConfigError(msg)
    return raw


def _config_path(config: str | Path) -> Path:
    path = Path(config)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{config}.yaml"
    if isinstance(config, str) and "/" not in config and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    msg = f"No config file {config!r}; give a YAML path or one of the shipped presets {names}."
    raise ConfigError(msg)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            msg = f"Cannot set {key!r}: {p!r} is not a section."
            raise ConfigError(msg)
    node[last] = value


def _build(cls: type, raw: Any, where: str) -> Any:
    """``cls`` from a dict, checking keys and coercing the YAML scalars (``1e-4`` is a
    string to YAML 1.1) to the annotated types."""
    name = where.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        msg = f"{name} must be a mapping, not {type(raw).__name__} {raw!r}."
        raise ConfigError(msg)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        named = ", ".join(where + k + did_you_mean(k, fields) for k in unknown)
        msg = (f"Unknown key{'s' * (len(unknown) > 1)} {named} in {name}; known keys: "
               f"{', '.join(fields)}.")
        raise ConfigError(msg)
    hints = get_type_hints(cls)
    kwargs = {k: _coerce(hints[k], v, where + k) for k, v in raw.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    args = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), Any)
    if value is None:
        if optional or base is Any:
            return None
        msg = f"{key} cannot be empty (null)."
        raise ConfigError(msg)
    if dataclasses.is_dataclass(base):
        return _build(base, value, key + ".")
    origin = get_origin(base) or base
    ok = {bool: isinstance(value, bool),
          int: not isinstance(value, bool | dict | list),
          float: not isinstance(value, bool | dict | list),
          str: not isinstance(value, dict | list),
          dict: isinstance(value, dict)}.get(origin, True)
    try:
        if not ok:
            raise TypeError
        if origin is int:
            if float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if origin in (float, str, dict):
            return origin(value)
        if origin is list:
            return list(value) if isinstance(value, list | tuple) else [value]
    except (TypeError, ValueError):
        kind = getattr(base, "__name__", str(base)) + (" or null" if optional else "")
        msg = f"{key} must be {kind}, not {value!r}."
        raise ConfigError(msg) from None
    return value


def _check(cfg: PretrainConfig) -> None:
    d = cfg.data
    if not d.h5ad and d.census is None:
        msg = ("The config names no data: set data.h5ad (a list of .h5ad files of raw counts) "
               "or data.census (uri: a local Census, or census_version; and organism).")
        raise ConfigError(msg)
    if d.h5ad and d.census is not None:
        msg = "Set either data.h5ad or data.census, not both."
        raise ConfigError(msg)
    if d.census is not None and (d.census.uri is None) == (d.census.census_version is None):
        msg = "data.census needs exactly one of uri (a local Census) and census_version."
        raise ConfigError(msg)
    if d.census is not None and (d.held_out_fraction or d.held_out_files):
        msg = ("A Census run holds out cells by data.held_out_filter (an obs filter, e.g. "
               "\"dataset_id in ['...']\": whole datasets, so that no donor is on both "
               "sides); held_out_fraction and held_out_files are for .h5ad data.")
        raise ConfigError(msg)
    if d.held_out_files and d.held_out_fraction:
        msg = "Set data.held_out_files or data.held_out_fraction, not both."
        raise ConfigError(msg)
    if d.held_out_filter and d.census is None:
        msg = "data.held_out_filter is a Census obs filter; for .h5ad data use held_out_files."
        raise ConfigError(msg)
    if d.held_out_fraction is not None and not 0 <= d.held_out_fraction < 1:
        msg = f"data.held_out_fraction must be in [0, 1), not {d.held_out_fraction}."
        raise ConfigError(msg)
    _check_choices(cfg)
    if cfg.family != cfg.model.preset:
        msg = (f"tokenizer.family {cfg.family!r} cannot feed a {cfg.model.preset!r} model; "
               "leave tokenizer.family out to use the preset's.")
        raise ConfigError(msg)
    _check_tokenizer_options(cfg)
    _check_model(cfg)
    _check_vocab(cfg)
    _check_start(cfg)
    positive = {"optim.max_steps": cfg.optim.max_steps, "optim.max_tokens": cfg.optim.max_tokens,
                "data.block_size": cfg.data.block_size, "data.stats_cells": d.stats_cells,
                "optim.accumulate_grad_batches": cfg.optim.accumulate_grad_batches}
    for key, value in positive.items():
        if value < 1:
            msg = f"{key} must be positive, not {value}."
            raise ConfigError(msg)
    ob = cfg.objectives
    weights = {"objectives.token": ob.token, "objectives.reconstruction": ob.reconstruction,
               "objectives.contrastive": ob.contrastive}
    for key, value in weights.items():
        if value < 0:
            msg = f"{key} must be a weight >= 0, not {value}."
            raise ConfigError(msg)
    if not any(weights.values()):
        msg = ("Every objective has weight 0: set objectives.token, objectives.reconstruction "
               "or objectives.contrastive above 0.")
        raise ConfigError(msg)
    if ob.reconstruction and ob.panel_size < 1:
        msg = f"objectives.panel_size must be positive, not {ob.panel_size}."
        raise ConfigError(msg)
    if ob.contrastive and not (0 < ob.view_keep < 1 and ob.temperature > 0):
        msg = ("objectives.view_keep must lie in (0, 1) and objectives.temperature be > 0, not "
               f"{ob.view_keep} and {ob.temperature}.")
        raise ConfigError(msg)
    if len(cfg.optim.betas) != 2:
        msg = f"optim.betas must be two numbers, not {cfg.optim.betas}."
        raise ConfigError(msg)


def _check_start(cfg: PretrainConfig) -> None:
    """``model.start`` brings its own architecture, vocabulary and tokenizer: the keys that
    would make others must be left out."""
    if cfg.model.start is None:
        return
    defaults = PretrainConfig()
    set_keys = [key for key, (value, default) in {
        "model.overrides": (cfg.model.overrides, {}),
        "vocab.path": (cfg.vocab.path, None),
        "tokenizer.options": (cfg.tokenizer.options, {}),
        "tokenizer.family": (cfg.tokenizer.family, None),
        "model.size": (cfg.model.size, defaults.model.size)}.items() if value != default]
    if set_keys:
        msg = (f"model.start continues {cfg.model.start!r} with its own architecture, "
               f"vocabulary and tokenizer: leave out {', '.join(set_keys)}.")
        raise ConfigError(msg)


def _check_choices(cfg: PretrainConfig) -> None:
    """Each key that takes one of a few names (Lightning's, for the trainer's) has one."""
    choices = {"model.preset": (cfg.model.preset, FAMILIES),
               "model.size": (cfg.model.size, SIZES),
               "tokenizer.family": (cfg.family, FAMILIES),
               "tokenizer.medians": (cfg.tokenizer.medians, ("histogram", "exact")),
               "data.orthologs": (cfg.data.orthologs, ORTHOLOG_RULES),
               **_trainer_choices(cfg.trainer)}
    for key, (value, valid) in choices.items():
        problem = choice_problem(key, value, valid)
        if problem:
            raise ConfigError(problem + ".")


def _trainer_choices(t: TrainerConfig) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``trainer.accelerator``, ``.strategy`` and ``.precision`` with the names Lightning
    takes (from its registries, so that they follow its version) and ``auto``."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    out = {"trainer.accelerator": (t.accelerator, (
               "auto", "cpu", "gpu", *sorted(set(AcceleratorRegistry.available_accelerators())
                                            - {"cpu"}))),
           "trainer.strategy": (t.strategy, ("auto", *StrategyRegistry.available_strategies()))}
    try:  # Lightning's own list of precision names is private: use it where it is found
        from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
    except ImportError:
        return out
    out["trainer.precision"] = (t.precision, ("auto", *get_args(_PRECISION_INPUT_STR),
                                              *get_args(_PRECISION_INPUT_STR_ALIAS)))
    return out


#: ModelConfig fields a run sets itself, and from what.
_RUN_SET_FIELDS = {"tokenizer": "model.preset", "recon_panel": "objectives.reconstruction",
                   **dict.fromkeys(("vocab_size", "n_special_tokens", "pad_id", "mask_id",
                                    "cls_id"), "the vocabulary (vocab.*)")}


def _check_model(cfg: PretrainConfig) -> None:
    """``model.overrides``: ``ModelConfig`` fields, none the run sets itself, that make a
    valid model with the preset (built here, without weights, to check)."""
    from ..models._config import ModelConfig, unknown_fields

    m, hints = cfg.model, get_type_hints(ModelConfig)
    problems = unknown_fields(m.overrides)
    problems += [f"{k!r} is set by {_RUN_SET_FIELDS[k]}; remove it" for k in m.overrides
                 if k in _RUN_SET_FIELDS]
    if problems:
        msg = f"model.overrides: {'; '.join(problems)}."
        raise ConfigError(msg)
    # YAML 1.1 reads 1e-5 as a string: coerced to each field's type, as the sections are
    m.overrides = {k: _coerce(hints[k], v, f"model.overrides.{k}")
                   for k, v in m.overrides.items()}
    try:
        ModelConfig.preset(m.preset, m.size, **m.overrides)
    except InputError as e:
        msg = (f"model.overrides do not make a valid {m.preset} {m.size} model: "
               f"{str(e).removeprefix('Invalid ModelConfig: ')}")
        raise ConfigError(msg) from None


def _check_tokenizer_options(cfg: PretrainConfig) -> None:
    """``tokenizer.options``: keywords the family's tokenizer takes (the vocabulary and, for
    Geneformer, the medians come from the run)."""
    import inspect

    from ..tokenizers import (
        GeneformerTokenizer,
        ScBERTTokenizer,
        ScFoundationTokenizer,
        ScGPTTokenizer,
    )

    cls = {"geneformer": GeneformerTokenizer, "scgpt": ScGPTTokenizer,
           "scbert": ScBERTTokenizer, "scfoundation": ScFoundationTokenizer}[cfg.family]
    params = inspect.signature(cls).parameters
    known = [k for k, p in params.items() if k not in ("vocab", "medians")
             and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = [k for k in cfg.tokenizer.options if k not in known]
    if unknown:
        named = ", ".join(f"{k!r}{did_you_mean(k, known)}" for k in unknown)
        msg = (f"tokenizer.options: {cls.__name__} takes no option {named}; its options: "
               f"{', '.join(known)}.")
        raise ConfigError(msg)


def _check_vocab(cfg: PretrainConfig) -> None:
    """``vocab.species`` and ``vocab.biotypes`` name a shipped reference and its biotypes."""
    if cfg.vocab.path is not None:
        return
    from ..genes import gene_table
    from ..genes._reference import canonical_species

    try:
        canonical_species(cfg.vocab.species)
    except ValueError as e:
        raise ConfigError(f"vocab.species: {e}") from None
    biotypes = sorted(set(gene_table(cfg.vocab.species).biotype))
    for biotype in cfg.vocab.biotypes or ():
        problem = choice_problem("vocab.biotypes", biotype, biotypes)
        if problem:
            msg = problem.replace(" must be one of", " entries must be among", 1) + "."
            raise ConfigError(msg)


# --- paths --------------------------------------------------------------------------
def expand(value: str, *, key: str) -> str:
    """``value`` with environment variables expanded; an unset one is an error.

    >>> os.environ["SCLCM_EXAMPLE"] = "/data"
    >>> expand("${SCLCM_EXAMPLE}/pbmc.h5ad", key="data.h5ad")
    '/data/pbmc.h5ad'
    """
    out = os.path.expandvars(os.path.expanduser(value))
    unset = re.findall(r"\$\{?(\w+)", out)
    if unset:
        msg = (f"{key}: {value!r} uses the environment variable {unset[0]}, which is not set "
               "(e.g. export SCLCM_DATA=/path/to/data).")
        raise ConfigError(msg)
    return out


def data_paths(cfg: PretrainConfig, values: list[str], *, key: str) -> list[Path]:
    """Files named by ``values``: variables expanded, globs matched (sorted), relative paths
    taken from the config file's folder; a missing file is an error."""
    base = Path(cfg.source).parent if cfg.source else Path.cwd()
    out: list[Path] = []
    for value in values:
        path = Path(expand(value, key=key))
        path = path if path.is_absolute() else base / path
        matches = sorted(Path(p) for p in glob.glob(str(path))) if glob.has_magic(str(path)) \
            else [path] if path.exists() else []
        if not matches:
            msg = f"{key}: no file {path} (from {value!r})."
            raise ConfigError(msg)
        out.extend(matches)
    return out
