"""Models shipped inside the package, found by name (``sclcm/models/pretrained/<name>/``).

Outside ``sclcm.models`` so that the tools can name models without importing torch.
"""

from __future__ import annotations

from pathlib import Path

#: Where the shipped models live.
PRETRAINED_DIR = Path(__file__).resolve().parent / "models" / "pretrained"
#: The model a tool uses when given none.
DEFAULT_MODEL = "sclcm-small"
#: Shipped models no longer shipped, and the one that replaced each.
RETIRED = {"sclcm-pbmc-small": "sclcm-small"}


def shipped_models() -> list[str]:
    """Names of the models shipped with the package.

    >>> "sclcm-small" in shipped_models()
    True
    """
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").is_file())


def model_path(model: str | Path) -> Path:
    """The directory of ``model``: a directory, the name of a shipped model, or of a
    published one (:func:`sclcm.models.published`, ``"hf://org/repo"``: fetched through the
    Hugging Face cache and converted once, see :func:`sclcm.models.load`).

    Raises
    ------
    ValueError
        For a retired shipped name (naming its replacement), or a name that is none of these.
    """
    path = Path(model).expanduser()
    if isinstance(model, str) and model.startswith("hf://"):
        from .models._hub import resolve

        return resolve(model)
    if path.is_dir() or isinstance(model, Path) or "/" in str(model):
        return path  # a directory: the loader names what is missing in it
    if isinstance(model, str) and (PRETRAINED_DIR / model / "config.json").is_file():
        return PRETRAINED_DIR / model
    if isinstance(model, str) and model in RETIRED:
        msg = (f"The shipped model {model!r} was replaced by {RETIRED[model]!r} (trained with "
               "a cell-level objective: its embeddings separate cell types far better); use "
               f"{RETIRED[model]!r} (or model=None in the tools).")
        raise ValueError(msg)
    from .models._published import is_published

    if is_published(model):
        from .models._hub import resolve

        return resolve(model)
    shipped = ", ".join(map(repr, shipped_models())) or "none"
    msg = (f"{str(model)!r} is neither a model directory (with config.json), a shipped "
           f"model (shipped: {shipped}) nor a published one (sclcm.models.published()).")
    raise ValueError(msg)
