"""Import scFoundation's published encoder (``models.ckpt``) into sclcm.

The checkpoint is a dict of models (``gene``, ``cell``, ``rde``), each with its ``config``
and ``state_dict`` (``model.``-prefixed names), read with ``torch.load(weights_only=True)``.
scFoundation's encoder maps onto sclcm's ``scfoundation`` family one for one: gene identity
by its row of ``pos_emb`` (the fixed 19,264-gene order, then T and S), auto-discretization
of the value (leaky ReLU slope 0.1), post-norm torch encoder layers and a final layer norm.
Its decoder, a Performer (random-feature attention, :mod:`._performer`) over all genes, maps
onto sclcm's scFoundation decoder with ``decoder_attention="performer"``: expression
prediction (``decoder_pred``, read-depth aware) and its gene embeddings
(``decoder_hidden_state``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import logging as logg
from .._checks import InputError
from ..genes import GeneVocab
from ._config import ModelConfig, vocab_fields
from ._io import load_state, load_weights_only
from ._model import CellModel

#: Modules of the checkpoint that belong to the Performer decoder.
DECODER = ("decoder.", "decoder_embed.", "norm.", "to_final.")
#: The published Performer's prefix and its training-only redraw counter.
PERFORMER = "decoder.performer."
REDRAW_COUNTER = "decoder.performer.calls_since_last_redraw"
#: Special tokens sclcm's vocabulary needs (scFoundation has none: rows of zeros).
SPECIAL = ("<pad>", "<mask>")


def read_checkpoint(path: str | Path, key: str = "cell") -> tuple[dict[str, Any],
                                                                 dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of model ``key`` in scFoundation's ``models.ckpt``, the
    ``model.`` prefix removed and the config flattened as scFoundation's loader does."""
    path = Path(path)
    ckpt = load_weights_only(path, "a checkpoint")
    if not isinstance(ckpt, dict) or key not in ckpt or not isinstance(ckpt[key], dict):
        found = list(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        msg = f"{path} has no model {key!r} (scFoundation's models.ckpt holds {found})."
        raise InputError(msg)
    part = ckpt[key]
    if not {"config", "state_dict"} <= set(part):
        msg = f"{path}[{key!r}] must hold 'config' and 'state_dict', not {sorted(part)}."
        raise InputError(msg)
    raw = part["config"]
    model_type = raw.get("model", "mae_autobin")
    config = {**raw.get("model_config", {}).get(model_type, {}),
              **raw.get("dataset_config", {}).get("rnaseq", {}), "model": model_type}
    sd = part["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        msg = f"{path}[{key!r}]['state_dict'] must map tensor names to tensors."
        raise InputError(msg)
    return config, {k.removeprefix("model."): v for k, v in sd.items()}


def _gene_vocab(gene_list: str | Path, n_genes: int) -> GeneVocab:
    import pandas as pd

    table = pd.read_csv(gene_list, sep="\t")
    if "gene_name" not in table or len(table) != n_genes:
        msg = (f"{gene_list} must be scFoundation's gene index (a 'gene_name' column, "
               f"{n_genes} rows in the model's order), not {len(table)} rows of "
               f"{list(table.columns)}.")
        raise InputError(msg)
    from ._scgpt import _ensembl_keys

    return GeneVocab(_ensembl_keys(table["gene_name"].astype(str).tolist()), species="human",
                     special_tokens=SPECIAL)


def import_scfoundation(checkpoint: str | Path, gene_list: str | Path, *,
                        key: str = "cell", decoder: bool = True) -> CellModel:
    """Load scFoundation's encoder as a sclcm :class:`CellModel` with its tokenizer.

    Parameters
    ----------
    checkpoint
        scFoundation's ``models.ckpt``.
    gene_list
        Its gene index, ``OS_scRNA_gene_index.19264.tsv`` (``gene_name`` in the model's
        order); symbols are resolved to Ensembl IDs where sclcm's reference knows them.
    key
        Which model of the checkpoint: ``"cell"`` (cell embeddings), ``"gene"`` or
        ``"rde"`` (read-depth enhancement).
    decoder
        Build the Performer decoder too (``objective="depth_value"``: the model's forward
        with ``decoder_gene_ids`` predicts expression); ``False`` leaves it out (the
        encoder alone: embeddings, a smaller model).

    Returns
    -------
    CellModel
        A ``CellModel`` of the ``scfoundation`` family with an
        :class:`~sclcm.tokenizers.ScFoundationTokenizer` attached. Its ``cell_embedding`` is the
        mean over genes; :func:`scfoundation_cell_embedding` gives scFoundation's
        ``[S, T, max, mean]``.

    Raises
    ------
    ~sclcm.InputError
        A checkpoint that is not a plain one, a tensor that is missing, cannot be placed or
        has the wrong shape (each named), a configuration sclcm does not build.
    """
    config_raw, sd = read_checkpoint(checkpoint, key)
    enc = config_raw.get("encoder", {})
    problems = []
    if config_raw.get("model") != "mae_autobin":
        problems.append(f"model {config_raw.get('model')!r} (sclcm reads 'mae_autobin')")
    if enc.get("module_type") != "transformer":
        problems.append(f"encoder module_type {enc.get('module_type')!r} (sclcm reads "
                        "'transformer')")
    if float(config_raw.get("bin_alpha", 1.0)) != 1.0:
        problems.append(f"bin_alpha {config_raw.get('bin_alpha')} (sclcm's is 1.0)")
    dec = config_raw.get("decoder", {})
    dec_fields: dict[str, Any] = dict(decoder_layers=0, decoder_d_model=0, decoder_heads=0,
                                      decoder_d_ff=0, objective="none")
    if decoder:
        if dec.get("module_type") != "performer":
            problems.append(f"decoder module_type {dec.get('module_type')!r} (sclcm reads "
                            "'performer'; decoder=False imports the encoder alone)")
        elif int(dec.get("dim_head", 64)) * int(dec["heads"]) != int(dec["hidden_dim"]):
            problems.append(f"decoder heads x dim_head = {dec['heads']} x "
                            f"{dec.get('dim_head', 64)} != hidden_dim {dec['hidden_dim']}")
        else:
            projection = sd.get(f"{PERFORMER}net.layers.0.0.fn.fast_attention."
                                "projection_matrix")
            dd = int(dec["hidden_dim"])
            dec_fields = dict(
                decoder_layers=int(dec["depth"]), decoder_d_model=dd,
                decoder_heads=int(dec["heads"]), decoder_d_ff=4 * dd,
                decoder_attention="performer", decoder_gene_embedding=True,
                decoder_features=int(projection.shape[0]) if projection is not None else 1,
                objective="depth_value", value_head_layers=1)
    if problems:
        msg = f"{checkpoint}: sclcm cannot import " + "; ".join(problems) + "."
        raise InputError(msg)
    pos = sd.get("pos_emb.weight")
    if pos is None:
        msg = f"{checkpoint}[{key!r}] has no pos_emb.weight: not scFoundation's MaeAutobin."
        raise InputError(msg)
    n_genes = int(config_raw.get("seq_len", pos.shape[0] - 1)) - 2  # then T and S
    vocab = _gene_vocab(gene_list, n_genes)
    d = int(enc["hidden_dim"])
    config = ModelConfig.preset(
        "scfoundation", "base", **vocab_fields(vocab), n_layers=int(enc["depth"]), d_model=d,
        n_heads=int(enc["heads"]), d_ff=4 * d, norm="post", final_norm=True, activation="relu",
        norm_eps=1e-5, dropout=0.1, attn_dropout=0.1, embed_norm=False,
        n_bins=int(config_raw.get("bin_num", 100)), autobin_slope=0.1, pooling="mean",
        **dec_fields,
        extra={"imported_from": "scfoundation", "key": key,
               "mask_value": config_raw.get("mask_token_id"),
               "pad_value": config_raw.get("pad_token_id")})
    ours, source, used, absent = _map(sd, config, n_genes)
    left_out = [] if decoder else sorted(k for k in sd if k.startswith(DECODER))
    left = sorted(set(sd) - used - set(left_out))
    with torch.device("meta"):
        model = CellModel(config, vocab=vocab)
    want = model.state_dict()
    missing = absent + sorted(set(want) - set(ours) - set(source))
    bad = [f"{source[k]} has shape {tuple(v.shape)}, the config says {tuple(want[k].shape)}"
           for k, v in ours.items() if k in want and v.shape != want[k].shape]
    if left or missing or bad:
        parts = ([f"tensors sclcm cannot place {left[:8]}"] if left else []) + \
            ([f"missing {missing[:8]}"] if missing else []) + bad[:8]
        msg = f"{checkpoint}[{key!r}] does not fit its config: " + "; ".join(parts) + "."
        raise InputError(msg)
    logg.info("    not used: " + (f"the Performer decoder ({len(left_out)} tensors), "
                                 if left_out else "")
              + "token_emb.emb_pad (packed cells have no padding)")
    load_state(model, ours, source=f"{checkpoint}[{key!r}]")
    from ..tokenizers import ScFoundationTokenizer

    model.attach_tokenizer(ScFoundationTokenizer(vocab))
    return model


def _map(sd: dict[str, torch.Tensor], config: ModelConfig, n_genes: int
         ) -> tuple[dict[str, torch.Tensor], dict[str, str], set[str], list[str]]:
    """sclcm's tensors, the scFoundation name of each, the names used and those missing."""
    ours: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    used: set[str] = set()
    absent: list[str] = []

    def put(our: str, theirs: str, fn: Any = None) -> None:
        if theirs not in sd:
            absent.append(theirs)
            source[our] = theirs
            return
        used.add(theirs)
        ours[our], source[our] = (sd[theirs] if fn is None else fn(sd[theirs])), theirs

    n_special = len(SPECIAL)
    pos = sd["pos_emb.weight"]
    if pos.shape[0] < n_genes + 2:
        msg = f"pos_emb.weight has {pos.shape[0]} rows, fewer than {n_genes} genes + T + S."
        raise InputError(msg)
    # gene rows in the model's order after sclcm's special tokens (zero rows: never read)
    put("embed_tokens.genes.weight", "pos_emb.weight",
        lambda w: torch.cat([w.new_zeros(n_special, w.shape[1]), w[:n_genes]]))
    ours["embed_tokens.depth.weight"] = pos[n_genes:n_genes + 2]  # T, S
    source["embed_tokens.depth.weight"] = "pos_emb.weight"
    for p in ("weight", "bias"):
        put(f"embed_tokens.values.fc1.{p}", f"token_emb.mlp.{p}")
        put(f"embed_tokens.values.fc2.{p}", f"token_emb.mlp2.{p}")
    put("embed_tokens.values.bins", "token_emb.emb.weight")
    put("embed_tokens.values.mask", "token_emb.emb_mask.weight", lambda w: w[0])
    used.add("token_emb.emb_pad.weight")
    for i in range(config.n_layers):
        theirs, our = f"encoder.transformer_encoder.{i}.", f"encoder.blocks.{i}."
        for p in ("weight", "bias"):
            put(our + f"attn.qkv.{p}", theirs + f"self_attn.in_proj_{p}")
            for a, b in (("attn.proj", "self_attn.out_proj"), ("mlp.fc1", "linear1"),
                         ("mlp.fc2", "linear2"), ("ln_1", "norm1"), ("ln_2", "norm2")):
                put(our + f"{a}.{p}", theirs + f"{b}.{p}")
    for p in ("weight", "bias"):
        put(f"encoder.ln_f.{p}", f"encoder.norm.{p}")
    if config.decoder_attention == "performer":
        _map_performer(put, config.decoder_layers)
        used.add(REDRAW_COUNTER)  # a training counter: the projections are fixed here
    return ours, source, used, absent


def _map_performer(put: Any, n_layers: int) -> None:
    """The published decoder: ``decoder_embed``, the Performer's blocks (``net.layers.i.0``
    attention, ``.1`` feed-forward, each under its pre-norm wrapper), its final norm, the
    model's ``norm`` and ``to_final``."""
    for p in ("weight", "bias"):
        put(f"decoder_in.{p}", f"decoder_embed.{p}")
        put(f"decoder.ln_f.{p}", f"decoder.norm.{p}")
        put(f"decoder.ln_out.{p}", f"norm.{p}")
        put(f"head.fc1.{p}", f"to_final.{p}")
    for i in range(n_layers):
        theirs, our = f"{PERFORMER}net.layers.{i}.", f"decoder.blocks.{i}."
        put(our + "attn.projection", theirs + "0.fn.fast_attention.projection_matrix")
        for p in ("weight", "bias"):
            put(our + f"ln_1.{p}", theirs + f"0.norm.{p}")
            put(our + f"ln_2.{p}", theirs + f"1.norm.{p}")
            for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj", "to_out")):
                put(our + f"attn.{a}.{p}", theirs + f"0.fn.{b}.{p}")
            put(our + f"mlp.fc1.{p}", theirs + f"1.fn.fn.w1.{p}")
            put(our + f"mlp.fc2.{p}", theirs + f"1.fn.fn.w2.{p}")


@torch.inference_mode()
def scfoundation_cell_embedding(model: CellModel, batch: Any) -> torch.Tensor:
    """scFoundation's cell embedding, ``n_cells x 4 d``: the states of S and T, then the
    max and the mean over the cell's genes (its ``get_embedding.py``, ``pool_type="all"``)."""
    out = model.eval()(**model.inputs(batch), heads=False)
    h_td, offsets = out["last_hidden_state"], out["offsets"]
    rows = []
    for c in range(len(offsets) - 1):
        a, b = int(offsets[c]), int(offsets[c + 1])
        genes = h_td[a + 2:b]  # the encoder puts T, S first
        rows.append(torch.cat([h_td[a + 1], h_td[a], genes.max(0).values, genes.mean(0)]))
    return torch.stack(rows)
