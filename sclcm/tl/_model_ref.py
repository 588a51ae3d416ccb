"""Which model a tool runs: a directory, a loaded ``CellModel``, or a shipped model's name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..models import CellModel

#: Models shipped inside the package, under ``sclcm/models/pretrained/<name>/``.
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "models" / "pretrained"
#: The model a tool uses when given none.
DEFAULT_MODEL = "sclcm-small"
#: Shipped models no longer shipped, and the one that replaced each.
RETIRED = {"sclcm-pbmc-small": "sclcm-small"}


def shipped_models() -> list[str]:
    """Names of the models shipped with the package."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").is_file())


def get_model(model: Any = None, *, device: str | torch.device | None = None) -> CellModel:
    """Resolve ``model`` to a :class:`~sclcm.models.CellModel` on ``device``.

    Parameters
    ----------
    model
        ``None`` (the default shipped model), the name of a shipped model, a directory
        written by ``save_pretrained``, or a ``CellModel`` (used as it is, moved to
        ``device`` only when one is given).
    device
        ``"cpu"``, ``"cuda"``, ...; default :attr:`sclcm.settings.device`.

    Raises
    ------
    ValueError
        For a name that is neither a shipped model nor a model directory, or a model
        without a tokenizer (tools tokenize with the model's own).
    """
    from .._settings import settings
    from ..models import CellModel

    if isinstance(model, CellModel):
        out = model if device is None else model.to(settings.resolve_device(device))
    else:
        path = _model_path(DEFAULT_MODEL if model is None else model)
        out = CellModel.from_pretrained(path, device=settings.resolve_device(device))
    if out.tokenizer is None:
        msg = ("This model has no tokenizer: attach the one it was trained with "
               "(model.attach_tokenizer(tokenizer)) or save it with save_pretrained(..., "
               "tokenizer=tokenizer).")
        raise ValueError(msg)
    return out


def _model_path(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path
    if isinstance(model, str) and (PRETRAINED_DIR / model / "config.json").is_file():
        return PRETRAINED_DIR / model
    shipped = ", ".join(map(repr, shipped_models())) or "none"
    if isinstance(model, str) and model in RETIRED:
        msg = (f"The shipped model {model!r} was replaced by {RETIRED[model]!r} (trained with "
               "a cell-level objective: its embeddings separate cell types far better); use "
               f"model={RETIRED[model]!r} or model=None.")
        raise ValueError(msg)
    msg = (f"{str(model)!r} is neither a model directory (with config.json) nor a shipped "
           f"model (shipped: {shipped}).")
    raise ValueError(msg)
