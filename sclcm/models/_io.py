"""Model directories: ``config.json`` + ``model.safetensors`` + ``vocab.json`` + tokenizer.

Nothing here unpickles: weights are safetensors, everything else JSON (the tokenizer's own
``save`` writes JSON and ``.npy``). ``config.json`` records a SHA-256 of every other file,
so a modified or truncated file is refused on load rather than silently used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..genes import GeneVocab
from ._config import ModelConfig, check_vocab

if TYPE_CHECKING:
    from ._model import CellModel

FORMAT = "sclcm.CellModel"
FORMAT_VERSION = 1
CONFIG, WEIGHTS, VOCAB, TOKENIZER = "config.json", "model.safetensors", "vocab.json", "tokenizer"


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
              metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    vocab.save(directory / VOCAB)
    files = [WEIGHTS, VOCAB]
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER)
        files += sorted(p.relative_to(directory).as_posix() for p in
                        (directory / TOKENIZER).rglob("*") if p.is_file())
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "sclcm_version": __version__,
            "config": model.config.to_dict(),
            "tokenizer": TOKENIZER if tokenizer is not None else None,
            "weights_dtype": names[store] if store is not None else None,
            "sha256": {f: _sha256(directory / f) for f in files}}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2))


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    if not path.is_file():
        msg = f"{directory} is not a sclcm model directory: {CONFIG} is missing."
        raise FileNotFoundError(msg)
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        msg = (f"{path} is not a sclcm model config (format {meta.get('format')!r}); for a "
               "Hugging Face Geneformer checkpoint use sclcm.models.import_geneformer.")
        raise ValueError(msg)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        msg = (f"{path} has format version {meta['format_version']}, newer than this sclcm "
               f"reads ({FORMAT_VERSION}); upgrade sclcm.")
        raise ValueError(msg)
    for name, digest in meta.get("sha256", {}).items():
        if not (directory / name).is_file():
            msg = f"{directory / name} is missing from the model directory."
            raise FileNotFoundError(msg)
        if _sha256(directory / name) != digest:
            msg = (f"{directory / name} does not match the checksum recorded in {CONFIG}: the "
                   "file was modified or corrupted after saving; refusing to load it.")
            raise ValueError(msg)
    if WEIGHTS not in meta.get("sha256", {}):
        msg = f"{path} records no checksum for {WEIGHTS}; refusing to load unverified weights."
        raise ValueError(msg)
    return meta


def load_pretrained(cls: type[CellModel], directory: str | Path, *,
                    device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> CellModel:
    directory = Path(directory)
    meta = read_meta(directory)
    config = ModelConfig.from_dict(meta["config"])
    vocab = GeneVocab.load(directory / VOCAB)
    check_vocab(config, vocab)
    try:
        tensors = load_file(directory / WEIGHTS)
    except SafetensorError as e:
        msg = f"{directory / WEIGHTS} is not a readable safetensors file: {e}"
        raise ValueError(msg) from None
    if meta.get("weights_dtype") not in (None, "float32"):  # stored compactly: compute in fp32
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    with torch.device("meta"):  # no time spent on a random init that is overwritten
        model = cls(config, vocab=vocab)
    load_state(model, tensors, source=str(directory / WEIGHTS))
    if meta.get("tokenizer"):
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
        raise ValueError(msg)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
