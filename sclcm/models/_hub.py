"""Published models by name: files from the Hugging Face hub cache, checked, converted once.

``load(name)`` takes the files of a registry entry (:mod:`._published`) at its pinned
commit through ``huggingface_hub`` (its cache, its offline mode), checks each file's
SHA-256, converts them with the entry's importer and keeps the converted sclcm model
beside the hub cache (``<hub cache>/../sclcm-converted``), keyed by the SHA-256 of the
sources, so that a second call converts nothing and a changed source is converted anew.

Offline (``HF_HUB_OFFLINE=1``, read at each call, or ``local_files_only=True``) uses what
is cached and never deletes it; a missing file is named with the command that fetches it.
A file whose SHA-256 differs from the pin is refused, and left where it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import logging as logg
from .._checks import InputError
from ._io import _sha256
from ._published import PublishedModel, published_model

if TYPE_CHECKING:
    import torch

    from ._model import CellModel

#: Bumped when a conversion would give another result for the same files.
CONVERTER_VERSION = 2  # 2: scFoundation with its Performer decoder
CONVERTED = "sclcm-converted"
SOURCE = "source.json"
#: The key of the model last converted for a name (off-hub models load by name after one
#: ``load(name, directory=...)``).
LAST = "last"


def _offline(*, local_files_only: bool) -> bool:
    # read at each call: huggingface_hub reads HF_HUB_OFFLINE once, at its import
    return local_files_only or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE")


def hub_cache(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face hub cache: ``cache_dir``, ``$HF_HUB_CACHE`` (read now), or
    ``huggingface_hub``'s default."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def load(name: str, *, revision: str | None = None, directory: str | Path | None = None,
         device: str | torch.device | None = None, cache_dir: str | Path | None = None,
         local_files_only: bool = False, force_download: bool = False) -> CellModel:
    """A published model by name, from the hub cache, converted once.

    Parameters
    ----------
    name
        A name of :func:`published` (``"geneformer-v2-104m"``, ``"scgpt-human"``) or
        ``"hf://org/repo"`` (``"hf://org/repo@commit"``) for a checkpoint of one's own: a
        ``save_pretrained`` directory, or Geneformer's or scGPT's files.
    revision
        The commit to take an unpinned entry's files at (then their SHA-256 are recorded
        with the converted model and checked on every later load).
    directory
        The files of a model that is not on the hub (the entry's ``manual`` says where to
        get them), or a local copy of one that is.
    device
        Where to put the model.
    cache_dir
        The hub cache; default ``$HF_HUB_CACHE`` or ``huggingface_hub``'s.
    local_files_only
        Use only cached files (as ``HF_HUB_OFFLINE=1``).
    force_download
        Download the files again (after a refused, tampered file).

    Returns
    -------
    The :class:`~sclcm.models.CellModel` with its tokenizer.

    Raises
    ------
    ~sclcm.InputError
        An unknown name (naming the closest), a file whose SHA-256 differs from the pin, an
        unpinned entry without ``revision``.
    FileNotFoundError
        Offline, a file that is not cached (naming it and the command that fetches it).
    """
    from ._model import CellModel

    return CellModel.from_pretrained(
        resolve(name, revision=revision, directory=directory, cache_dir=cache_dir,
                local_files_only=local_files_only, force_download=force_download),
        device=device)


def resolve(name: str, *, revision: str | None = None, directory: str | Path | None = None,
            cache_dir: str | Path | None = None, local_files_only: bool = False,
            force_download: bool = False) -> Path:
    """The directory of the converted sclcm model of ``name`` (see :func:`load`)."""
    cache = hub_cache(cache_dir)
    if name.startswith("hf://"):
        entry, files = _own_checkpoint(name, cache, local_files_only=local_files_only,
                                       force_download=force_download)
        if entry.importer == "sclcm":
            return files.root  # a sclcm directory: its config.json checks every file
    else:
        entry = published_model(name)
        if entry.repo_id is None and directory is None:
            last = _last_converted(entry, cache)
            if last is not None:  # the files given before, converted then
                return last
        files = _entry_files(entry, revision=revision, directory=directory, cache=cache,
                             local_files_only=local_files_only, force_download=force_download)
    return _converted(entry, files, cache)


class _Files:
    """Local files of one checkpoint: ``root`` and each repository path's SHA-256."""

    def __init__(self, root: Path, sha256: dict[str, str], revision: str | None,
                 local: dict[str, Path] | None = None) -> None:
        self.root, self.sha256, self.revision = root, sha256, revision
        self.local = local or {}  # repository path -> local file


def _entry_files(entry: PublishedModel, *, revision: str | None,
                 directory: str | Path | None, cache: Path, local_files_only: bool,
                 force_download: bool) -> _Files:
    if directory is not None:  # the user's copy: checked against the pins as downloads are
        root = Path(directory).expanduser()
        local = {p: _local_file(root, p, entry) for p in entry.sha256}
        return _Files(root, _checked(entry, local), None, local)
    if entry.repo_id is None:
        msg = (f"{entry.name!r} is not on the Hugging Face hub: {entry.manual}. Or import the "
               f"files directly: sclcm.models.import_{entry.importer}(...).")
        raise InputError(msg)
    if revision is None:
        revision = entry.revision
    if revision is None:
        msg = (f"{entry.name!r} is listed but not pinned in this sclcm (no commit and SHA-256 "
               f"recorded for {entry.repo_id}). Pass revision='<commit>' (40 hex digits, from "
               f"https://huggingface.co/{entry.repo_id}/commits/main) to take the files at that "
               "commit: their SHA-256 are then recorded with the converted model and checked "
               "on every later load. (Pinning the registry takes network: "
               "scripts/pin_published.py --write, see docs/models.md.)")
        raise InputError(msg)
    if entry.revision is not None and revision != entry.revision:
        msg = (f"{entry.name!r} is pinned at {entry.revision}; revision={revision!r} would "
               f"take other files. Use hf://{entry.repo_id}@{revision} for another commit.")
        raise InputError(msg)
    local = {p: _download(entry.repo_id, p, revision, cache, name=entry.name,
                          local_files_only=local_files_only, force_download=force_download)
             for p in entry.sha256}
    first = next(iter(entry.sha256))
    root = local[first]
    for _ in Path(first).parts:
        root = root.parent
    return _Files(root, _checked(entry, local), revision, local)


def _local_file(root: Path, path: str, entry: PublishedModel) -> Path:
    candidates = [root / path, root / Path(path).name]  # the repo layout, or all in one folder
    for c in candidates:
        if c.is_file():
            return c
    msg = f"{root} lacks {path}, a file of {entry.name!r}" + (
        f" ({entry.manual})" if entry.manual else "") + "."
    raise FileNotFoundError(msg)


def _download(repo_id: str, path: str, revision: str | None, cache: Path, *, name: str,
              local_files_only: bool, force_download: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = _offline(local_files_only=local_files_only)
    try:
        return Path(hf_hub_download(repo_id, path, revision=revision, cache_dir=cache,
                                    local_files_only=offline, force_download=force_download))
    except LocalEntryNotFoundError:
        fetch = (f"hf download {repo_id} {path}" + (f" --revision {revision}" if revision else "")
                 + f" --cache-dir {cache}")
        why = ("offline mode (HF_HUB_OFFLINE=1 or local_files_only=True) forbids downloading it"
               if offline else "the hub could not be reached")
        msg = (f"{path} of {name!r} ({repo_id}" + (f" at {revision}" if revision else "")
               + f") is not in the Hugging Face cache {cache}, and {why}. Fetch it where there "
               f"is network: `{fetch}`, or sclcm.models.load({name!r}) without offline mode.")
        raise FileNotFoundError(msg) from None


def _checked(entry: PublishedModel, local: dict[str, Path]) -> dict[str, str]:
    """Each file's SHA-256, refusing any that differs from the entry's pin."""
    digests = {p: _sha256(f) for p, f in local.items()}
    bad = [p for p, want in entry.sha256.items() if want is not None and digests[p] != want]
    if bad:
        lines = "; ".join(f"{local[p]} has SHA-256 {digests[p]}, the registry pins "
                          f"{entry.sha256[p]}" for p in bad)
        msg = (f"Refusing {entry.name!r}: {lines}. The file was modified or corrupted after "
               "download (it is left where it is): delete it, or call "
               f"sclcm.models.load({entry.name!r}, force_download=True).")
        raise InputError(msg)
    return digests


def _own_checkpoint(name: str, cache: Path, *, local_files_only: bool,
                    force_download: bool) -> tuple[PublishedModel, _Files]:
    """A user's repository (``hf://org/repo[@commit]``): its whole snapshot, any layout."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, revision = name.removeprefix("hf://").partition("@")
    if repo.count("/") != 1:
        msg = f"{name!r} must read hf://org/repo or hf://org/repo@commit."
        raise InputError(msg)
    offline = _offline(local_files_only=local_files_only)
    try:
        root = Path(snapshot_download(repo, revision=revision or None, cache_dir=cache,
                                      local_files_only=offline, force_download=force_download))
    except LocalEntryNotFoundError:
        msg = (f"{repo} is not in the Hugging Face cache {cache}" + (
            " and offline mode (HF_HUB_OFFLINE=1) forbids downloading it" if offline else "")
            + f". Fetch it where there is network: `hf download {repo}"
            + (f" --revision {revision}" if revision else "") + f" --cache-dir {cache}`.")
        raise FileNotFoundError(msg) from None
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    importer = _layout(root)
    entry = PublishedModel(name=name, model=repo, family="?", parameters="?", licence="?",
                           source=f"https://huggingface.co/{repo}", importer=importer,
                           repo_id=repo, sha256=dict.fromkeys(files))
    digests = {} if importer == "sclcm" else {p: _sha256(root / p) for p in files}
    return entry, _Files(root, digests, root.name)


def _layout(root: Path) -> str:
    if (root / "best_model.pt").is_file() and (root / "args.json").is_file():
        return "scgpt"
    config = root / "config.json"
    if config.is_file():
        meta = json.loads(config.read_text())
        if isinstance(meta, dict) and meta.get("model_type") == "bert":
            return "geneformer"
        return "sclcm"
    msg = (f"{root} holds neither a sclcm model (config.json), a Geneformer checkpoint "
           "(config.json of a BERT) nor a scGPT one (best_model.pt, args.json, vocab.json).")
    raise InputError(msg)


def _converted(entry: PublishedModel, files: _Files, cache: Path) -> Path:
    """The converted model's directory, converting when no valid one is cached."""
    from ._io import FORMAT_VERSION

    key = hashlib.sha256(json.dumps(
        {"importer": entry.importer, "options": entry.options, "files": files.sha256,
         "file_options": entry.file_options, "converter": CONVERTER_VERSION,
         "format": FORMAT_VERSION}, sort_keys=True).encode()).hexdigest()
    slug = entry.name.removeprefix("hf://").partition("@")[0].replace("/", "--")
    base = cache.parent / CONVERTED / slug
    target = base / key[:16]
    if not entry.pinned and files.revision is not None:
        _trust_on_first_use(entry, files, base)
    if (target / "config.json").is_file():
        logg.info(f"    {entry.name}: converted model from {target}")
        return target
    start = logg.info(f"converting {entry.name} ({entry.importer} checkpoint) to sclcm")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=base))
    try:  # written aside and renamed: a failed conversion leaves nothing behind
        model = _import(entry, files)
        model.save_pretrained(tmp)
        (tmp / SOURCE).write_text(json.dumps(
            {"name": entry.name, "repository": entry.repo_id, "revision": files.revision,
             "importer": entry.importer, "options": entry.options, "sha256": files.sha256,
             "licence": entry.licence, "source": entry.source}, indent=2))
        os.replace(tmp, target)
        (base / LAST).write_text(target.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logg.info(f"    saved to {target}", time=start)
    return target


def _last_converted(entry: PublishedModel, cache: Path) -> Path | None:
    """The model last converted for ``entry``, if it is still there."""
    record = cache.parent / CONVERTED / entry.name / LAST
    if record.is_file():
        target = record.parent / record.read_text().strip()
        if (target / "config.json").is_file():
            logg.info(f"    {entry.name}: converted model from {target}")
            return target
    return None


def _trust_on_first_use(entry: PublishedModel, files: _Files, base: Path) -> None:
    """Files at a commit never change: record their SHA-256 the first time, refuse any
    other later (an unpinned entry has no pin to check them against)."""
    record = base / f"{files.revision}.sha256.json"
    if record.is_file():
        seen = json.loads(record.read_text())
        bad = [p for p, h in files.sha256.items() if p in seen and seen[p] != h]
        if bad:
            msg = (f"Refusing {entry.name!r}: {bad} at commit {files.revision} changed since "
                   f"they were first loaded (SHA-256 recorded in {record}): the cached files "
                   "were modified or corrupted (they are left where they are); delete them, "
                   f"or call sclcm.models.load({entry.name!r}, force_download=True).")
            raise InputError(msg)
        files_seen = {**seen, **files.sha256}
    else:
        files_seen = files.sha256
    base.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(files_seen, indent=2, sort_keys=True))


def _import(entry: PublishedModel, files: _Files) -> Any:
    root = files.root
    inner = [f.parent for p, f in files.local.items()
             if entry.directory and Path(p).parent.as_posix() == entry.directory]
    directory = inner[0] if inner else root / entry.directory
    kwargs = {k: files.local.get(v, root / v) for k, v in entry.file_options.items()}
    if entry.importer == "geneformer":
        from ._geneformer import import_geneformer

        return import_geneformer(directory, **kwargs, **entry.options)
    if entry.importer == "scgpt":
        from ._scgpt import import_scgpt

        return import_scgpt(directory, **entry.options)
    if entry.importer == "scfoundation":
        from ._scfoundation import import_scfoundation

        return import_scfoundation(**kwargs, **entry.options)
    from ._model import CellModel

    return CellModel.from_pretrained(directory)
