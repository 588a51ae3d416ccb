"""ModelConfig: one dataclass describes every sclcm model; presets are data, not subclasses."""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
from dataclasses import dataclass, field
from functools import cache
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin, get_type_hints

import torch

from .._checks import InputError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..genes import GeneVocab

Family = Literal["geneformer", "scgpt", "scbert", "scfoundation"]
FAMILIES = get_args(Family)
SIZES = ("tiny", "small", "base")
VALUE_ENCODERS = ("none", "category", "continuous", "autobin")
OBJECTIVES = ("none", "mlm", "bin", "value", "depth_value")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
ATTN_IMPLEMENTATIONS = ("auto", "flash", "sdpa", "math")
#: The fields that take one of a few strings, and those strings.
CHOICES: dict[str, tuple[str, ...]] = {
    "tokenizer": FAMILIES, "norm": ("pre", "post"), "activation": ACTIVATIONS,
    "value_encoder": VALUE_ENCODERS, "objective": OBJECTIVES, "pooling": ("cls", "mean"),
    "attn_implementation": ATTN_IMPLEMENTATIONS,
    "decoder_attention": ("softmax", "performer")}
# The lowest value of each number field (checked before the consistency checks, so that
# those never meet a string or a negative size). Others: dropout probabilities in [0, 1].
_MINIMUM = {"vocab_size": 0, "n_special_tokens": 0, "pad_id": 0, "mask_id": 0, "cls_id": -1,
            "n_layers": 1, "d_model": 1, "n_heads": 1, "d_ff": 1, "max_position": 0,
            "type_vocab_size": 0, "n_bins": 0, "decoder_layers": 0, "decoder_d_model": 0,
            "decoder_heads": 0, "decoder_d_ff": 0, "decoder_features": 0, "n_classes": 0,
            "value_head_layers": 1, "classifier_layers": 1, "value_clamp": 0,
            "autobin_slope": 0}
_POSITIVE_FLOATS = ("norm_eps", "initializer_range")
_PROBABILITIES = ("dropout", "attn_dropout")


def did_you_mean(value: Any, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``value`` (case ignored), else ``""``.

    >>> did_you_mean("Tiny", ["tiny", "small", "base"])
    " (did you mean 'tiny'?)"
    """
    if not isinstance(value, str):
        return ""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(value.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def choice_problem(key: str, value: Any, choices: Iterable[str]) -> str | None:
    """``None`` when ``value`` is one of ``choices``, else the sentence that says so."""
    choices = tuple(choices)
    if isinstance(value, str) and value in choices:
        return None
    return (f"{key} must be one of {', '.join(map(repr, choices))}, not {value!r}"
            + did_you_mean(value, choices))


# (n_layers, d_model, n_heads, d_ff) per family and size. Published shapes where they exist:
# Geneformer gf-6L-30M (small) and V2-104M (base); scGPT whole-human (base, 12 x 512, 8 heads,
# d_hid 512); scBERT (base, 6 x 200, 10 heads); scFoundation 100M encoder (base, 12 x 768).
# "tiny" is for tests and CI.
_SHAPES = {
    "geneformer": {"tiny": (2, 64, 2, 128), "small": (6, 256, 4, 512),
                   "base": (12, 768, 12, 3072)},
    "scgpt": {"tiny": (2, 64, 2, 64), "small": (6, 256, 4, 256), "base": (12, 512, 8, 512)},
    "scbert": {"tiny": (2, 64, 2, 128), "small": (4, 128, 4, 512), "base": (6, 200, 10, 800)},
    "scfoundation": {"tiny": (2, 64, 2, 128), "small": (6, 256, 4, 1024),
                     "base": (12, 768, 12, 3072)},
}
# scFoundation's lighter decoder (published: 6 x 512, 8 heads).
_DECODER_SHAPES = {"tiny": (1, 32, 2, 64), "small": (2, 128, 4, 512), "base": (6, 512, 8, 2048)}
_FAMILY = {
    "geneformer": dict(value_encoder="none", objective="mlm", norm="post", activation="relu",
                       max_position=4096, type_vocab_size=2, norm_eps=1e-12, dropout=0.02,
                       attn_dropout=0.02, pooling="mean"),
    "scgpt": dict(value_encoder="category", n_bins=51, objective="value", mvc=True, norm="post",
                  activation="relu", dropout=0.2, attn_dropout=0.2, pooling="cls"),
    "scbert": dict(value_encoder="category", n_bins=6, objective="bin", norm="pre",
                   activation="gelu", dropout=0.0, attn_dropout=0.0, pooling="mean"),
    "scfoundation": dict(value_encoder="autobin", n_bins=100, objective="depth_value",
                         depth_tokens=True, norm="pre", activation="gelu", dropout=0.0,
                         attn_dropout=0.0, pooling="mean"),
}


@dataclass
class ModelConfig:
    """Everything that builds a :class:`~sclcm.models.CellModel`; saved as ``config.json``.

    Make one with :meth:`preset`; any field can be overridden.

    Attributes
    ----------
    tokenizer
        The tokenizer family the model reads: ``"geneformer"``, ``"scgpt"``, ``"scbert"``
        or ``"scfoundation"``.
    vocab_size, n_special_tokens, pad_id, mask_id, cls_id
        Taken from the :class:`~sclcm.genes.GeneVocab` (``cls_id`` is -1 when the vocabulary
        has no ``<cls>``); checked against the vocabulary on every load.
    n_layers, d_model, n_heads, d_ff
        Encoder shape.
    norm
        ``"post"`` (BERT, scGPT) or ``"pre"`` (nanoGPT-style) layer norm in the blocks.
    final_norm
        A layer norm after the last block of a post-norm stack too (scFoundation's
        encoder); pre-norm stacks always have one.
    activation
        ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or ``"silu"``.
    max_position
        Learned absolute positions (Geneformer's rank order); 0 for none, where gene order
        means nothing.
    type_vocab_size
        BERT's token-type embedding rows (only row 0 is used); 0 for none.
    embed_norm
        Layer norm over the summed input embeddings (BERT).
    gene_norm
        Layer norm over the gene embedding alone, before the value is added (scGPT's gene
        encoder); the MVC decoder then reads the normed gene embedding, as scGPT's does.
    value_encoder
        ``"none"`` (Geneformer), ``"category"`` (embedding per bin: scGPT, scBERT),
        ``"continuous"`` (MLP on the value: scGPT's continuous mode) or ``"autobin"``
        (scFoundation's auto-discretization).
    autobin_slope
        Negative slope of the leaky ReLU in auto-discretization (scFoundation: 0.1).
    value_clamp
        Values above this enter the value encoder as this (scGPT clamps at 512); 0 for
        no clamp.
    n_bins
        Bins of the category encoder and bin head, or of auto-discretization.
    objective
        Pretraining head: ``"mlm"`` (gene identity over the vocabulary), ``"bin"``
        (bin classification), ``"value"`` (value regression), ``"depth_value"``
        (scFoundation's decoder, read-depth aware) or ``"none"``.
    value_head_layers
        Linear layers of the value head (2; scGPT's expression decoder has 3, scFoundation's
        ``to_final`` 1), leaky ReLU between them.
    mvc
        scGPT's cell-embedding decoder: predicts each gene's value from the cell embedding.
    depth_tokens
        Two read-depth tokens per cell (scFoundation's T and S, from the batch extras).
    decoder_layers, decoder_d_model, decoder_heads, decoder_d_ff
        scFoundation's decoder, run over all (or a sample of) genes.
    decoder_attention
        ``"softmax"`` (blocks as the encoder's) or ``"performer"`` (scFoundation's published
        decoder: pre-norm Performer blocks with random-feature softmax attention, GELU, two
        final layer norms).
    decoder_features
        Random features per head of the Performer decoder (scFoundation's: 266).
    decoder_gene_embedding
        The gene (and read-depth) embeddings are added again to the encoder states that
        enter the decoder, as scFoundation's published model does.
    pooling
        Cell embedding: ``"cls"`` (the first token's state) or ``"mean"`` (over genes).
    n_classes
        Classification head for fine-tuning (0 for none).
    classifier_layers
        Linear layers of the classification head: 1, or scGPT's ``n_layers_cls``
        (linear, ReLU, layer norm before the output layer).
    normalize_embedding
        ``cell_embedding`` is L2-normalised (scGPT's ``embed_data`` convention); the heads
        read the pooled state as it is, as scGPT's do.
    recon_panel
        Token ids of the genes the reconstruction head predicts from the cell embedding
        alone (a bottleneck: log1p of counts per 10,000 over a fixed panel, zeros included;
        see :mod:`sclcm.train`); empty for no head.
    attn_implementation
        ``"auto"`` (flash-attn when installed and the input is CUDA half precision, else
        ``"sdpa"``), ``"flash"``, ``"sdpa"`` or ``"math"`` (the plain reference).
    """

    tokenizer: Family = "geneformer"
    vocab_size: int = 0
    n_special_tokens: int = 4
    pad_id: int = 0
    mask_id: int = 1
    cls_id: int = 2
    n_layers: int = 6
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 512
    norm: Literal["pre", "post"] = "post"
    final_norm: bool = False
    activation: str = "gelu"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attn_dropout: float = 0.0
    max_position: int = 0
    type_vocab_size: int = 0
    embed_norm: bool = True
    gene_norm: bool = False
    value_encoder: str = "none"
    value_clamp: float = 0.0
    autobin_slope: float = 0.01
    n_bins: int = 0
    objective: str = "mlm"
    value_head_layers: int = 2
    tie_word_embeddings: bool = True
    mvc: bool = False
    depth_tokens: bool = False
    decoder_layers: int = 0
    decoder_d_model: int = 0
    decoder_heads: int = 0
    decoder_d_ff: int = 0
    decoder_attention: str = "softmax"
    decoder_features: int = 0
    decoder_gene_embedding: bool = False
    pooling: Literal["cls", "mean"] = "mean"
    n_classes: int = 0
    classifier_layers: int = 1
    normalize_embedding: bool = False
    recon_panel: list[int] = field(default_factory=list)
    initializer_range: float = 0.02
    attn_implementation: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. import source)

    def __post_init__(self) -> None:
        self.validate()

    def _check_types(self) -> None:
        """Raise :class:`~sclcm.InputError` naming every field of the wrong type or out of
        range; numbers of other numeric types (numpy's) become plain ``int`` / ``float``, so
        that the config is JSON."""
        problems = []
        for name, hint in _field_hints().items():
            value, problem = _plain(name, getattr(self, name), hint)
            setattr(self, name, value)
            if problem:
                problems.append(problem)
        if not problems:  # ranges, now that every number is a number
            problems += [f"{k} must be >= {low}, not {getattr(self, k)}"
                         for k, low in _MINIMUM.items() if getattr(self, k) < low]
            problems += [f"{k} must be > 0, not {getattr(self, k)}" for k in _POSITIVE_FLOATS
                         if getattr(self, k) <= 0]
            problems += [f"{k} is a probability: it must lie in [0, 1], not {getattr(self, k)}"
                         for k in _PROBABILITIES if not 0 <= getattr(self, k) <= 1]
        if problems:
            raise InputError("Invalid ModelConfig: " + "; ".join(problems) + ".")

    @classmethod
    def preset(cls, name: Family, size: str = "small", *, vocab: GeneVocab | None = None,
               **overrides: Any) -> ModelConfig:
        """The configuration of a model family at a named size.

        Parameters
        ----------
        name
            ``"geneformer"``, ``"scgpt"``, ``"scbert"`` or ``"scfoundation"``.
        size
            ``"tiny"`` (tests), ``"small"`` or ``"base"``.
        vocab
            Fills ``vocab_size`` and the special-token ids.
        **overrides
            Any field of the config.

        Examples
        --------
        >>> cfg = ModelConfig.preset("geneformer", "small", vocab_size=100)
        >>> cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.norm
        (6, 256, 4, 'post')
        """
        if name not in _SHAPES:
            msg = (f"Unknown preset {name!r}{did_you_mean(name, FAMILIES)}; choose one of "
                   f"{list(FAMILIES)}.")
            raise InputError(msg)
        if size not in SIZES:
            msg = f"Unknown size {size!r}{did_you_mean(size, SIZES)}; choose one of {list(SIZES)}."
            raise InputError(msg)
        n_layers, d_model, n_heads, d_ff = _SHAPES[name][size]
        kw: dict[str, Any] = dict(tokenizer=name, n_layers=n_layers, d_model=d_model,
                                  n_heads=n_heads, d_ff=d_ff, **_FAMILY[name])
        if name == "geneformer" and size == "small":
            kw["max_position"] = 2048  # gf-6L-30M-i2048
        if name == "scfoundation":
            dl, dd, dh, dff = _DECODER_SHAPES[size]
            kw.update(decoder_layers=dl, decoder_d_model=dd, decoder_heads=dh, decoder_d_ff=dff)
        if vocab is not None:
            kw.update(vocab_fields(vocab))
        unknown = unknown_fields(overrides)
        if unknown:
            msg = f"Invalid ModelConfig: {'; '.join(unknown)}."
            raise InputError(msg)
        kw.update(overrides)
        return cls(**kw)

    def validate(self) -> None:
        """Raise :class:`~sclcm.InputError` (a ``ValueError``) naming every field of the wrong
        type or out of range, else every way the fields contradict each other."""
        self._check_types()  # first: the consistency checks need numbers to be numbers
        checks = [
            (self.d_model % self.n_heads == 0,
             f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}"),
            ((self.value_encoder not in ("category", "autobin") and self.objective != "bin")
             or self.n_bins > 0, "n_bins must be > 0 for bins"),
            (self.objective != "depth_value" or self.decoder_layers > 0,
             "objective 'depth_value' needs decoder_layers > 0"),
            (self.decoder_layers == 0 or (self.decoder_heads > 0
                                          and self.decoder_d_model % self.decoder_heads == 0),
             "decoder_d_model must be a multiple of decoder_heads"),
            (self.decoder_attention != "performer" or (self.decoder_layers > 0
                                                        and self.decoder_features > 0),
             "decoder_attention 'performer' needs decoder_layers > 0 and decoder_features > 0"),
            (all(self.n_special_tokens <= g < self.vocab_size for g in self.recon_panel)
             or self.vocab_size == 0,
             "recon_panel must hold gene token ids (n_special_tokens..vocab_size - 1)"),
            (len(set(self.recon_panel)) == len(self.recon_panel),
             "recon_panel must not repeat a gene"),
            (self.pooling != "cls" or self.cls_id >= 0,
             "pooling='cls' needs a <cls> token in the vocabulary (cls_id >= 0)"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise InputError("Invalid ModelConfig: " + "; ".join(problems) + ".")

    # --- JSON ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, defaults: dict[str, Any] | None = None,
                  source: str | None = None) -> ModelConfig:
        """The config that ``d`` (as :meth:`to_dict` wrote it) describes.

        Every field must be present, with its type and in its range: a missing field is not
        taken from the code's defaults, which need not be the ones the model was made with.

        Parameters
        ----------
        d
            Field names to values.
        defaults
            Values of fields ``d`` may lack because it predates them (see
            ``sclcm.models._io.ADDED_FIELDS``).
        source
            Where ``d`` came from (a ``config.json``), for the messages.

        Raises
        ------
        ~sclcm.InputError
            Naming each missing, unknown or invalid field.
        """
        if not isinstance(d, dict):
            msg = (f"{source or 'A model config'} must hold a mapping of config fields, not "
                   f"{type(d).__name__}.")
            raise InputError(msg)
        fields = list(_field_hints())
        d = {**(defaults or {}), **d}
        problems = unknown_fields(d)
        problems += [f"missing field {k!r}" + (f" (one of {', '.join(map(repr, CHOICES[k]))})"
                                              if k in CHOICES else "")
                     for k in fields if k not in d]
        if not problems:
            try:
                return cls(**d)
            except InputError as e:
                problems.append(str(e).removeprefix("Invalid ModelConfig: ").rstrip("."))
        where = f"Invalid model config in {source}: " if source else "Invalid ModelConfig: "
        fix = ("as save_pretrained writes them: restore the file as it was saved, or correct "
               "the field(s) named" if source else "as to_dict writes them")
        msg = f"{where}{'; '.join(problems)}. Every field must be present and valid, {fix}."
        raise InputError(msg)


def _integer(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _plain(name: str, value: Any, hint: Any) -> tuple[Any, str | None]:
    """``value`` as the plain type of ``hint`` and ``None``, or ``value`` and what is wrong
    with it."""
    if name in CHOICES:
        return value, choice_problem(name, value, CHOICES[name])
    origin = get_origin(hint) or hint
    if (origin is bool and isinstance(value, bool)) or (origin is dict
                                                         and isinstance(value, dict)):
        return value, None
    if origin is int and _integer(value):
        return int(value), None
    number = _integer(value) or (isinstance(value, Real) and not isinstance(value, bool))
    if origin is float and number and math.isfinite(value):
        return float(value), None
    if origin is list and isinstance(value, list | tuple) and all(map(_integer, value)):
        return [int(v) for v in value], None
    kind = {bool: "true or false", int: "an integer", float: "a finite number",
            list: "a list of integers", dict: "a mapping"}[origin]
    return value, f"{name} must be {kind}, not {reprlib.repr(value)} ({type(value).__name__})"


def unknown_fields(names: Iterable[str]) -> list[str]:
    """``"unknown field 'x' (did you mean 'y'?)"`` for each name that is not a field."""
    fields = list(_field_hints())
    return [f"unknown field {k!r}" + (did_you_mean(k, fields)
                                      or f" (known fields: {', '.join(fields)})")
            for k in names if k not in fields]


@cache
def _field_hints() -> dict[str, Any]:
    """Each field's type (resolved once: the annotations are strings)."""
    hints = get_type_hints(ModelConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(ModelConfig)}


def vocab_fields(vocab: GeneVocab) -> dict[str, int]:
    """The config fields a vocabulary determines."""
    return dict(vocab_size=len(vocab), n_special_tokens=len(vocab.special_tokens),
                pad_id=vocab.pad_id, mask_id=vocab.mask_id,
                cls_id=vocab.cls_id if "<cls>" in vocab else -1)


def check_vocab(config: ModelConfig, vocab: GeneVocab) -> None:
    """Raise :class:`~sclcm.InputError` when ``vocab`` is not the vocabulary ``config`` was
    built for."""
    want, got = vocab_fields(vocab), {k: getattr(config, k) for k in vocab_fields(vocab)}
    if want != got:
        diff = {k: (got[k], want[k]) for k in want if want[k] != got[k]}
        msg = (f"The vocabulary does not fit the model: (model, vocabulary) differ in {diff}. "
               "Use the vocabulary saved with the model (model.vocab), or build the config "
               "with ModelConfig.preset(..., vocab=vocab).")
        raise InputError(msg)


def check_inputs(config: ModelConfig, gene_ids: torch.Tensor, offsets: torch.Tensor,
                 values: torch.Tensor | None, masked: torch.Tensor | None,
                 depth: torch.Tensor | None, *, needs_values: bool) -> None:
    """Raise ``ValueError`` naming every way the packed input does not fit the model."""
    T, problems = len(gene_ids), []
    if offsets.ndim != 1 or len(offsets) < 1 or int(offsets[0]) != 0 or \
            int(offsets[-1]) != T or bool((offsets.diff() < 0).any()):
        problems.append(f"offsets must rise from 0 to the number of tokens ({T})")
    if T and (int(gene_ids.min()) < 0 or int(gene_ids.max()) >= config.vocab_size):
        problems.append(f"gene_ids must lie in 0..{config.vocab_size - 1} (the vocabulary); "
                        "was the input tokenized with this model's vocabulary?")
    if needs_values and (values is None or values.shape != gene_ids.shape):
        problems.append(f"values (one per token) are required by value_encoder="
                        f"{config.value_encoder!r}")
    if masked is not None and (masked.dtype != torch.bool or masked.shape != gene_ids.shape):
        problems.append("masked must be a bool tensor with one flag per token")
    if config.depth_tokens and (depth is None or tuple(depth.shape) != (len(offsets) - 1, 2)):
        problems.append("depth (n_cells x 2: the batch's depth_T and depth_S) is required")
    if problems:
        raise ValueError("Bad model input: " + "; ".join(problems) + ".")
