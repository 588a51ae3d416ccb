"""Which model a tool runs: a directory, a loaded ``CellModel``, or a shipped model's name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._shipped import DEFAULT_MODEL, PRETRAINED_DIR, RETIRED, shipped_models

__all__ = ["DEFAULT_MODEL", "PRETRAINED_DIR", "RETIRED", "get_model", "shipped_models"]

if TYPE_CHECKING:
    import torch

    from ..models import CellModel


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
        out = CellModel.from_pretrained(DEFAULT_MODEL if model is None else model,
                                        device=settings.resolve_device(device))
    if out.tokenizer is None:
        msg = ("This model has no tokenizer: attach the one it was trained with "
               "(model.attach_tokenizer(tokenizer)) or save it with save_pretrained(..., "
               "tokenizer=tokenizer).")
        raise ValueError(msg)
    return out
