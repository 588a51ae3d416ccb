"""Collation: a :class:`~sclcm.tokenizers.TokenBatch` into the model's training inputs.

The batch stays packed: the model pads inside the attention backend that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..models import ModelConfig
    from ..tokenizers import TokenBatch


@dataclass
class MaskingCollator:
    """Mask tokens for the objective of ``config`` and return ``CellModel.forward`` inputs.

    Each gene token (never a special token) is chosen with probability ``mask_prob``.
    For Geneformer's masked gene identity (``objective="mlm"``) the chosen ids are
    corrupted as in BERT: ``corrupt[0]`` of them become ``<mask>``, ``corrupt[1]`` a random
    gene, the rest stay; ``labels`` are the original ids. For the value objectives the
    model hides the chosen values itself; ``labels`` are the original bins (``"bin"``,
    int64) or values (``"value"``, ``"depth_value"``, float32). ``labels`` follow the order
    of the chosen tokens, which is the order of the model's ``target_index``.

    Parameters
    ----------
    config
        The model's :class:`~sclcm.models.ModelConfig`.
    mask_prob
        Share of gene tokens to predict (15% in Geneformer, scBERT and BERT).
    corrupt
        (``<mask>``, random gene, unchanged) shares for ``"mlm"``.
    generative
        scGPT's generative attention: the chosen genes attend to the known ones only.
    seed
        With the ``step`` of each call, fixes the draws (a resumed run masks alike).

    Examples
    --------
    >>> import numpy as np
    >>> from sclcm.models import ModelConfig
    >>> from sclcm.tokenizers import TokenBatch
    >>> cfg = ModelConfig.preset("geneformer", "tiny", vocab_size=100)
    >>> batch = TokenBatch(np.arange(2, 42, dtype=np.int32), np.zeros(40, np.float32),
    ...                    np.array([0, 20, 40]), np.array([0, 1]))
    >>> out = MaskingCollator(cfg, mask_prob=0.5)(batch, step=0)
    >>> sorted(out), bool(out["masked"][0])   # <cls> (id 2) is never masked
    (['gene_ids', 'labels', 'masked', 'offsets', 'replace_masked', 'values'], False)
    """

    config: ModelConfig
    mask_prob: float = 0.15
    corrupt: tuple[float, float, float] = (0.8, 0.1, 0.1)
    generative: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.mask_prob < 1:
            msg = f"mask_prob must be in (0, 1), not {self.mask_prob}."
            raise ValueError(msg)
        if len(self.corrupt) != 3 or abs(sum(self.corrupt) - 1) > 1e-9 or min(self.corrupt) < 0:
            msg = f"corrupt must be three shares summing to 1, not {self.corrupt}."
            raise ValueError(msg)
        if self.generative and self.config.objective != "value":
            msg = "generative masking is scGPT's: it needs objective 'value'."
            raise ValueError(msg)

    def __call__(self, batch: TokenBatch, *, step: int = 0) -> dict[str, Any]:
        import torch

        cfg = self.config
        rng = np.random.default_rng([self.seed, step])
        ids = batch.gene_ids.astype(np.int64)
        chosen = (ids >= cfg.n_special_tokens) & (rng.random(len(ids)) < self.mask_prob)
        target = np.flatnonzero(chosen)
        out: dict[str, Any] = {"offsets": torch.from_numpy(batch.offsets.copy()),
                               "values": torch.from_numpy(batch.values.copy()),
                               "masked": torch.from_numpy(chosen)}
        if cfg.objective == "mlm":
            labels = torch.from_numpy(ids[target])
            draw = rng.random(len(target))
            to_mask = target[draw < self.corrupt[0]]
            to_random = target[(draw >= self.corrupt[0])
                               & (draw < self.corrupt[0] + self.corrupt[1])]
            ids = ids.copy()
            ids[to_mask] = cfg.mask_id
            ids[to_random] = rng.integers(cfg.n_special_tokens, cfg.vocab_size,
                                          len(to_random))
            out["replace_masked"] = False  # the ids above are already corrupted
        elif cfg.objective == "bin":
            labels = torch.from_numpy(batch.values[target].astype(np.int64))
        elif cfg.objective in ("value", "depth_value"):
            labels = torch.from_numpy(batch.values[target].astype(np.float32))
        else:
            msg = f"No masking objective for a model with objective {cfg.objective!r}."
            raise ValueError(msg)
        out["gene_ids"] = torch.from_numpy(ids)
        out["labels"] = labels
        if cfg.objective == "depth_value":
            if not {"depth_T", "depth_S"} <= set(batch.extras):
                msg = "scFoundation batches need depth_T and depth_S (ScFoundationTokenizer)."
                raise ValueError(msg)
            out["depth"] = torch.from_numpy(np.stack(
                [batch.extras["depth_T"], batch.extras["depth_S"]], axis=1).astype(np.float32))
        if self.generative:
            out["generative"] = True
        return out
