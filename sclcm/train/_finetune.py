"""``finetune(adata, label_key)``: a cell-type classifier on a model's pooled cell embedding.

The classification head (:class:`~sclcm.models._layers.ClassifierHead`, built by
``ModelConfig(n_classes=...)``) is trained with the encoder, or with its lower blocks
frozen, by Lightning on token-budget micro-batches. The model's config has no field for
the class names, so they are kept on the model (``model.labels``) and written beside the
weights as ``labels.json`` (:func:`save_labels` / :func:`load_labels`).
"""

from __future__ import annotations

import copy as copy_
import dataclasses
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from .. import logging as logg
from .._checks import InputError
from ._batching import MicroBatch
from ._finetune_data import drop_genes
from ._finetune_labels import MIN_CELLS_PER_CLASS, _check_labels, _split  # noqa: F401
from ._module import WarmupCosine, step_seed

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ..models import CellModel
    from ..tokenizers import TokenBatch

#: Written beside ``config.json`` by :func:`save_labels`.
LABELS_FILE = "labels.json"
#: Padded tokens per training micro-batch.
MAX_TOKENS = 16_384
#: Written beside the weights: embeddings of training cells, the reference that the
#: classifier's typicality (its "Unassigned" for types the reference lacks) is measured by.
REFERENCE_FILE = "reference_embedding.npy"
#: Most training cells kept in it.
REFERENCE_CELLS = 2_000


def save_labels(directory: str | Path, labels: Sequence[str], *,
                info: dict[str, Any] | None = None) -> None:
    """Write the class names (in the head's output order) and ``info`` (label key, metrics,
    gene coverage) to ``directory/labels.json``."""
    record = {"labels": [str(x) for x in labels], **(info or {})}
    (Path(directory) / LABELS_FILE).write_text(json.dumps(record, indent=2))


def load_labels(directory: str | Path) -> list[str]:
    """The class names :func:`save_labels` wrote for a fine-tuned model directory."""
    path = Path(directory) / LABELS_FILE
    if not path.is_file():
        msg = (f"{directory} holds no {LABELS_FILE}: it is not a fine-tuned classifier. "
               "Fine-tune one with sclcm.train.finetune(adata, label_key, out_dir=...).")
        raise InputError(msg)
    return list(json.loads(path.read_text())["labels"])


def load_classifier(directory: str | Path, *, device: str | torch.device | None = None
                    ) -> CellModel:
    """A fine-tuned model directory as a :class:`~sclcm.models.CellModel` with its
    ``labels`` attribute set (what :func:`sclcm.tl.annotate` reads)."""
    from ..models import CellModel

    model = CellModel.from_pretrained(directory, device=device)
    labels = load_labels(directory)
    if model.classifier is None or model.config.n_classes != len(labels):
        msg = (f"{directory}: {LABELS_FILE} names {len(labels)} classes but the model's head "
               f"has {model.config.n_classes}; restore the directory as finetune wrote it.")
        raise InputError(msg)
    model.labels = labels
    model.temperature = float(json.loads((Path(directory) / LABELS_FILE).read_text())
                              .get("temperature", 1.0))
    ref = Path(directory) / REFERENCE_FILE  # absent in directories of older versions
    model.reference_embedding = np.load(ref) if ref.is_file() else None
    return model


def class_logits(model: CellModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's logits for a forward pass of ``inputs``, skipping the pretraining heads
    (an MLM head over the whole vocabulary per token would cost more than the encoder)."""
    if model.config.normalize_embedding:  # the head reads the embedding before the norm
        return model(**inputs)["class_logits"]
    return model.classifier(model(**inputs, heads=False)["cell_embedding"])


class FinetuneModule(L.LightningModule):
    """Cross-entropy of the classification head (class-weighted), AdamW with warmup and
    cosine decay; validation macro-F1 and accuracy, the best weights kept in memory.

    Logged: ``train/loss``, ``train/lr``, ``val/loss``, ``val/accuracy``, ``val/macro_f1``.
    """

    def __init__(self, model: CellModel, labels: np.ndarray, *, class_weights: np.ndarray | None,
                 lr: float, weight_decay: float, warmup_steps: int, max_steps: int,
                 seed: int, gene_dropout: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.labels = torch.as_tensor(labels, dtype=torch.long)  # per reference row
        self.register_buffer("class_weights", None if class_weights is None else
                             torch.as_tensor(class_weights, dtype=torch.float32))
        self.lr, self.weight_decay, self.seed = lr, weight_decay, seed
        self.gene_dropout = gene_dropout
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.best_f1, self.best_step, self.best_state = -1.0, -1, None
        self.history: list[dict[str, float]] = []
        self._val: list[tuple[np.ndarray, np.ndarray, float]] = []

    def _loss(self, tokens: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = self.model.inputs(tokens, device=self.device)
        logits = class_logits(self.model, inputs).float()
        y = self.labels[torch.from_numpy(tokens.cell_index)].to(self.device)
        return F.cross_entropy(logits, y, weight=self.class_weights), logits, y

    def training_step(self, batch: MicroBatch, batch_idx: int) -> torch.Tensor:
        seed = step_seed(self.seed, self.global_step)  # dropout, reproducible on resume
        torch.manual_seed(seed)
        tokens = batch.tokens
        if self.gene_dropout > 0:
            tokens = drop_genes(tokens, self.gene_dropout, np.random.default_rng(seed),
                                n_special=self.model.config.n_special_tokens)
        loss, _, _ = self._loss(tokens)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch.n_cells)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"],
                 batch_size=batch.n_cells)
        return loss

    def validation_step(self, batch: MicroBatch, batch_idx: int) -> None:
        loss, logits, y = self._loss(batch.tokens)
        self._val.append((logits.argmax(1).cpu().numpy(), y.cpu().numpy(),
                          float(loss) * batch.n_cells))

    def on_validation_epoch_end(self) -> None:
        from sklearn.metrics import f1_score

        if not self._val:
            return
        pred = np.concatenate([v[0] for v in self._val])
        true = np.concatenate([v[1] for v in self._val])
        loss = sum(v[2] for v in self._val) / len(true)
        self._val.clear()
        f1 = float(f1_score(true, pred, average="macro", labels=np.unique(true),
                            zero_division=0))
        acc = float((pred == true).mean())
        self.log_dict({"val/loss": loss, "val/accuracy": acc, "val/macro_f1": f1},
                      prog_bar=True)
        self.history.append({"step": int(self.global_step), "val_loss": loss,
                             "val_accuracy": acc, "val_macro_f1": f1})
        if f1 > self.best_f1 and not self.trainer.sanity_checking:
            self.best_f1, self.best_step = f1, int(self.global_step)
            self.best_state = {k: v.detach().cpu().clone()
                               for k, v in self.model.state_dict().items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the best weights so far travel with the checkpoint: a resumed run keeps them
        checkpoint["sclcm_finetune"] = {"best_f1": self.best_f1, "best_step": self.best_step,
                                        "best_state": self.best_state,
                                        "history": self.history}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("sclcm_finetune", {})
        self.best_f1 = state.get("best_f1", -1.0)
        self.best_step = state.get("best_step", -1)
        self.best_state = state.get("best_state")
        self.history = list(state.get("history", []))

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]}
                  for g in self.model.param_groups(self.weight_decay)]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, WarmupCosine(self.warmup_steps, self.max_steps, 0.1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def finetune(adata: AnnData, label_key: str, model: Any = None, *, groupby: str | None = None,
             layer: str | None = None, orthologs: str = "one2one", freeze_layers: int = 0,
             max_steps: int = 500,
             lr: float = 1e-4, weight_decay: float = 0.01, warmup_steps: int | None = None,
             class_weights: bool = True, gene_dropout: float = 0.0,
             val_fraction: float = 0.2, val_every: int | None = None,
             max_tokens: int = MAX_TOKENS, classifier_layers: int | None = None,
             calibrate: bool = True, out_dir: str | Path | None = None,
             accelerator: str = "auto", devices: int | str = 1, strategy: str = "auto",
             precision: str = "auto", checkpoint_every: int | None = None,
             resume: str | Path | None = None, callbacks: Sequence[L.Callback] = (),
             progress_bar: bool = True, seed: int = 0) -> CellModel:
    """Fine-tune a classification head (and the encoder) on labelled cells.

    Parameters
    ----------
    adata
        The labelled reference: counts in ``X`` or ``layer``, labels in
        ``obs[label_key]``; in memory or ``backed="r"``. It is not modified.
    label_key
        The ``obs`` column of labels. Cells whose label is NaN are left out (a warning
        counts them).
    model
        The starting model: a shipped name, a model directory, a
        :class:`~sclcm.models.CellModel` (copied, not changed), ``None`` for the default
        shipped model. A new head replaces any it had.
    groupby
        An ``obs`` column (donor, batch): whole groups are held out for validation, so
        that the best step is the one that generalizes to new donors. ``None``: a split
        stratified by label.
    layer
        Where the counts are; ``X`` when ``None``.
    orthologs
        For a reference of another species than the model's: ``"one2one"`` (one-to-one
        orthologs only) or ``"all"`` (each gene's count copied onto every ortholog,
        several genes summed onto one), as in :func:`sclcm.tl.embed`. Recorded in
        ``finetune_metrics``; give :func:`sclcm.tl.map_species` the same rule.
    freeze_layers
        Freeze the token embeddings and the lowest ``freeze_layers`` encoder blocks
        (0: train everything).
    max_steps, lr, weight_decay, warmup_steps
        AdamW optimizer steps, peak learning rate (cosine decay to a tenth), weight decay
        on matrices, linear warmup (default a tenth of ``max_steps``).
    class_weights
        Weight the loss by inverse class frequency (``n / (k * n_class)``), so rare types
        count as much as common ones.
    gene_dropout
        Share of each training cell's gene tokens left out at each step (a new draw every
        step; validation and annotation read every gene). It trains the classifier not to
        lean on any one gene, for a query that measures fewer of the model's genes than
        the reference: another technology, or another species through orthologs.
    val_fraction
        Share of the labelled cells (or, with ``groupby``, at least that share, in whole
        groups) held out for validation.
    val_every
        Validate every this many steps (default ``max_steps // 10``, at least 1).
    max_tokens
        Padded tokens per micro-batch (cells grouped by length).
    classifier_layers
        Layers of the head (default: the model config's).
    calibrate
        Fit a temperature on the validation cells after training (temperature scaling:
        the one scalar ``T`` that minimizes the cross-entropy of ``logits / T``), so that
        the probabilities :func:`sclcm.tl.annotate` thresholds are calibrated: a short
        fine-tuning leaves the head under-confident (most cells below 0.5 though most are
        right). The argmax, and so every label, is unchanged.
    out_dir
        Where to save the model (``save_pretrained``), ``labels.json`` and
        ``metrics.json``; ``None`` saves nothing.
    accelerator, devices, strategy, precision
        Lightning's, as in pretraining (``strategy="ddp"`` with ``devices=N`` trains on N
        ranks, each on its share of the training cells); ``precision="auto"``: bf16 mixed
        on a GPU, 32-bit elsewhere.
    checkpoint_every
        Write a resumable checkpoint (weights, optimizer, data position, best step so far)
        to ``out_dir/checkpoints`` every this many steps, and ``last.ckpt``; ``None``: none.
    resume
        ``"last"`` (``out_dir/checkpoints/last.ckpt``) or a checkpoint path: continue a
        killed run exactly (same batches, same dropout, same weights as an uninterrupted
        run). The other arguments must be those of the killed run.
    callbacks
        More Lightning callbacks.
    progress_bar
        Lightning's progress bar.
    seed
        Seeds the split, the initial head, the order of the cells and dropout.

    Returns
    -------
    CellModel
        The fine-tuned :class:`~sclcm.models.CellModel`, with the weights of its best
        validation macro-F1, its tokenizer, and ``labels`` (class names in the head's order),
        ``temperature`` (1 without ``calibrate``), ``reference_embedding`` (embeddings of up
        to 2,000 training cells, which :func:`sclcm.tl.annotate` measures each query cell's
        typicality against; saved as ``reference_embedding.npy``) and ``finetune_metrics``
        attributes.

    Raises
    ------
    sclcm.InputError
        ``label_key`` or ``groupby`` missing, all labels NaN, fewer than two classes, a
        class with fewer than ``MIN_CELLS_PER_CLASS`` cells (named), a split that
        leaves a class out of training, or no gene of the model's vocabulary.
    """
    from ..models import CellModel
    from ..tl._cells import CellTokens, check_tool_input
    from ..tl._model_ref import get_model
    from ._finetune_data import FinetuneData
    from ._run import quiet_lightning, resolve_precision

    codes, classes, groups = _check_labels(adata, label_key, groupby, layer)
    check_tool_input(adata, layer)
    if not 0 < val_fraction < 1:
        msg = f"val_fraction must be between 0 and 1 (exclusive), not {val_fraction!r}."
        raise ValueError(msg)
    if not 0 <= gene_dropout < 1:
        msg = f"gene_dropout must be in [0, 1), not {gene_dropout!r}."
        raise ValueError(msg)
    if max_steps < 1:
        msg = f"max_steps must be a positive number of optimizer steps, not {max_steps!r}."
        raise ValueError(msg)
    if (checkpoint_every or resume is not None) and out_dir is None:
        msg = ("checkpoint_every and resume need out_dir: the checkpoints live in "
               "out_dir/checkpoints.")
        raise InputError(msg)
    ckpt_path = _checkpoint(out_dir, resume)
    base = get_model(model)  # a CellModel stays where it is: its weights are copied
    if not 0 <= freeze_layers <= base.config.n_layers:
        msg = (f"freeze_layers must be between 0 and the model's {base.config.n_layers} "
               f"blocks, not {freeze_layers!r}.")
        raise ValueError(msg)
    train_rows, val_rows = _split(codes, classes, groups, val_fraction, seed)

    start = logg.info(f"fine-tuning on {len(train_rows)} cells ({len(val_rows)} validation), "
                      f"{len(classes)} classes of obs[{label_key!r}]")
    cells = CellTokens.prepare(adata, base.tokenizer, layer=layer, orthologs=orthologs)
    tokens, n_empty = _tokens(cells, np.flatnonzero(codes >= 0))
    if n_empty:
        logg.warning(f"{n_empty} labelled cells have no count on the model's genes: left out.")
    cells.warn_low_coverage()
    in_train = np.isin(tokens.cell_index, train_rows)
    train_tok = tokens.select(np.flatnonzero(in_train))
    val_tok = tokens.select(np.flatnonzero(~in_train))

    torch.manual_seed(seed)  # the new head's initial weights
    cfg = dataclasses.replace(base.config, n_classes=len(classes), **(
        {} if classifier_layers is None else {"classifier_layers": classifier_layers}))
    net = CellModel(cfg, vocab=base.vocab, tokenizer=base.tokenizer)
    state = {k: v for k, v in copy_.deepcopy(base.state_dict()).items()
             if not k.startswith("classifier.")}
    net.load_state_dict(state, strict=False)
    net.tie_weights()
    _freeze(net, freeze_layers)
    freeze_unused(net, train_tok.select(np.arange(min(8, train_tok.n_cells))))

    weights = None
    if class_weights:
        n_c = np.bincount(codes[train_rows], minlength=len(classes)).astype(np.float64)
        weights = len(train_rows) / (len(classes) * np.maximum(n_c, 1))
    module = FinetuneModule(net, np.where(codes >= 0, codes, 0), class_weights=weights,
                            lr=lr, weight_decay=weight_decay,
                            warmup_steps=max_steps // 10 if warmup_steps is None else
                            warmup_steps, max_steps=max_steps, seed=seed,
                            gene_dropout=gene_dropout)
    quiet_lightning()
    every = max(1, max_steps // 10) if val_every is None else int(val_every)
    callbacks = list(callbacks)
    if checkpoint_every:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(
            dirpath=Path(out_dir) / "checkpoints", filename="step-{step:07d}",
            auto_insert_metric_name=False, every_n_train_steps=int(checkpoint_every),
            save_top_k=-1, save_last=True))
    trainer = L.Trainer(max_steps=max_steps, max_epochs=-1, val_check_interval=every,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        accelerator=accelerator, devices=devices, strategy=strategy,
                        precision=resolve_precision(precision, accelerator),
                        logger=False, enable_checkpointing=bool(checkpoint_every),
                        callbacks=callbacks, enable_progress_bar=progress_bar,
                        enable_model_summary=False, gradient_clip_val=1.0,
                        default_root_dir=out_dir)
    data = FinetuneData(train_tok, val_tok, max_tokens=max_tokens, seed=seed)
    with warnings.catch_warnings():
        # Lightning 2.6 on torch >= 2.10 warns about its own use of torch's pytree API
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        warnings.filterwarnings("ignore", message=r".*does not have many workers")
        if ckpt_path is not None:  # resuming into the run's folder: it has checkpoints
            warnings.filterwarnings("ignore", message="Checkpoint directory .* not empty")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if not trainer.is_global_zero:  # DDP: rank 0 calibrates, saves and returns the model
        return net
    if module.best_state is not None:
        net.load_state_dict(module.best_state)
    net = net.cpu().eval()
    for p in net.parameters():
        p.requires_grad_(requires_grad=True)
    net.labels = list(classes)
    net.temperature = _temperature(net, val_tok, codes, max_tokens) if calibrate else 1.0
    keep = np.random.default_rng(seed).permutation(train_tok.n_cells)[:REFERENCE_CELLS]
    net.reference_embedding = _embeddings(net, train_tok.select(np.sort(keep)), max_tokens)
    metrics = {"label_key": label_key, "groupby": groupby, "best_step": module.best_step,
               "temperature": net.temperature,
               "best_val_macro_f1": module.best_f1, "n_train": int(train_tok.n_cells),
               "n_val": int(val_tok.n_cells), "val_history": module.history,
               "gene_dropout": gene_dropout,
               "orthologs": orthologs, "gene_coverage": cells.gene_coverage,
               "count_coverage": cells.count_coverage}
    net.finetune_metrics = metrics
    if out_dir is not None:
        net.save_pretrained(out_dir)
        save_labels(out_dir, classes, info={"label_key": label_key,
                                            "temperature": net.temperature})
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        np.save(Path(out_dir) / REFERENCE_FILE, net.reference_embedding)
    logg.info(f"    finished: best validation macro-F1 {module.best_f1:.3f} at step "
              f"{module.best_step}", time=start)
    return net


def _tokens(cells: Any, rows: np.ndarray) -> tuple[TokenBatch, int]:
    """The tokens of ``rows`` (reference rows), cells without a gene token left out."""
    from ..tokenizers import TokenBatch

    parts, n_empty = [], 0
    for first, batch, empty in cells.batches(desc="tokenizing"):
        pick = np.flatnonzero(np.isin(first + np.arange(batch.n_cells), rows) & ~empty)
        n_empty += int((np.isin(first + np.arange(batch.n_cells), rows) & empty).sum())
        parts.append(batch.select(pick))
    return TokenBatch.concat(parts), n_empty


def _temperature(model: CellModel, tokens: TokenBatch, codes: np.ndarray,
                 max_tokens: int) -> float:
    """The temperature that minimizes the cross-entropy of the validation cells' logits
    (Guo et al. 2017's temperature scaling), fitted on log T, with a standard normal prior
    on log T (a MAP estimate): where every validation cell is right, the cross-entropy
    alone falls without end as T goes to 0. T is kept within [0.05, 20]; after a short
    fine-tuning the head's logits are small and T is low (0.05 after 40 steps in
    tutorials/07_annotate.py, 0.3-0.8 after 120 steps in benchmarks/annotation.py)."""
    from ._finetune_data import val_batches

    logits, y = [], []
    model.eval()
    with torch.inference_mode():
        for mb in val_batches(tokens, max_tokens):
            inputs = model.inputs(mb.tokens, device=next(model.parameters()).device)
            logits.append(class_logits(model, inputs).float().cpu())
            y.append(torch.as_tensor(codes[mb.tokens.cell_index], dtype=torch.long))
    if not logits:
        return 1.0
    z, target = torch.cat(logits), torch.cat(y)
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        opt.zero_grad()
        loss = (F.cross_entropy(z / log_t.exp(), target, reduction="sum")
                + 0.5 * log_t**2) / len(target)
        loss.backward()
        return loss

    opt.step(nll)
    # a degenerate fit (every validation cell right with a huge margin) runs T to 0
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def _embeddings(model: CellModel, tokens: TokenBatch, max_tokens: int) -> np.ndarray:
    """float32 cell embeddings of ``tokens`` (as :func:`sclcm.tl.embed` writes them)."""
    from ._finetune_data import val_batches

    out = np.zeros((tokens.n_cells, model.config.d_model), dtype=np.float32)
    position = {c: i for i, c in enumerate(tokens.cell_index.tolist())}
    model.eval()
    with torch.inference_mode():
        for mb in val_batches(tokens, max_tokens):
            inputs = model.inputs(mb.tokens, device=next(model.parameters()).device)
            emb = model(**inputs, heads=False)["cell_embedding"].float().cpu().numpy()
            out[[position[c] for c in mb.tokens.cell_index.tolist()]] = emb
    return out


def _checkpoint(out_dir: str | Path | None, resume: str | Path | None) -> str | None:
    """The checkpoint to resume from (``"last"``: the run's ``last.ckpt``), checked."""
    if resume is None:
        return None
    path = Path(out_dir) / "checkpoints" / "last.ckpt" if str(resume) == "last" else \
        Path(resume).expanduser()
    if not path.is_file():
        msg = (f"No checkpoint to resume at {path}: pass resume='last' with the out_dir of a "
               "run that had checkpoint_every set, or the path of one of its .ckpt files.")
        raise InputError(msg)
    return str(path)


def freeze_unused(model: CellModel, tokens: TokenBatch) -> None:
    """Freeze the parameters the classification loss does not reach (the pretraining
    heads), found by one backward pass on ``tokens``: DDP waits for a gradient of every
    trainable parameter and fails on a step that gives none."""
    model.zero_grad(set_to_none=True)
    class_logits(model, model.inputs(tokens)).float().sum().backward()
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(requires_grad=False)
    model.zero_grad(set_to_none=True)


def _freeze(model: CellModel, n_layers: int) -> None:
    """Freeze the embeddings and the lowest ``n_layers`` blocks (0: nothing)."""
    if n_layers == 0:
        return
    for module in (model.embed_tokens, *model.encoder.blocks[:n_layers]):
        for p in module.parameters():
            p.requires_grad_(requires_grad=False)
