"""Import a published Geneformer checkpoint (Hugging Face ``BertForMaskedLM``) into sclcm.

The checkpoint's token and gene-median dictionaries are pickles; they are read with an
unpickler that builds nothing but plain containers, strings and numbers (numpy numeric
scalars included), so a pickle that names any class or function is refused, never run.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from .. import logging as logg
from ..genes import GeneVocab
from ._config import ModelConfig, vocab_fields
from ._io import load_state
from ._model import CellModel

_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}
_NUMERIC_KINDS = "biuf"


def _numpy_dtype(name: Any, *_: Any) -> np.dtype:
    dtype = np.dtype(name) if isinstance(name, str) else None
    if dtype is None or dtype.kind not in _NUMERIC_KINDS:
        msg = f"refusing a numpy dtype {name!r}: only numeric dtypes are admitted"
        raise pickle.UnpicklingError(msg)
    return dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or \
            not isinstance(data, bytes) or len(data) != dtype.itemsize:
        msg = "refusing a numpy scalar that is not a plain number"
        raise pickle.UnpicklingError(msg)
    return np.frombuffer(data, dtype=dtype)[0].item()


def _latin1_bytes(text: Any, encoding: Any = None) -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        msg = "refusing a _codecs.encode call that is not pickle's latin1 bytes"
        raise pickle.UnpicklingError(msg)
    return text.encode("latin1")


# numpy pickles its scalars as scalar(dtype, bytes), and pickle protocol 2 writes bytes as
# _codecs.encode(str, "latin1"); these callables are re-implemented above so that only
# numbers (and the bytes they are made of) can come out of them.
_ADMITTED = {("numpy", "dtype"): _numpy_dtype,
             ("numpy.core.multiarray", "scalar"): _numpy_scalar,
             ("numpy._core.multiarray", "scalar"): _numpy_scalar,
             ("_codecs", "encode"): _latin1_bytes}


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ADMITTED:
            return _ADMITTED[module, name]
        msg = (f"refusing to load {module}.{name}: only dictionaries of strings and numbers "
               "are read from pickles")
        raise pickle.UnpicklingError(msg)

    def persistent_load(self, pid: Any) -> Any:
        msg = "refusing a pickle with persistent references"
        raise pickle.UnpicklingError(msg)


def load_plain_dict(path: str | Path) -> dict[str, int | float]:
    """Read a pickled ``dict`` whose keys are strings and values strings or numbers.

    Raises ``ValueError`` for anything else (class instances, functions, nested
    containers), without executing any code from the file.
    """
    path = Path(path)
    try:
        obj = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:  # any failure means: not a plain dictionary pickle
        msg = f"{path} is not a plain dictionary pickle: {e}."
        raise ValueError(msg) from None
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int | float) and not isinstance(v, bool)
            for k, v in obj.items()):
        msg = f"{path} must hold a dict of strings to numbers, not {type(obj).__name__} of other."
        raise ValueError(msg)
    return obj


def _find_file(directory: Path, given: str | Path | None, pattern: str, what: str) -> Path:
    if given is not None:
        return Path(given)
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        msg = (f"Found {len(found)} {what} files ({pattern}) in {directory}"
               + (f": {[p.name for p in found]}" if found else "")
               + f"; pass {what}= with the one that belongs to this checkpoint.")
        raise FileNotFoundError(msg)
    return found[0]


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").is_file():
        return load_file(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():  # a torch zip: tensors only, no code
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    msg = f"No model.safetensors or pytorch_model.bin in {directory} (sharded checkpoints " \
          "are not supported)."
    raise FileNotFoundError(msg)


def import_geneformer(directory: str | Path, *, token_dictionary: str | Path | None = None,
                      gene_median_dictionary: str | Path | None = None,
                      species: str = "human") -> CellModel:
    """Load a Geneformer checkpoint as a sclcm :class:`CellModel` with its tokenizer.

    Parameters
    ----------
    directory
        A Hugging Face checkpoint: ``config.json`` and ``model.safetensors`` or
        ``pytorch_model.bin`` of a ``BertForMaskedLM`` (or a plain ``BertModel``).
    token_dictionary, gene_median_dictionary
        Geneformer's pickles (Ensembl ID -> token id, Ensembl ID -> non-zero median); by
        default the one ``*token_dictionary*.pkl`` and ``*median*.pkl`` in ``directory``.
    species
        Species of the Ensembl IDs.

    Returns
    -------
    CellModel
        A ``CellModel`` (preset ``geneformer``) whose weights are the checkpoint's, one for one
        (query, key and value are stacked into one projection), with ``model.vocab`` and
        ``model.tokenizer`` set.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        msg = f"{directory} has no config.json: not a Hugging Face checkpoint directory."
        raise FileNotFoundError(msg)
    hf = json.loads((directory / "config.json").read_text())
    if hf.get("model_type") != "bert" or hf.get("position_embedding_type",
                                                 "absolute") != "absolute":
        msg = (f"{directory} holds a {hf.get('model_type')!r} model; import_geneformer reads "
               "BERT checkpoints with absolute positions (Geneformer).")
        raise ValueError(msg)
    if hf.get("hidden_act") not in _ACTIVATIONS:
        msg = f"Unsupported hidden_act {hf.get('hidden_act')!r} in {directory / 'config.json'}."
        raise ValueError(msg)
    tokens = load_plain_dict(_find_file(directory, token_dictionary, "*token_dictionary*.pkl",
                                        "token_dictionary"))
    medians = load_plain_dict(_find_file(directory, gene_median_dictionary, "*median*.pkl",
                                         "gene_median_dictionary"))

    # Special tokens (<pad>, <mask>, and in V2 <cls>, <eos>) first, then genes, by id.
    by_id = sorted(tokens, key=tokens.__getitem__)
    if sorted(tokens.values()) != list(range(len(tokens))) or len(tokens) != hf["vocab_size"]:
        msg = (f"The token dictionary ({len(tokens)} tokens) must number its tokens 0..n-1 and "
               f"match the checkpoint's vocab_size ({hf['vocab_size']}).")
        raise ValueError(msg)
    special = [t for t in by_id if t.startswith("<") and t.endswith(">")]
    vocab = GeneVocab([t for t in by_id if t not in special], species=species,
                      special_tokens=special)
    perm = torch.tensor([tokens[t] for t in vocab.tokens])  # sclcm id -> checkpoint id

    sd = {k.removeprefix("bert."): v for k, v in _read_weights(directory).items()}
    has_head = any(k.startswith("cls.predictions.") for k in sd)
    word = sd["embeddings.word_embeddings.weight"]
    dec_w = sd.get("cls.predictions.decoder.weight")
    tied = hf.get("tie_word_embeddings", True) and (dec_w is None or torch.equal(dec_w, word))
    config = ModelConfig.preset(
        "geneformer", "small", **vocab_fields(vocab), n_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], activation=_ACTIVATIONS[hf["hidden_act"]],
        norm_eps=hf.get("layer_norm_eps", 1e-12), dropout=hf.get("hidden_dropout_prob", 0.1),
        attn_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        max_position=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
        objective="mlm" if has_head else "none", tie_word_embeddings=tied,
        initializer_range=hf.get("initializer_range", 0.02),
        extra={"imported_from": "geneformer", "architectures": hf.get("architectures")})

    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        for alias in (name, name.replace(".weight", ".gamma").replace(".bias", ".beta")):
            if alias in sd:
                used.add(alias)
                return sd[alias]
        msg = f"The checkpoint in {directory} has no tensor {name!r}."
        raise ValueError(msg)

    ours = {"embed_tokens.genes.weight": take("embeddings.word_embeddings.weight")[perm],
            "embed_tokens.positions.weight": take("embeddings.position_embeddings.weight"),
            "embed_tokens.token_types.weight": take("embeddings.token_type_embeddings.weight")}
    pairs = {"embed_tokens.norm": "embeddings.LayerNorm"}
    for i in range(config.n_layers):
        hf_l, our = f"encoder.layer.{i}.", f"encoder.blocks.{i}."
        for p in ("weight", "bias"):
            ours[our + f"attn.qkv.{p}"] = torch.cat(
                [take(hf_l + f"attention.self.{x}.{p}") for x in ("query", "key", "value")])
        pairs.update({our + "attn.proj": hf_l + "attention.output.dense",
                      our + "ln_1": hf_l + "attention.output.LayerNorm",
                      our + "mlp.fc1": hf_l + "intermediate.dense",
                      our + "mlp.fc2": hf_l + "output.dense",
                      our + "ln_2": hf_l + "output.LayerNorm"})
    if has_head:
        pairs.update({"head.dense": "cls.predictions.transform.dense",
                      "head.norm": "cls.predictions.transform.LayerNorm"})
        bias_key = "cls.predictions.bias" if "cls.predictions.bias" in sd \
            else "cls.predictions.decoder.bias"
        ours["head.decoder.bias"] = take(bias_key)[perm]
        used.add("cls.predictions.decoder.bias")
        if dec_w is not None:
            used.add("cls.predictions.decoder.weight")
            if not tied:
                ours["head.decoder.weight"] = dec_w[perm]
    for our, theirs in pairs.items():
        for p in ("weight", "bias"):
            ours[f"{our}.{p}"] = take(f"{theirs}.{p}")
    ignored = [k for k in sd if k not in used and (k.endswith("position_ids")
                                                     or k.startswith("pooler."))]
    left = sorted(set(sd) - used - set(ignored))
    if left:
        msg = f"Tensors of the checkpoint that sclcm cannot place: {left[:8]}."
        raise ValueError(msg)
    if ignored:
        logg.info(f"    not used by sclcm: {ignored}")

    with torch.device("meta"):
        model = CellModel(config, vocab=vocab)
    load_state(model, ours, source=str(directory))
    _attach_tokenizer(model, vocab, medians, hf["max_position_embeddings"])
    return model


def _attach_tokenizer(model: CellModel, vocab: GeneVocab, medians: dict[str, float],
                      max_len: int) -> None:
    missing = [g for g in vocab.genes if g not in medians]
    if missing:
        msg = (f"The gene median dictionary lacks {len(missing)} genes of the token "
               f"dictionary (e.g. {missing[:3]}); they belong to different Geneformer versions.")
        raise ValueError(msg)
    from ..tokenizers import GeneformerTokenizer

    medians_g = np.array([medians[g] for g in vocab.genes], dtype=np.float64)
    model.attach_tokenizer(GeneformerTokenizer(vocab, medians=medians_g, max_len=max_len,
                                               special_tokens="<cls>" in vocab))
