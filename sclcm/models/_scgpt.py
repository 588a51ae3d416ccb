"""Import a published scGPT checkpoint (``best_model.pt``, ``vocab.json``, ``args.json``).

scGPT's ``TransformerModel`` maps onto sclcm's ``scgpt`` family one for one: the gene
encoder (embedding + layer norm), the continuous value encoder (``linear1``, ReLU,
``linear2``, layer norm; values clamped at 512), post-norm ReLU blocks (eps 1e-5), the
three-layer expression decoder, the MVC decoder and, in fine-tuned checkpoints, the cell
classifier. ``best_model.pt`` is read with ``torch.load(weights_only=True)``: tensors only,
never an unpickled object. Loading is strict: every tensor of the checkpoint is placed or
named in the error, every shape is checked against ``args.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import logging as logg
from .._checks import InputError
from ..genes import GeneVocab
from ._config import ModelConfig, vocab_fields
from ._io import load_state, load_weights_only
from ._model import CellModel

#: Files of a published scGPT model directory.
WEIGHTS, VOCAB, ARGS = "best_model.pt", "vocab.json", "args.json"
#: scGPT's attention projections: torch's ``nn.MultiheadAttention`` layout, flash-attn's
#: packed ``Wqkv`` (``FlashMHA``) and the same wrapped in ``_impl`` (scGPT >= 0.2.4).
_QKV_LAYOUTS = (("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj"),
                ("self_attn.Wqkv.weight", "self_attn.Wqkv.bias", "self_attn.out_proj"),
                ("self_attn._impl.Wqkv.weight", "self_attn._impl.Wqkv.bias",
                 "self_attn._impl.out_proj"))
#: Modules of scGPT checkpoints sclcm has no place for, and what they are (for the error).
_KNOWN_EXTRA = {"decoder.zero_logit": "the expression decoder's zero-probability head "
                "(explicit_zero_prob)",
                "mvc_decoder.W_zero_logit": "the MVC decoder's zero-probability head",
                "grad_reverse_discriminator": "the batch discriminator of training (DAB)",
                "batch_encoder": "batch-label embeddings (use_batch_labels)",
                "dsbn": "domain-specific batch norm", "bn": "batch norm over the input"}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch checkpoint that holds a plain state dict (names to tensors).

    Read with ``torch.load(weights_only=True)``, which builds tensors and plain containers
    only: a pickle of any other object is refused before anything of it runs.

    Raises
    ------
    ~sclcm.InputError
        Naming the file and what it holds instead.
    """
    path = Path(path)
    sd = load_weights_only(path, "a plain state dict",
                           "Save the weights with torch.save(model.state_dict(), path).")
    if not isinstance(sd, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        what = type(sd).__name__
        if isinstance(sd, dict):
            bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)][:5]
            what = f"a dict whose entries {bad} are not tensors"
        msg = (f"{path} must hold a state dict (tensor names to tensors), not {what}; save "
               "the weights with torch.save(model.state_dict(), path).")
        raise InputError(msg)
    return dict(sd)


def _scgpt_vocab(path: Path, n_rows: int) -> tuple[GeneVocab, torch.Tensor]:
    """sclcm's vocabulary of scGPT's ``vocab.json`` and ``perm``: for each sclcm token, its
    row of scGPT's gene embedding (-1 for ``<mask>``, which scGPT's vocabulary lacks).

    Gene symbols become Ensembl IDs where sclcm's reference resolves them to a gene no
    earlier token took; the others keep their symbol (a key no data resolves to), so
    that every row of the checkpoint keeps its token."""
    tokens = json.loads(path.read_text())
    if not isinstance(tokens, dict) or sorted(tokens.values()) != list(range(len(tokens))):
        msg = f"{path} must map tokens to the ids 0..n-1 (scGPT's vocab.json)."
        raise InputError(msg)
    if len(tokens) != n_rows:
        msg = (f"{path} has {len(tokens)} tokens, but the checkpoint's gene embedding "
               f"(encoder.embedding.weight) has {n_rows} rows: they belong to different "
               "models.")
        raise InputError(msg)
    by_id = sorted(tokens, key=tokens.__getitem__)
    special = [t for t in by_id if t.startswith("<") and t.endswith(">")]
    for t in ("<pad>", "<cls>"):
        if t not in special:
            msg = f"{path} has no {t} token: not a scGPT vocabulary."
            raise InputError(msg)
    genes = [t for t in by_id if t not in special]
    keys = _ensembl_keys(genes)
    extra = [] if "<mask>" in special else ["<mask>"]  # sclcm masks values, never ids
    vocab = GeneVocab(keys, species="human", special_tokens=special + extra)
    perm = torch.tensor([tokens[t] for t in special] + [-1] * len(extra)
                        + [tokens[g] for g in genes])
    return vocab, perm


def _ensembl_keys(symbols: list[str]) -> list[str]:
    import anndata as ad
    import pandas as pd

    from ..genes import resolve

    report = resolve(ad.AnnData(var=pd.DataFrame(index=pd.Index(symbols))), "human",
                     count_coverage=False)
    keys, taken = [], set()
    for symbol, gene in zip(symbols, report.ensembl_id, strict=True):
        key = gene if gene is not None and gene not in taken else symbol
        taken.add(key)
        keys.append(key)
    n = sum(k != s for k, s in zip(keys, symbols, strict=True))
    logg.info(f"    {n} of {len(symbols)} scGPT genes resolved to Ensembl IDs")
    return keys


def import_scgpt(directory: str | Path, *, normalize: bool = True,
                 cls_value: float | None = None, drop: Sequence[str] = (),
                 attn_implementation: str = "auto") -> CellModel:
    """Load a scGPT checkpoint as a sclcm :class:`CellModel` with its tokenizer.

    Parameters
    ----------
    directory
        scGPT's model folder: ``best_model.pt`` (a state dict), ``vocab.json`` and
        ``args.json`` (as published for whole-human and the organ models).
    normalize
        L2-normalise the ``<cls>`` cell embedding, as scGPT's ``embed_data`` does
        (``config.normalize_embedding``); the decoders read it unnormalised, as scGPT's.
    cls_value
        The ``<cls>`` token's value; default ``pad_value`` of ``args.json``, as scGPT's
        ``embed_data`` feeds it.
    drop
        Modules of the checkpoint to leave out on purpose (e.g.
        ``["decoder.zero_logit"]``); any other tensor sclcm cannot place is an error.
    attn_implementation
        The model's attention backend (``config.attn_implementation``).

    Returns
    -------
    CellModel
        A ``CellModel`` of the ``scgpt`` family with ``model.vocab`` and ``model.tokenizer``
        (:class:`~sclcm.tokenizers.ScGPTTokenizer`: binned or continuous input as
        ``args.json``'s ``input_style``, its ``n_bins`` and ``max_seq_len``).

    Raises
    ------
    ~sclcm.InputError
        A file that is missing, not a plain state dict, or does not fit ``args.json``:
        naming each missing, unplaced or misshapen tensor. Nothing is returned half-loaded.

    Notes
    -----
    scGPT's vocabulary has no ``<mask>``: sclcm adds one (a zero row; scGPT masks values,
    never gene ids). Masked values enter as scGPT's ``mask_value`` does: the value
    encoder's output at that value becomes the mask vector. A one-class ``cls_decoder``
    (present, untrained, in every pretrained checkpoint) is left out; a fine-tuned one is
    kept (``n_classes``, ``classifier_layers``).
    """
    directory = Path(directory)
    for name in (ARGS, VOCAB, WEIGHTS):
        if not (directory / name).is_file():
            msg = (f"{directory} is not a scGPT model folder: {name} is missing (expected "
                   f"{ARGS}, {VOCAB} and {WEIGHTS}).")
            raise FileNotFoundError(msg)
    args = json.loads((directory / ARGS).read_text())
    sd = read_state_dict(directory / WEIGHTS)
    _check_args(args, directory / ARGS)
    if "encoder.embedding.weight" not in sd:
        msg = (f"{directory / WEIGHTS} has no encoder.embedding.weight: not a scGPT "
               "TransformerModel state dict.")
        raise InputError(msg)
    vocab, perm = _scgpt_vocab(directory / VOCAB, sd["encoder.embedding.weight"].shape[0])
    n_layers, d = int(args["nlayers"]), int(args["embsize"])
    cls_out = sd.get("cls_decoder.out_layer.weight")
    n_cls = 0 if cls_out is None or cls_out.shape[0] <= 1 else int(cls_out.shape[0])
    config = ModelConfig.preset(
        "scgpt", "base", **vocab_fields(vocab), n_layers=n_layers, d_model=d,
        n_heads=int(args["nheads"]), d_ff=int(args["d_hid"]), norm="post", activation="relu",
        norm_eps=1e-5, dropout=float(args.get("dropout", 0.2)),
        attn_dropout=float(args.get("dropout", 0.2)), embed_norm=False, gene_norm=True,
        value_encoder="continuous", value_clamp=512.0, n_bins=int(args.get("n_bins", 51)),
        objective="value", value_head_layers=3, mvc="mvc_decoder.W.weight" in sd,
        n_classes=n_cls, classifier_layers=int(args.get("n_layers_cls", 3)),
        pooling="cls", normalize_embedding=normalize, attn_implementation=attn_implementation,
        extra={"imported_from": "scgpt", "input_style": args.get("input_style", "binned"),
               "pad_value": args.get("pad_value", -2), "mask_value": args.get("mask_value", -1)})
    ours, source = _map_tensors(sd, config, perm, n_cls=n_cls, drop=drop,
                                where=directory / WEIGHTS)
    with torch.device("meta"):
        model = CellModel(config, vocab=vocab)
    _check_shapes(model, ours, source, directory / WEIGHTS)
    ours["embed_tokens.values.mask"] = _mask_vector(ours, float(args.get("mask_value", -1)),
                                                    config)
    load_state(model, ours, source=str(directory / WEIGHTS))

    from ..tokenizers import ScGPTTokenizer

    model.attach_tokenizer(ScGPTTokenizer(
        vocab, max_len=int(args.get("max_seq_len", 1200)), n_bins=config.n_bins,
        binned=args.get("input_style", "binned") == "binned",
        cls_value=float(args.get("pad_value", -2) if cls_value is None else cls_value)))
    return model


def _check_args(args: Any, path: Path) -> None:
    """Refuse what sclcm's scgpt family does not build, naming the entry of ``args.json``."""
    if not isinstance(args, dict):
        msg = f"{path} must hold scGPT's training arguments (a mapping)."
        raise InputError(msg)
    missing = [k for k in ("embsize", "nheads", "d_hid", "nlayers") if k not in args]
    if missing:
        msg = f"{path} lacks {missing}: the model's shape is unknown."
        raise InputError(msg)
    unsupported = {"input_emb_style": ("continuous",), "input_style": ("binned", "log1p"),
                   "cell_emb_style": ("cls",), "pad_token": ("<pad>",)}
    problems = [f"{k}={args[k]!r} (sclcm reads {' or '.join(map(repr, ok))})"
                for k, ok in unsupported.items() if k in args and args[k] not in ok]
    problems += [f"{k}=true" for k in ("pre_norm", "use_batch_labels", "DSBN",
                                       "domain_spec_batchnorm") if args.get(k)]
    if problems:
        msg = f"{path}: sclcm cannot import a scGPT model with " + "; ".join(problems) + "."
        raise InputError(msg)


def _map_tensors(sd: dict[str, torch.Tensor], config: ModelConfig, perm: torch.Tensor, *,
                 n_cls: int, drop: Sequence[str], where: Path
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """sclcm's state dict from scGPT's, and for each sclcm name the scGPT one it came from."""
    used: set[str] = set()
    ours: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    missing: list[str] = []

    def put(our: str, theirs: str, fn: Any = None) -> None:
        if theirs not in sd:
            missing.append(theirs)
            return
        used.add(theirs)
        ours[our], source[our] = (sd[theirs] if fn is None else fn(sd[theirs])), theirs

    def linear(our: str, theirs: str, *, bias: bool = True) -> None:
        put(f"{our}.weight", f"{theirs}.weight")
        if bias:
            put(f"{our}.bias", f"{theirs}.bias")

    def genes(w: torch.Tensor) -> torch.Tensor:  # sclcm's token order; <mask> a zero row
        return torch.cat([w, w.new_zeros(1, w.shape[1])])[perm]

    put("embed_tokens.genes.weight", "encoder.embedding.weight", genes)
    linear("embed_tokens.gene_norm", "encoder.enc_norm")
    linear("embed_tokens.values.fc1", "value_encoder.linear1")
    linear("embed_tokens.values.fc2", "value_encoder.linear2")
    linear("embed_tokens.values.norm", "value_encoder.norm")
    for i in range(config.n_layers):
        theirs, our = f"transformer_encoder.layers.{i}.", f"encoder.blocks.{i}."
        layout = next((lay for lay in _QKV_LAYOUTS if theirs + lay[0] in sd), _QKV_LAYOUTS[0])
        put(our + "attn.qkv.weight", theirs + layout[0])
        put(our + "attn.qkv.bias", theirs + layout[1])
        linear(our + "attn.proj", theirs + layout[2])
        linear(our + "mlp.fc1", theirs + "linear1")
        linear(our + "mlp.fc2", theirs + "linear2")
        linear(our + "ln_1", theirs + "norm1")
        linear(our + "ln_2", theirs + "norm2")
    for j, k in enumerate((0, 2, 4), start=1):  # Linear, LeakyReLU, Linear, LeakyReLU, Linear
        linear(f"head.fc{j}", f"decoder.fc.{k}")
    if config.mvc:
        linear("mvc.query", "mvc_decoder.gene2query")
        # scGPT: <W q_g, h_c>; sclcm: <q_g, W' h_c>, so W' = W transposed
        put("mvc.cell.weight", "mvc_decoder.W.weight", lambda w: w.T.contiguous())
    cls_keys = [k for k in sd if k.startswith("cls_decoder.")]
    if n_cls:
        for j in range(config.classifier_layers - 1):
            linear(f"classifier.hidden.{j}.0", f"cls_decoder._decoder.{3 * j}")
            linear(f"classifier.hidden.{j}.2", f"cls_decoder._decoder.{3 * j + 2}")
        linear("classifier.out", "cls_decoder.out_layer")
    elif cls_keys:  # the one-class placeholder every pretrained TransformerModel carries
        used.update(cls_keys)
        logg.info("    not used: cls_decoder (a one-class placeholder of pretraining)")
    dropped = [k for k in sd if k not in used and any(k == p or k.startswith(p + ".")
                                                    for p in drop)]
    left = sorted(set(sd) - used - set(dropped))
    if missing or left:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:8]}")
        if left:
            hints = sorted({f"{p} ({what})" for p, what in _KNOWN_EXTRA.items()
                            for k in left if k.startswith(p + ".")})
            parts.append(f"tensors sclcm cannot place {left[:8]}"
                         + (f", of {'; '.join(hints)}: pass drop=[...] with the module to "
                            "leave it out on purpose" if hints else ""))
        msg = f"{where} does not fit a scGPT model of its args.json: " + "; ".join(parts) + "."
        raise InputError(msg)
    if dropped:
        logg.info(f"    left out on request: {dropped[:8]}")
    return ours, source


def _check_shapes(model: CellModel, ours: dict[str, torch.Tensor], source: dict[str, str],
                  where: Path) -> None:
    want = model.state_dict()
    bad = [f"{source[k]} has shape {tuple(v.shape)}, args.json says {tuple(want[k].shape)}"
           for k, v in ours.items() if k in want and tuple(v.shape) != tuple(want[k].shape)]
    if bad:
        msg = f"{where} does not fit its args.json: " + "; ".join(bad[:8]) + "."
        raise InputError(msg)


def _mask_vector(ours: dict[str, torch.Tensor], mask_value: float,
                 config: ModelConfig) -> torch.Tensor:
    """What scGPT's value encoder makes of ``mask_value``: sclcm's mask vector."""
    p = "embed_tokens.values."
    v = torch.tensor([[min(mask_value, config.value_clamp)]], dtype=ours[p + "fc1.weight"].dtype)
    h = F.linear(F.relu(F.linear(v, ours[p + "fc1.weight"], ours[p + "fc1.bias"])),
                 ours[p + "fc2.weight"], ours[p + "fc2.bias"])
    return F.layer_norm(h, h.shape[-1:], ours[p + "norm.weight"], ours[p + "norm.bias"],
                        config.norm_eps)[0]


def write_scgpt_checkpoint(directory: str | Path, genes: Sequence[str], *, n_layers: int = 12,
                           d_model: int = 512, n_heads: int = 8, d_ff: int = 512,
                           input_style: str = "binned", mvc: bool = True, seed: int = 0,
                           std: float = 0.05) -> dict[str, torch.Tensor]:
    """Write a random checkpoint in scGPT's published layout (torch's attention names):
    ``best_model.pt``, ``vocab.json`` (``genes``, then ``<pad>``, ``<cls>``, ``<eoc>``) and
    ``args.json``; for trying the import and the tools offline. Returns the state dict.

    The default shape is whole-human's (12 x 512, 8 heads, ``d_hid`` 512).
    """
    directory = Path(directory)
    tokens = {t: i for i, t in enumerate([*dict.fromkeys(genes), "<pad>", "<cls>", "<eoc>"])}
    d = d_model
    # name -> (out, in) of a linear layer, or the width of a layer norm
    layers: dict[str, tuple[int, int] | int] = {
        "value_encoder.linear1": (d, 1), "value_encoder.linear2": (d, d),
        "value_encoder.norm": d, "encoder.enc_norm": d, "decoder.fc.0": (d, d),
        "decoder.fc.2": (d, d), "decoder.fc.4": (1, d), "cls_decoder.out_layer": (1, d)}
    for j in range(2):  # scGPT's 3-layer ClsDecoder, a one-class placeholder in pretraining
        layers[f"cls_decoder._decoder.{3 * j}"], layers[f"cls_decoder._decoder.{3 * j + 2}"] = \
            (d, d), d
    if mvc:
        layers["mvc_decoder.gene2query"] = (d, d)
    for i in range(n_layers):
        p = f"transformer_encoder.layers.{i}."
        layers.update({p + "self_attn.out_proj": (d, d), p + "linear1": (d_ff, d),
                       p + "linear2": (d, d_ff), p + "norm1": d, p + "norm2": d})
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    sd = {"encoder.embedding.weight": rand(len(tokens), d)}
    for name, shape in layers.items():
        if isinstance(shape, int):  # layer norm: weights around 1
            sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + rand(shape), rand(shape)
        else:
            sd[f"{name}.weight"], sd[f"{name}.bias"] = rand(*shape), rand(shape[0])
    for i in range(n_layers):
        p = f"transformer_encoder.layers.{i}.self_attn."
        sd[p + "in_proj_weight"], sd[p + "in_proj_bias"] = rand(3 * d, d), rand(3 * d)
    if mvc:
        sd["mvc_decoder.W.weight"] = rand(d, d)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(sd, directory / WEIGHTS)
    (directory / VOCAB).write_text(json.dumps(tokens))
    (directory / ARGS).write_text(json.dumps(
        {"nlayers": n_layers, "embsize": d, "nheads": n_heads, "d_hid": d_ff,
         "n_layers_cls": 3, "dropout": 0.2, "pad_token": "<pad>", "pad_value": -2,
         "mask_value": -1, "n_bins": 51, "input_style": input_style,
         "input_emb_style": "continuous", "max_seq_len": 1200, "MVC": mvc}))
    return sd
