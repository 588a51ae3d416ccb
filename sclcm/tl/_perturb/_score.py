"""The model side of a perturbation screen: embeddings of cells and copies, and their scores.

For each perturbed copy of a cell, with ``o`` the cell's embedding, ``p`` the copy's and
``g`` the goal state's mean embedding:

- ``shift = 1 - cos(o, p)`` (0: the perturbation changed nothing; Geneformer reports
  ``cos(o, p)``, which is ``1 - shift``);
- ``goal_shift = cos(p, g) - cos(o, g)`` (positive: the copy moved toward the goal);
- per other gene of the copy, ``1 - cos`` of its last hidden state in the copy and in the
  cell (how far the perturbation moved that gene's contextual embedding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ...tokenizers._kernels import positions_in_row
from .._forward import Budget, input_rows, plan_batches

if TYPE_CHECKING:
    from ...models import CellModel
    from ...tokenizers import TokenBatch
    from ._edit import CellIndex, Edits


def token_rows(batch: TokenBatch, rows: np.ndarray) -> np.ndarray:
    """Token indices (in ``batch``) of the cells ``rows``, in that order."""
    L = batch.lengths[rows]
    off = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(L, out=off[1:])
    return np.repeat(batch.offsets[rows], L) + positions_in_row(off)


class Scorer:
    """Runs ``model`` on a block's cells and their perturbed copies and scores the copies.

    Parameters
    ----------
    model
        The model, in eval mode, on ``device``.
    n_perts
        Perturbations (columns of the scores).
    batch_size
        Cells (copies) per forward pass; ``None`` sizes passes by tokens.
    goal
        The goal state's mean embedding, or ``None``.
    gene_shifts
        Also add up the shifts of the other genes' last hidden states.
    """

    def __init__(self, model: CellModel, device: torch.device, *, n_perts: int,
                 batch_size: int | None, goal: np.ndarray | None, gene_shifts: bool) -> None:
        cfg = model.config
        self.model, self.device, self.batch_size = model, device, batch_size
        self.n_heads, self.V, self.n_special = cfg.n_heads, cfg.vocab_size, cfg.n_special_tokens
        self.n_prefix = 2 if cfg.depth_tokens else 0
        self.budget = Budget.for_device(device)
        self.goal = None if goal is None else torch.as_tensor(goal, dtype=torch.float32,
                                                              device=device)
        self.gene_shifts = gene_shifts
        self.delta_sum = np.zeros((n_perts, cfg.d_model), dtype=np.float64)
        self._keys: list[np.ndarray] = []
        self._sums: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._pending = 0

    def passes(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Forward passes over cells of these lengths (index arrays)."""
        return plan_batches(lengths, n_heads=self.n_heads, batch_size=self.batch_size,
                            budget=self.budget)

    def run(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cell embeddings (float32) and, with ``gene_shifts``, each input token's state."""
        inputs = self.model.inputs(batch, device=self.device)
        out = self.model(**inputs, heads=False)
        states = None
        if self.gene_shifts:
            rows = input_rows(out["offsets"], inputs["offsets"], self.n_prefix)
            states = out["last_hidden_state"][rows].float()
        return out["cell_embedding"].float(), states

    def originals(self, batch: TokenBatch, rows: np.ndarray
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of the block's cells ``rows`` (all cells' rows; others stay 0) and
        their token states (indexed like the block's tokens)."""
        d = self.model.config.d_model
        emb = torch.zeros(batch.n_cells, d, device=self.device)
        states = torch.zeros(batch.n_tokens, d, device=self.device) if self.gene_shifts \
            else None
        for part in self.passes(batch.lengths[rows]):
            cells = rows[part]
            e, h = self.run(batch.select(cells))
            emb[torch.from_numpy(cells).to(self.device)] = e
            if h is not None:
                states[torch.from_numpy(token_rows(batch, cells)).to(self.device)] = h
        return emb, states

    def score(self, index: CellIndex, edits: Edits, part: np.ndarray, copies: TokenBatch,
              origin: np.ndarray, edited: np.ndarray, orig: torch.Tensor,
              orig_states: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Shifts (and goal shifts) of the copies ``part``, whose batch is ``copies``."""
        emb, states = self.run(copies)
        cell = torch.from_numpy(edits.copy_cell[part]).to(self.device)
        # in float64: 1 - cos of nearly equal vectors loses digits in float32
        emb, o = emb.double(), orig[cell].double()
        shift = 1 - F.cosine_similarity(o, emb, dim=1)
        goal = None
        if self.goal is not None:
            g = self.goal[None, :].double()
            goal = (F.cosine_similarity(emb, g, dim=1) - F.cosine_similarity(o, g, dim=1)
                    ).cpu().numpy()
        pert = edits.copy_pert[part]
        np.add.at(self.delta_sum, pert, (emb - o).cpu().numpy())
        if states is not None:
            self._add_gene_shifts(copies, pert, origin, edited, states, orig_states)
        return shift.cpu().numpy(), goal

    def _add_gene_shifts(self, copies: TokenBatch, pert: np.ndarray, origin: np.ndarray,
                         edited: np.ndarray, states: torch.Tensor,
                         orig_states: torch.Tensor) -> None:
        ids = copies.gene_ids
        keep = np.flatnonzero((origin >= 0) & ~edited & (ids >= self.n_special))
        src = torch.from_numpy(origin[keep]).to(self.device)
        at = torch.from_numpy(keep).to(self.device)
        moved = 1 - F.cosine_similarity(states[at], orig_states[src], dim=1)
        copy_of = np.repeat(np.arange(copies.n_cells), copies.lengths)[keep]
        keys = pert[copy_of].astype(np.int64) * self.V + ids[keep]
        self._add(keys, moved.double().cpu().numpy(), np.ones(len(keys), dtype=np.int64))

    def _add(self, keys: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> None:
        self._keys.append(keys)
        self._sums.append(sums)
        self._counts.append(counts)
        self._pending += len(keys)
        if self._pending > 4_000_000:  # fold (perturbation, gene) pairs together now and then
            self._fold()

    def _fold(self) -> None:
        if not self._keys:
            return
        keys = np.concatenate(self._keys)
        uniq, inv = np.unique(keys, return_inverse=True)
        self._keys = [uniq]
        self._sums = [np.bincount(inv, weights=np.concatenate(self._sums))]
        self._counts = [np.bincount(inv, weights=np.concatenate(self._counts)
                                    ).astype(np.int64)]
        self._pending = len(uniq)

    def gene_shift_sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(perturbation, token id, sum of shifts, cells)`` per pair seen."""
        self._fold()
        if not self._keys:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0), empty
        keys = self._keys[0]
        return keys // self.V, keys % self.V, self._sums[0], self._counts[0]
