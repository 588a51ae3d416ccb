"""Published models by name: a local Hugging Face cache laid out as huggingface_hub writes it
(blobs, refs, snapshots of symlinks), offline mode, pins, the converted-model cache."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_scgpt_import import cells, write_scgpt

import sclcm
from sclcm import InputError
from sclcm.models import (
    PublishedModel,
    _hub,
    import_scgpt,
    load,
    published,
    register_published,
    unregister_published,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = "sclcm-test/scgpt-tiny"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
FILES = ("best_model.pt", "args.json", "vocab.json")


def _blob_name(data: bytes, path: str) -> str:
    """The hub's etag: SHA-256 for LFS files (weights), the git blob SHA-1 for the others."""
    if path.endswith((".pt", ".safetensors", ".bin", ".pkl")):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_commit(cache: Path, repo: str, commit: str, files: dict[str, bytes], *,
               main: bool = True) -> Path:
    """``files`` as huggingface_hub caches a download: blobs/<etag>, snapshots/<commit>/<path>
    a relative symlink to the blob, refs/main holding the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        blob = root / "blobs" / _blob_name(data, path)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if main:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def scgpt_files(tmp: Path, seed: int = 0) -> dict[str, bytes]:
    folder = tmp / f"scgpt-src-{seed}"
    write_scgpt(folder, layout="Wqkv", seed=seed)
    return {f: (folder / f).read_bytes() for f in FILES}


def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                  ) -> tuple[Path, dict[str, bytes]]:
    """A hub cache holding a scGPT-layout model at COMMIT_A; offline, as on a cluster node."""
    cache = tmp_path / "hf" / "hub"
    files = scgpt_files(tmp_path)
    add_commit(cache, REPO, COMMIT_A, files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, files


def tiny_entry(name: str, files: dict[str, bytes] | None = None) -> PublishedModel:
    """A registry entry for REPO: pinned at COMMIT_A to ``files``, or unpinned."""
    pin = {} if files is None else {"revision": COMMIT_A, "sha256": {
        f: hashlib.sha256(d).hexdigest() for f, d in files.items()}}
    return PublishedModel(
        name=name, model="scGPT tiny (test)", family="scgpt", parameters="1M", licence="MIT",
        source="tests", importer="scgpt", repo_id=REPO,
        **({"sha256": dict.fromkeys(FILES)} | pin))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache with one pinned scGPT-layout model, offline."""
    cache, files = offline_cache(tmp_path, monkeypatch)
    entry = tiny_entry("scgpt-tiny-test", files)
    register_published(entry)
    yield cache, entry, files
    unregister_published(entry.name)


def converted(cache: Path) -> list[Path]:
    base = cache.parent / _hub.CONVERTED
    return sorted(p for p in base.rglob("config.json")) if base.is_dir() else []


def test_published_lists_the_registry():
    table = published()
    assert {"geneformer-v2-104m", "scgpt-human"} <= set(table.index)
    assert {"model", "family", "parameters", "licence", "source", "pinned"} <= set(table)


def test_offline_load_from_a_complete_cache_converts_once(hub, tmp_path, monkeypatch):
    cache, entry, _ = hub
    model = load(entry.name)
    reference = import_scgpt(cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
                             / COMMIT_A)
    batch = reference.tokenizer.tokenize(cells()[:8])
    np.testing.assert_array_equal(model.embed(batch), reference.embed(batch))
    assert len(converted(cache)) == 1
    assert str(cache.parent) in str(converted(cache)[0])  # beside the hub cache, not in it
    assert not any(p.name.startswith(_hub.CONVERTED) for p in cache.iterdir())

    def no_conversion(*_, **__):
        raise AssertionError("converted again")

    monkeypatch.setattr(_hub, "_import", no_conversion)
    again = load(entry.name)  # reuses the converted model
    np.testing.assert_array_equal(again.embed(batch), model.embed(batch))
    monkeypatch.delenv("HF_HUB_OFFLINE")  # a pinned commit in the cache needs no network
    load(entry.name)


def test_offline_missing_file_is_named_with_the_fetch_command(hub):
    cache, entry, _ = hub
    (cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT_A / "vocab.json"
     ).unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab\.json of 'scgpt-tiny-test'.*"
                       r"offline mode.*hf download sclcm-test/scgpt-tiny vocab\.json "
                       r"--revision a{40}"):
        load(entry.name)


def test_a_tampered_file_is_refused_and_left_in_place(hub):
    cache, entry, files = hub
    blob = cache / f"models--{REPO.replace('/', '--')}" / "blobs" / _blob_name(
        files["args.json"], "args.json")
    blob.write_bytes(files["args.json"].replace(b'"dropout": 0.2', b'"dropout": 0.3'))
    with pytest.raises(InputError, match=r"args\.json has SHA-256 [0-9a-f]{64}, the registry "
                       r"pins [0-9a-f]{64}.*force_download=True"):
        load(entry.name)
    assert blob.is_file()
    assert converted(cache) == []


def test_tools_take_a_published_name(hub):
    _, entry, _ = hub
    adata = cells()[:6].copy()
    sclcm.tl.embed(adata, model=entry.name)
    assert adata.obsm["X_sclcm"].shape == (6, 64)
    assert adata.uns["sclcm"]["model"] == entry.name
    np.testing.assert_allclose(np.linalg.norm(adata.obsm["X_sclcm"], axis=1), 1, atol=1e-5)


def test_own_checkpoints_by_hf_url_reconvert_when_the_source_changes(hub, tmp_path):
    cache, _, files = hub
    own = "me/my-scgpt"
    add_commit(cache, own, COMMIT_A, files)
    first = load(f"hf://{own}")
    assert len(converted(cache)) == 1
    add_commit(cache, own, COMMIT_B, scgpt_files(tmp_path, seed=1))  # main moves on
    second = load(f"hf://{own}")
    assert len(converted(cache)) == 2  # a new source: a new conversion
    batch = first.tokenizer.tokenize(cells()[:4])
    assert not np.allclose(first.embed(batch), second.embed(batch))
    pinned = load(f"hf://{own}@{COMMIT_A}")  # the first one, converted already
    np.testing.assert_array_equal(pinned.embed(batch), first.embed(batch))
    assert len(converted(cache)) == 2


def test_own_checkpoint_files_changed_at_a_commit_are_refused(hub):
    cache, _, files = hub
    own = "me/my-scgpt"
    snap = add_commit(cache, own, COMMIT_A, files)
    load(f"hf://{own}")
    weights = snap / "best_model.pt"
    data = weights.read_bytes()
    weights.resolve().write_bytes(data[:-8] + b"\0" * 8)
    with pytest.raises(InputError, match=r"best_model\.pt.*changed since they were first"):
        load(f"hf://{own}")


def test_a_saved_sclcm_model_on_the_hub_loads_as_it_is(hub, tmp_path):
    cache, entry, _ = hub
    model = load(entry.name)
    out = tmp_path / "mine"
    model.save_pretrained(out)
    add_commit(cache, "me/sclcm-model", COMMIT_A,
               {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
                if p.is_file()})
    n = len(converted(cache))
    again = load("hf://me/sclcm-model")
    batch = model.tokenizer.tokenize(cells()[:4])
    np.testing.assert_array_equal(again.embed(batch), model.embed(batch))
    assert len(converted(cache)) == n  # nothing to convert


def test_models_off_the_hub_say_where_to_get_them_and_take_a_directory(hub, tmp_path):
    with pytest.raises(InputError, match=r"not on the Hugging Face hub: download the "
                       r"'whole-human' folder.*directory="):
        load("scgpt-human")
    folder = tmp_path / "whole-human"
    write_scgpt(folder)
    model = load("scgpt-human", directory=folder)
    assert model.config.tokenizer == "scgpt"
    assert model.config.d_model == 64
    adata = cells()[:4].copy()  # from then on the name alone is a model for every tool
    sclcm.tl.embed(adata, model="scgpt-human")
    np.testing.assert_allclose(adata.obsm["X_sclcm"],
                               model.embed(model.tokenizer.tokenize(cells()[:4])), atol=1e-5)


def test_scfoundation_by_name_from_a_folder(hub, tmp_path):
    from test_scfoundation_import import write_checkpoint

    folder = tmp_path / "scf"
    folder.mkdir()
    write_checkpoint(folder)
    (folder / "genes.tsv").rename(folder / "OS_scRNA_gene_index.19264.tsv")
    model = load("scfoundation-cell", directory=folder)
    assert model.config.tokenizer == "scfoundation"
    assert model.config.final_norm


def test_unknown_and_unpinned_names(hub):
    with pytest.raises(InputError, match=r"did you mean 'scgpt-human'"):
        load("scgpt-humann")
    with pytest.raises(InputError, match=r"'geneformer-v2-104m' is listed but not pinned.*"
                       r"revision="):
        load("geneformer-v2-104m")
    with pytest.raises(FileNotFoundError, match=r"config\.json.*not in the Hugging Face "
                       r"cache.*hf download ctheodoris/Geneformer"):
        load("geneformer-v2-104m", revision="c" * 40)


def test_a_failed_conversion_leaves_nothing_behind(hub, tmp_path):
    cache, _, files = hub
    bad = dict(files, **{"args.json": files["args.json"].replace(b'"d_hid": 96',
                                                                  b'"d_hid": 95')})
    add_commit(cache, "me/broken", COMMIT_A, bad)
    with pytest.raises(InputError, match=r"linear1\.weight has shape \(96, 64\), args\.json "
                       r"says \(95, 64\)"):
        load("hf://me/broken")
    base = cache.parent / _hub.CONVERTED / "me--broken"
    assert [p.name for p in base.iterdir()] == [f"{COMMIT_A}.sha256.json"]
    shutil.rmtree(base)
