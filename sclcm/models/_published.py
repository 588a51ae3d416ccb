"""The registry of published checkpoints: where each lives, pinned, and how it is imported.

An entry names a repository on the Hugging Face hub, a commit, the files it needs with their
SHA-256, the importer that turns them into a :class:`~sclcm.models.CellModel` and its
options, the licence and the source. A model that is not on the hub (scGPT's are on a
shared drive) has ``manual``: where to get the files; the importer then takes the local
directory (``sclcm.models.load(name, directory=...)``).

The commits and SHA-256 are data, not code: ``published_pins.json`` (:mod:`._pins`), written
by ``scripts/pin_published.py --write`` from the hub's own records on a machine with network
and read here. Entries without a pin are listed (``pinned`` is ``False``) and load only at a
commit the caller names; the SHA-256 of the files are then recorded with the converted model
and checked on every later load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._checks import InputError
from ._config import did_you_mean
from ._pins import apply_pins, read_pins

if TYPE_CHECKING:
    import pandas as pd

IMPORTERS = ("sclcm", "geneformer", "scgpt", "scfoundation")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PublishedModel:
    """One published checkpoint.

    Attributes
    ----------
    name
        The short name :func:`sclcm.models.load` takes (``"geneformer-v2-104m"``).
    model, family, parameters, licence, source
        What the table shows: the model's own name, the sclcm family, its size, its
        licence and where it is described.
    importer
        ``"sclcm"`` (a ``save_pretrained`` directory), ``"geneformer"``, ``"scgpt"`` or
        ``"scfoundation"``.
    repo_id, revision
        The hub repository and the commit (40 hex digits) its files are taken at;
        ``repo_id=None`` for a model that is not on the hub.
    directory
        The folder of the snapshot the importer reads (``""`` for the top).
    sha256
        Repository path of each file the model needs -> its SHA-256 (``None`` where not
        yet recorded).
    file_options
        Importer arguments that are files (``{"token_dictionary": "geneformer/x.pkl"}``).
    options
        Other importer arguments.
    manual
        Where to get the files by hand, for a model that is not on the hub.
    """

    name: str
    model: str
    family: str
    parameters: str
    licence: str
    source: str
    importer: str
    repo_id: str | None = None
    revision: str | None = None
    directory: str = ""
    sha256: dict[str, str | None] = field(default_factory=dict)
    file_options: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    manual: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.importer not in IMPORTERS:
            problems.append(f"importer must be one of {IMPORTERS}, not {self.importer!r}")
        if self.revision is not None and not _COMMIT.fullmatch(self.revision):
            problems.append(f"revision must be a full commit hash (40 hex digits), not "
                            f"{self.revision!r}: a branch or tag can move")
        bad = [p for p, h in self.sha256.items() if h is not None and not _SHA256.fullmatch(h)]
        if bad:
            problems.append(f"sha256 of {bad} must be 64 hex digits")
        if self.repo_id is None and self.manual is None:
            problems.append("a model that is not on the hub needs manual= (where to get it)")
        if problems:
            msg = f"Invalid published model {self.name!r}: " + "; ".join(problems) + "."
            raise InputError(msg)

    @property
    def pinned(self) -> bool:
        """A commit and every file's SHA-256 are recorded."""
        return (self.repo_id is None or self.revision is not None) and bool(self.sha256) \
            and all(h is not None for h in self.sha256.values())


_GF_SOURCE = "https://huggingface.co/ctheodoris/Geneformer"
_GF = dict(family="geneformer", licence="Apache-2.0", source=_GF_SOURCE, importer="geneformer",
           repo_id="ctheodoris/Geneformer")
_SCGPT_ZOO = "https://github.com/bowang-lab/scGPT#pretrained-scgpt-model-zoo"
_SCF_REPO = "https://github.com/biomap-research/scFoundation"


def _geneformer(name: str, model: str, parameters: str, folder: str, corpus: str,
                dictionaries: str = "geneformer") -> PublishedModel:
    token, median = f"{dictionaries}/token_dictionary_{corpus}.pkl", \
        f"{dictionaries}/gene_median_dictionary_{corpus}.pkl"
    return PublishedModel(
        name=name, model=model, parameters=parameters, directory=folder,
        sha256=dict.fromkeys([f"{folder}/config.json", f"{folder}/model.safetensors",
                              token, median]),
        file_options={"token_dictionary": token, "gene_median_dictionary": median}, **_GF)


#: The registry, by name, each hub entry with its pin from published_pins.json (if any).
#: Geneformer keeps V1's 30M-corpus dictionaries in a folder of their own.
_REGISTRY: dict[str, PublishedModel] = apply_pins((
    _geneformer("geneformer-v1-10m", "Geneformer V1 10M", "10M", "Geneformer-V1-10M", "gc30M",
                "geneformer/gene_dictionaries_30m"),
    _geneformer("geneformer-v2-104m", "Geneformer V2 104M", "104M", "Geneformer-V2-104M",
                "gc104M"),
    _geneformer("geneformer-v2-316m", "Geneformer V2 316M", "316M", "Geneformer-V2-316M",
                "gc104M"),
    PublishedModel(
        name="scgpt-human", model="scGPT whole-human", family="scgpt", parameters="51M",
        licence="MIT", source=_SCGPT_ZOO, importer="scgpt",
        sha256=dict.fromkeys(["best_model.pt", "args.json", "vocab.json"]),
        manual=(f"download the 'whole-human' folder (best_model.pt, args.json, vocab.json) of "
                f"the scGPT model zoo ({_SCGPT_ZOO}), then call "
                "sclcm.models.load('scgpt-human', directory=<that folder>)")),
    PublishedModel(
        name="scfoundation-cell", model="scFoundation 100M (cell embedding)",
        family="scfoundation", parameters="100M", licence="see source",
        source=_SCF_REPO, importer="scfoundation",
        sha256=dict.fromkeys(["models.ckpt", "OS_scRNA_gene_index.19264.tsv"]),
        file_options={"checkpoint": "models.ckpt",
                      "gene_list": "OS_scRNA_gene_index.19264.tsv"},
        options={"key": "cell"},
        manual=(f"download models.ckpt (the model weights linked from {_SCF_REPO}) and "
                "OS_scRNA_gene_index.19264.tsv (in that repository) into one folder, then call "
                "sclcm.models.load('scfoundation-cell', directory=<that folder>)")),
), read_pins())


def register_published(entry: PublishedModel, *, replace: bool = False) -> None:
    """Add ``entry`` to the registry (e.g. a lab's own mirror of a checkpoint, pinned)."""
    if entry.name in _REGISTRY and not replace:
        msg = f"{entry.name!r} is registered already; pass replace=True to replace it."
        raise ValueError(msg)
    _REGISTRY[entry.name] = entry


def unregister_published(name: str) -> None:
    """Remove ``name`` from the registry."""
    _REGISTRY.pop(name)


def published_model(name: str) -> PublishedModel:
    """The registry entry of ``name``; :class:`~sclcm.InputError` naming the closest one."""
    if name not in _REGISTRY:
        msg = (f"{name!r} is not a published model{did_you_mean(name, _REGISTRY)}; "
               f"see sclcm.models.published() ({', '.join(sorted(_REGISTRY))}).")
        raise InputError(msg)
    return _REGISTRY[name]


def is_published(name: object) -> bool:
    return isinstance(name, str) and (name in _REGISTRY or name.startswith("hf://"))


def published() -> pd.DataFrame:
    """The registry of published models, one row each.

    Returns
    -------
    pd.DataFrame
        A DataFrame indexed by ``name`` with ``model``, ``family``, ``parameters``,
        ``licence``, ``source``, ``repository`` (hub repository, or ``None``), ``revision``
        and ``pinned`` (commit and SHA-256 of every file recorded).

    Examples
    --------
    >>> from sclcm.models import published
    >>> "scgpt-human" in published().index
    True
    """
    import pandas as pd

    rows = [{"name": m.name, "model": m.model, "family": m.family, "parameters": m.parameters,
             "licence": m.licence, "source": m.source, "repository": m.repo_id,
             "revision": m.revision, "pinned": m.pinned} for m in _REGISTRY.values()]
    return pd.DataFrame(rows).set_index("name")
