"""Pinning the published models (scripts/pin_published.py, sclcm.models._pins), offline.

The hub's record of a repository is a real ``huggingface_hub.hf_api.ModelInfo`` built from
the JSON the hub returns for ``model_info(..., files_metadata=True)``; the small files are
taken by ``hf_hub_download`` from a local cache laid out as huggingface_hub writes it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import hf_hub_download
from huggingface_hub.hf_api import ModelInfo
from test_hub import (
    COMMIT_A,
    COMMIT_B,
    FILES,
    REPO,
    _blob_name,
    add_commit,
    offline_cache,
    scgpt_files,
    tiny_entry,
)
from test_scgpt_import import cells

from sclcm import InputError
from sclcm.models import (
    _pins,
    import_scgpt,
    load,
    published_model,
    register_published,
    unregister_published,
)
from sclcm.models._published import _REGISTRY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
LFS = ("best_model.pt",)  # as .gitattributes puts *.pt in LFS


def git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_record(repo: str, commit: str, files: dict[str, bytes], *,
               files_metadata: bool = True) -> ModelInfo:
    """``model_info(repo, revision=commit, files_metadata=...)`` as the hub answers it."""
    siblings = []
    for path, data in files.items():
        sibling: dict = {"rfilename": path}
        if files_metadata:
            sibling.update(size=len(data), blobId=git_blob(data))
            if path in LFS:  # git holds the pointer; the hub reports the content's SHA-256
                sha = hashlib.sha256(data).hexdigest()
                pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\n"
                           f"size {len(data)}\n").encode()
                sibling.update(blobId=git_blob(pointer), lfs={
                    "size": len(data), "sha256": sha, "pointerSize": len(pointer)})
        siblings.append(sibling)
    return ModelInfo(id=repo, sha=commit, siblings=siblings)


class Hub:
    """The hub's model_info endpoint over recorded commits (the network, not the library)."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, bytes]] = {}
        self.main = ""

    def push(self, commit: str, files: dict[str, bytes]) -> None:
        self.commits[commit], self.main = files, commit

    def model_info(self, repo_id: str, *, revision: str = "main",
                   files_metadata: bool = False) -> ModelInfo:
        commit = self.main if revision == "main" else revision
        return hub_record(repo_id, commit, self.commits[commit],
                          files_metadata=files_metadata)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """An unpinned hub entry (as the shipped ones are), its commit in a local cache."""
    cache, files = offline_cache(tmp_path, monkeypatch)
    entry = tiny_entry("scgpt-tiny-pin")
    register_published(entry)
    hub = Hub()
    hub.push(COMMIT_A, files)
    download = partial(hf_hub_download, cache_dir=cache, local_files_only=True)
    yield cache, entry, files, hub, download
    unregister_published(entry.name)


def snapshot(cache: Path, commit: str) -> Path:
    return cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit


def test_pins_take_lfs_sha256_from_the_record_and_hash_small_files(repo):
    cache, entry, files, hub, download = repo
    weights = snapshot(cache, COMMIT_A) / "best_model.pt"
    weights.resolve().unlink()  # an LFS file is never downloaded to pin it
    weights.unlink()
    pin = _pins.pin_from_info(entry, hub.model_info(REPO, files_metadata=True), download)
    assert pin == _pins.Pin(REPO, COMMIT_A, {f: sha256(d) for f, d in files.items()})


def test_pins_round_trip_and_a_pinned_entry_loads_offline_without_revision(repo, tmp_path):
    cache, entry, _, hub, download = repo
    with pytest.raises(InputError, match="listed but not pinned"):
        load(entry.name)
    pin = _pins.pin_from_info(entry, hub.model_info(REPO, files_metadata=True), download)
    path = tmp_path / "pins.json"
    _pins.write_pins({entry.name: pin}, path)
    assert _pins.read_pins(path) == {entry.name: pin}
    pinned = _pins.apply_pins([entry], _pins.read_pins(path))[entry.name]
    assert pinned.pinned
    assert (pinned.revision, pinned.sha256) == (COMMIT_A, pin.sha256)
    register_published(pinned, replace=True)
    model = load(entry.name)  # offline, no revision: the pin names the commit
    batch = model.tokenizer.tokenize(cells()[:4])
    np.testing.assert_array_equal(
        model.embed(batch), import_scgpt(snapshot(cache, COMMIT_A)).embed(batch))


def test_records_that_cannot_give_a_pin_are_refused(repo):
    cache, entry, files, hub, download = repo
    typo = replace(entry, sha256=dict.fromkeys(["best_model.pt", "args.json", "vocabs.json"]))
    with pytest.raises(ValueError, match=r"at a{40} has no vocabs\.json \(did you mean "
                       r"'vocab\.json'\?\), which 'scgpt-tiny-pin' needs"):
        _pins.pin_from_info(typo, hub.model_info(REPO, files_metadata=True), download)
    with pytest.raises(ValueError, match=r"files_metadata=True"):
        _pins.pin_from_info(entry, hub.model_info(REPO), download)
    blob = snapshot(cache, COMMIT_A).parent.parent / "blobs" / _blob_name(
        files["args.json"], "args.json")
    blob.write_bytes(files["args.json"] + b" ")  # the cached copy is not the listed blob
    with pytest.raises(ValueError, match=r"args\.json is not args\.json of .* at a{40}: git "
                       r"blob [0-9a-f]{40}, the hub lists [0-9a-f]{40}"):
        _pins.pin_from_info(entry, hub.model_info(REPO, files_metadata=True), download)


def test_pins_that_do_not_fit_the_registry_are_refused(repo, tmp_path):
    _, entry, _, _, _ = repo
    good = {f: "0" * 64 for f in FILES}
    with pytest.raises(ValueError, match=r"'scgpt-tiny-pn' is not a hub entry of the "
                       r"registry \(did you mean 'scgpt-tiny-pin'\?\).*'scgpt-tiny-pin' is "
                       r"pinned in other/repo.*pins \['old\.json'\].*--write"):
        _pins.apply_pins([entry], {
            "scgpt-tiny-pn": _pins.Pin(REPO, COMMIT_A, good),
            entry.name: _pins.Pin("other/repo", COMMIT_A, {**good, "old.json": "0" * 64})})
    path = tmp_path / "pins.json"
    path.write_text(json.dumps({"format": 1, "pins": {entry.name: {
        "repo_id": REPO, "revision": "main", "sha256": good}}}))
    with pytest.raises(ValueError, match=r"revision 'main' is not a commit"):
        _pins.read_pins(path)
    # the shipped file fits the shipped registry, and every pin there is complete
    shipped = _pins.read_pins()
    _pins.apply_pins(_REGISTRY.values(), shipped)
    assert all(published_model(n).pinned for n in shipped)


def script():
    spec = importlib.util.spec_from_file_location("pin_published",
                                                  ROOT / "scripts" / "pin_published.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_proposes_writes_and_checks(repo, tmp_path, capsys):
    cache, entry, files, hub, download = repo
    run = partial(script().main, api=hub, download=download)
    path = tmp_path / "pins.json"
    _pins.write_pins({"kept": _pins.Pin("x/y", COMMIT_B, {"a": "1" * 64})}, path)
    assert run([entry.name, "--check", "--pins", str(path)]) == 1
    assert "scgpt-tiny-pin: not pinned (run with --write)" in capsys.readouterr().out

    assert run([entry.name, "--pins", str(path)]) == 0  # proposes, writes nothing
    proposed = json.loads(capsys.readouterr().out)[entry.name]
    assert proposed == {"repo_id": REPO, "revision": COMMIT_A,
                        "sha256": {f: sha256(files[f]) for f in sorted(files)}}
    assert entry.name not in _pins.read_pins(path)

    assert run([entry.name, "--write", "--pins", str(path)]) == 0
    written = _pins.read_pins(path)
    assert set(written) == {"kept", entry.name}  # other pins are kept
    assert written[entry.name].as_json() == proposed
    capsys.readouterr()
    assert run([entry.name, "--check", "--pins", str(path)]) == 0
    assert f"scgpt-tiny-pin: ok at {COMMIT_A}\n1 of 1 pins verified" in capsys.readouterr().out

    changed = scgpt_files(tmp_path, seed=1)
    add_commit(cache, REPO, COMMIT_B, changed)
    hub.push(COMMIT_B, changed)  # main moves on: the pin still holds, and says so
    assert run([entry.name, "--check", "--pins", str(path)]) == 0
    assert f"main is now at {COMMIT_B}" in capsys.readouterr().out

    data = json.loads(path.read_text())
    data["pins"][entry.name]["sha256"]["vocab.json"] = "f" * 64
    path.write_text(json.dumps(data))
    assert run([entry.name, "--check", "--pins", str(path)]) == 1
    out = capsys.readouterr().out
    assert (f"scgpt-tiny-pin: vocab.json: recorded SHA-256 {'f' * 64}, the hub has "
            f"{sha256(files['vocab.json'])}") in out
    assert "scgpt-tiny-pin: DIFFERS" in out
    assert "0 of 1 pins verified" in out
