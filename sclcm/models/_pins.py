"""Pins of the published checkpoints: each hub entry's commit and its files' SHA-256, as data.

The registry (:mod:`._published`) lists what each model needs; ``published_pins.json``
beside this module says at which commit and with which SHA-256, and is read when the
registry is built. ``scripts/pin_published.py`` writes and checks it on a machine that
reaches huggingface.co, from ``HfApi().model_info(repo, revision=..., files_metadata=True)``:
the SHA-256 of an LFS file is the hub's own record (the file is not downloaded); a small
file stored in git is downloaded at that commit, checked against the git blob id the hub
lists, and hashed. This module holds the part that needs no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._config import did_you_mean
from ._io import _sha256

if TYPE_CHECKING:
    from huggingface_hub.hf_api import ModelInfo

    from ._published import PublishedModel

#: The pins shipped with sclcm.
PINS = Path(__file__).with_name("published_pins.json")
FORMAT = 1
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: ``download(repo_id, filename, revision=commit)`` -> local path (``hf_hub_download``).
Download = Callable[..., Any]


@dataclass(frozen=True)
class Pin:
    """A hub entry's files at one commit: repository, commit, repository path -> SHA-256."""

    repo_id: str
    revision: str
    sha256: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision,
                "sha256": dict(sorted(self.sha256.items()))}


def read_pins(path: str | Path = PINS) -> dict[str, Pin]:
    """The pins recorded in ``path`` (a missing file: none), each checked for form."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT \
            or not isinstance(data.get("pins"), dict):
        msg = f"{path} is not a pins file of format {FORMAT} ({{'format': 1, 'pins': {{...}}}})."
        raise ValueError(msg)
    pins, problems = {}, []
    for name, raw in data["pins"].items():
        try:
            pin = Pin(repo_id=raw["repo_id"], revision=raw["revision"], sha256=raw["sha256"])
        except (KeyError, TypeError):
            problems.append(f"{name}: needs repo_id, revision and sha256")
            continue
        bad = [p for p, h in pin.sha256.items() if not _SHA256.fullmatch(str(h))]
        if not _COMMIT.fullmatch(str(pin.revision)):
            problems.append(f"{name}: revision {pin.revision!r} is not a commit (40 hex digits)")
        if bad:
            problems.append(f"{name}: SHA-256 of {bad} not 64 hex digits")
        pins[name] = pin
    if problems:
        msg = f"{path}: " + "; ".join(problems) + ". Rewrite it: scripts/pin_published.py --write."
        raise ValueError(msg)
    return pins


def write_pins(pins: dict[str, Pin], path: str | Path = PINS) -> None:
    """Write ``pins`` to ``path`` (sorted, written aside and renamed)."""
    path = Path(path)
    text = json.dumps({"format": FORMAT, "pins": {n: pins[n].as_json() for n in sorted(pins)}},
                      indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def apply_pins(entries: Iterable[PublishedModel], pins: dict[str, Pin], *,
               source: str | Path = PINS) -> dict[str, PublishedModel]:
    """The entries by name, each hub entry with its pin's commit and SHA-256.

    A pin must match its entry: a known, hub-hosted name, the same repository, no file the
    entry does not list (a file the registry added since stays unpinned, so that entry is
    not ``pinned`` until pinned again).
    """
    out = {e.name: e for e in entries}
    problems = []
    for name, pin in pins.items():
        entry = out.get(name)
        if entry is None or entry.repo_id is None:
            problems.append(f"{name!r} is not a hub entry of the registry"
                            + did_you_mean(name, out))
            continue
        if pin.repo_id != entry.repo_id:
            problems.append(f"{name!r} is pinned in {pin.repo_id}, the registry says "
                            f"{entry.repo_id}")
        stale = sorted(set(pin.sha256) - set(entry.sha256))
        if stale:
            problems.append(f"{name!r} pins {stale}, files the registry no longer lists")
        if not problems:
            out[name] = replace(entry, revision=pin.revision,
                                sha256={p: pin.sha256.get(p) for p in entry.sha256})
    if problems:
        msg = (f"The pins in {source} do not match the registry: " + "; ".join(problems)
               + ". Pin again: scripts/pin_published.py --write.")
        raise ValueError(msg)
    return out


def git_blob_id(path: Path) -> str:
    """The git blob id (SHA-1 of ``blob <size>\\0`` + content) the hub lists for a file."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pin_from_info(entry: PublishedModel, info: ModelInfo, download: Download) -> Pin:
    """The pin of ``entry`` from the hub's record of its repository at one commit.

    Parameters
    ----------
    entry
        A hub entry of the registry (its ``sha256`` keys are the files it needs).
    info
        ``HfApi().model_info(entry.repo_id, revision=..., files_metadata=True)``.
    download
        ``download(repo_id, filename, revision=commit)`` -> local path, for the files that
        are not in LFS (``huggingface_hub.hf_hub_download``).
    """
    if entry.repo_id is None:
        msg = f"{entry.name!r} is not on the hub: there is nothing to pin."
        raise ValueError(msg)
    commit = info.sha
    if info.id != entry.repo_id or not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
        msg = (f"The record for {entry.name!r} is of {info.id} at {commit!r}; it must be of "
               f"{entry.repo_id} at a commit (40 hex digits).")
        raise ValueError(msg)
    siblings = {s.rfilename: s for s in info.siblings or []}
    if not siblings or all(s.blob_id is None for s in siblings.values()):
        msg = (f"The record of {entry.repo_id} lists no file metadata: take it with "
               "model_info(..., files_metadata=True).")
        raise ValueError(msg)
    missing = [p for p in entry.sha256 if p not in siblings]
    if missing:
        lines = "; ".join(f"{p}{did_you_mean(p, siblings)}" for p in missing)
        msg = (f"{entry.repo_id} at {commit} has no {lines}, which {entry.name!r} needs: fix "
               "the registry entry (sclcm/models/_published.py).")
        raise ValueError(msg)
    sha256 = {}
    for path in entry.sha256:
        sibling = siblings[path]
        if sibling.lfs is not None:  # the hub records the content's SHA-256
            sha256[path] = sibling.lfs.sha256
            continue
        local = Path(download(entry.repo_id, path, revision=commit))
        blob = git_blob_id(local)
        if blob != sibling.blob_id:
            msg = (f"{local} is not {path} of {entry.repo_id} at {commit}: git blob {blob}, "
                   f"the hub lists {sibling.blob_id}. Download it again (force_download).")
            raise ValueError(msg)
        sha256[path] = _sha256(local)
    return Pin(entry.repo_id, commit, sha256)


def pin_differences(recorded: Pin, current: Pin) -> list[str]:
    """What differs between a recorded pin and the files at its commit now (``[]``: none)."""
    out = []
    if recorded.repo_id != current.repo_id or recorded.revision != current.revision:
        out.append(f"recorded {recorded.repo_id}@{recorded.revision}, found "
                   f"{current.repo_id}@{current.revision}")
    for path in sorted(set(recorded.sha256) | set(current.sha256)):
        want, got = recorded.sha256.get(path), current.sha256.get(path)
        if want != got:
            out.append(f"{path}: recorded SHA-256 {want}, the hub has {got}")
    return out
