"""Model directories: ``config.json`` + ``model.safetensors`` + ``vocab.json`` + tokenizer.

Nothing here unpickles: weights are safetensors, everything else JSON (the tokenizer's own
``save`` writes JSON and ``.npy``). ``config.json`` records a SHA-256 of every other file,
so a modified or truncated file is refused on load rather than silently used, and (format 2)
``config_sha256``, a SHA-256 of its own entries, so that an edited config is refused too: a
changed field would build another model than the one the weights were trained as.

Every entry and every config field must be present, typed and in range; none is taken from
the code's defaults. The one exception is what a format predates: :data:`ADDED_FIELDS` holds
the entries and config fields added while a format was current, with the value that
reproduces the models written before them. A new field means a new format version (and, for
the versions before it, an entry there).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._checks import InputError
from ..genes import GeneVocab
from ._config import ModelConfig, check_vocab, did_you_mean

if TYPE_CHECKING:
    from ._model import CellModel

FORMAT = "sclcm.CellModel"
#: 2: every config field required, ``config_sha256`` recorded and checked. 3: the options
#: scGPT's architecture needs (``gene_norm``, ``value_clamp``, ``value_head_layers``,
#: ``classifier_layers``, ``normalize_embedding``). 4: scFoundation's (``final_norm``,
#: ``autobin_slope``). 5: scFoundation's Performer decoder (``decoder_attention``,
#: ``decoder_features``, ``decoder_gene_embedding``).
FORMAT_VERSION = 5
#: ``model.safetensors``'s own metadata version: its layout has not changed since format 1
#: (so that re-saving a model at a new format keeps its weights file byte for byte).
WEIGHTS_FORMAT_VERSION = 1
#: Per format version, the top-level entries (``"config.x"``: config fields) that files of
#: that version may lack, with the value that reproduces what such a file meant. The
#: current version has none: a new field comes with a new version.
ADDED_FIELDS: dict[int, dict[str, Any]] = {
    1: {"weights_dtype": None,  # compact weights came later: before, stored as computed
        "config.recon_panel": [],  # the reconstruction head came later: before, none
        "config_sha256": None},  # format 2's
    2: {"config.gene_norm": False, "config.value_clamp": 0.0,  # scGPT's options came later:
        "config.value_head_layers": 2, "config.classifier_layers": 1,  # before, these
        "config.normalize_embedding": False},
    3: {"config.final_norm": False, "config.autobin_slope": 0.01},  # scFoundation's options
    4: {"config.decoder_attention": "softmax", "config.decoder_features": 0,  # its decoder
        "config.decoder_gene_embedding": False},
}
#: The top-level entries of ``config.json``.
ENTRIES = ("format", "format_version", "sclcm_version", "config", "tokenizer", "weights_dtype",
           "sha256", "config_sha256")
CONFIG, WEIGHTS, VOCAB, TOKENIZER = "config.json", "model.safetensors", "vocab.json", "tokenizer"


def added_since(version: int) -> dict[str, Any]:
    """The entries (``"config.<field>"`` for config fields) that files of format ``version``
    may lack, with the values that reproduce the models written before them."""
    return {k: v for old in range(version, FORMAT_VERSION + 1)
            for k, v in ADDED_FIELDS.get(old, {}).items()}


def config_defaults_since(version: int) -> dict[str, Any]:
    """:func:`added_since`, restricted to config fields (without the ``config.`` prefix)."""
    return {k.removeprefix("config."): v for k, v in added_since(version).items()
            if k.startswith("config.")}


def load_weights_only(path: str | Path, what: str, fix: str = "") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers, never code
    from the file; a missing file or a refused pickle raises, naming the file.

    ``what`` names what the file should be ("a plain state dict"); ``fix`` says how to
    make one."""
    path = Path(path)
    if not path.is_file():
        msg = f"{path} is missing."
        raise FileNotFoundError(msg)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = (f"{path} is not {what} that can be read without running code from it "
               f"(torch.load(weights_only=True) refused it: {first}).{' ' + fix if fix else ''}")
        raise InputError(msg) from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that repeat an earlier one (the tied MLM decoder)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


#: Dtypes the weights can be stored in (floating tensors; others keep theirs).
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                  "bfloat16": torch.bfloat16}


def save_pretrained(model: CellModel, directory: str | Path, *, tokenizer: Any = None,
                    dtype: str | torch.dtype | None = None) -> None:
    directory = Path(directory)
    names = {v: k for k, v in STORAGE_DTYPES.items()}
    if dtype is not None and (STORAGE_DTYPES.get(dtype) or dtype) not in names:
        msg = f"dtype must be one of {list(STORAGE_DTYPES)}, not {dtype!r}."
        raise ValueError(msg)
    store = None if dtype is None else STORAGE_DTYPES.get(dtype, dtype)
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is not None:
        model.check_tokenizer(tokenizer)
    vocab = model.vocab if model.vocab is not None else getattr(tokenizer, "vocab", None)
    if vocab is None:
        msg = ("A model directory must hold its vocabulary: build the model with "
               "CellModel(config, vocab=...) or pass the tokenizer.")
        raise ValueError(msg)
    directory.mkdir(parents=True, exist_ok=True)
    skip = tied_names(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
               if k not in skip}
    if store is not None:  # compact storage; load_pretrained casts back to float32
        tensors = {k: v.to(store) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, directory / WEIGHTS,
              metadata={"format": FORMAT, "format_version": str(WEIGHTS_FORMAT_VERSION)})
    vocab.save(directory / VOCAB)
    files = [WEIGHTS, VOCAB]
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER)
        files += sorted(p.relative_to(directory).as_posix() for p in
                        (directory / TOKENIZER).rglob("*") if p.is_file())
    from .. import __version__  # here: sclcm's __init__ may still be importing this module

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "sclcm_version": __version__,
            "config": model.config.to_dict(),
            "tokenizer": TOKENIZER if tokenizer is not None else None,
            "weights_dtype": names[store] if store is not None else None,
            "sha256": {f: _sha256(directory / f) for f in files}}
    meta["config_sha256"] = config_digest(meta)
    (directory / CONFIG).write_text(json.dumps(meta, indent=2))


def config_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of ``config.json``'s entries but the checksums (``sha256``, checked against the
    files themselves, and ``config_sha256``), as canonical JSON: key order and whitespace do
    not count, values do."""
    entries = {k: v for k, v in meta.items() if k not in ("sha256", "config_sha256")}
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_meta(directory: Path) -> tuple[dict[str, Any], ModelConfig]:
    """``config.json``'s entries and the config they hold, each checked: the format, every
    entry and config field (present, typed, in range), ``config_sha256``, the checksum of
    every file; raise :class:`~sclcm.InputError` (``FileNotFoundError`` for a missing file)
    naming what is wrong and what to do."""
    path = directory / CONFIG
    if not path.is_file():
        msg = f"{directory} is not a sclcm model directory: {CONFIG} is missing."
        raise FileNotFoundError(msg)
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        msg = (f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
               "Restore the file as save_pretrained wrote it.")
        raise InputError(msg) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        msg = (f"{path} is not a sclcm model config (format {found!r}); for a Hugging Face "
               "Geneformer checkpoint use sclcm.models.import_geneformer.")
        raise InputError(msg)
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        msg = f"{path}: format_version must be a whole number >= 1, not {version!r}."
        raise InputError(msg)
    if version > FORMAT_VERSION:
        msg = (f"{path} has format version {version}, newer than this sclcm reads "
               f"({FORMAT_VERSION}); upgrade sclcm.")
        raise InputError(msg)
    added = added_since(version)
    meta = {**{k: v for k, v in added.items() if "." not in k}, **meta}
    _check_entries(meta, path, version)
    config = ModelConfig.from_dict(
        meta["config"], source=str(path),
        defaults=config_defaults_since(version))
    if meta["config_sha256"] is not None and meta["config_sha256"] != config_digest(meta):
        msg = (f"{path} was edited after the model was saved: its entries no longer match "
               "the recorded config_sha256, and a changed field would build another model "
               "than the one the weights were trained as. Restore the file as saved; to "
               "change the model, load it, change it in code and save_pretrained a new "
               "directory.")
        raise InputError(msg)
    for name, digest in meta["sha256"].items():
        if not (directory / name).is_file():
            msg = f"{directory / name} is missing from the model directory."
            raise FileNotFoundError(msg)
        if _sha256(directory / name) != digest:
            msg = (f"{directory / name} does not match the checksum recorded in {CONFIG}: the "
                   "file was modified or corrupted after saving; refusing to load it.")
            raise InputError(msg)
    if WEIGHTS not in meta["sha256"]:
        msg = f"{path} records no checksum for {WEIGHTS}; refusing to load unverified weights."
        raise InputError(msg)
    return meta, config


def _check_entries(meta: dict[str, Any], path: Path, version: int) -> None:
    """Raise :class:`~sclcm.InputError` naming each unknown, missing or mistyped top-level
    entry of ``config.json``."""
    problems = [f"unknown entry {k!r}" + did_you_mean(k, ENTRIES) for k in meta
                if k not in ENTRIES]
    problems += [f"missing entry {k!r}" for k in ENTRIES if k not in meta]
    optional_str = (str, type(None))
    kinds = {"sclcm_version": (str, "a string"), "config": (dict, "a mapping"),
             "tokenizer": (optional_str, "a folder name or null"),
             "weights_dtype": (optional_str, f"one of {list(STORAGE_DTYPES)} or null"),
             "sha256": (dict, "a mapping of file names to digests"),
             # format 1 recorded none
             "config_sha256": (str if version >= 2 else optional_str, "a hex digest")}
    for key, (types, kind) in kinds.items():
        if key in meta and not isinstance(meta[key], types):
            problems.append(f"{key} must be {kind}, not {meta[key]!r}")
    dtype = meta.get("weights_dtype")
    if isinstance(dtype, str) and dtype not in STORAGE_DTYPES:
        problems.append(f"weights_dtype must be one of {list(STORAGE_DTYPES)} or null, not "
                        f"{dtype!r}{did_you_mean(dtype, STORAGE_DTYPES)}")
    if isinstance(meta.get("sha256"), dict) and not all(
            isinstance(v, str) for v in meta["sha256"].values()):
        problems.append("sha256 must map file names to hex digests")
    if problems:
        msg = (f"Invalid {path}: " + "; ".join(problems) + ". Restore the file as "
               "save_pretrained wrote it.")
        raise InputError(msg)


def load_pretrained(cls: type[CellModel], directory: str | Path, *,
                    device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> CellModel:
    directory = Path(directory)
    meta, config = read_meta(directory)
    vocab = GeneVocab.load(directory / VOCAB)
    check_vocab(config, vocab)
    try:
        tensors = load_file(directory / WEIGHTS)
    except SafetensorError as e:
        msg = f"{directory / WEIGHTS} is not a readable safetensors file: {e}"
        raise InputError(msg) from None
    if meta["weights_dtype"] not in (None, "float32"):  # stored compactly: compute in fp32
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    with torch.device("meta"):  # no time spent on a random init that is overwritten
        model = cls(config, vocab=vocab)
    load_state(model, tensors, source=str(directory / WEIGHTS))
    if meta["tokenizer"]:
        from ..tokenizers import load_tokenizer

        model.attach_tokenizer(load_tokenizer(directory / meta["tokenizer"]))
    return model.to(device=device, dtype=dtype)


def load_state(model: CellModel, tensors: dict[str, torch.Tensor], *, source: str) -> None:
    """Put ``tensors`` into ``model`` (built on any device), requiring exactly its names and
    shapes; tied parameters are re-tied afterwards."""
    want = {k: v for k, v in model.state_dict().items() if k not in tied_names(model)}
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    bad = sorted(k for k in set(want) & set(tensors) if want[k].shape != tensors[k].shape)
    if missing or extra or bad:
        parts = [f"missing tensors {missing[:8]}" if missing else "",
                 f"unexpected tensors {extra[:8]}" if extra else "",
                 ", ".join(f"{k} has shape {tuple(tensors[k].shape)}, the config says "
                           f"{tuple(want[k].shape)}" for k in bad[:8])]
        msg = (f"{source} does not fit the model its config describes: "
               + "; ".join(p for p in parts if p) + ".")
        raise InputError(msg)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
