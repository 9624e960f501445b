"""Checks that compare the data with the model's config.json before any weight is loaded.

Both mistakes here used to surface late or not at all: a tokenizer with more pieces than the model's
embedding table trains until the first out-of-range id (an IndexError on CPU, a device-side assert on
CUDA), and rows longer than the model's context trained silently on positions it never learned.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open

import llama
from finetune.errors import UserError
from finetune.files import read_json

_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings")
_NUMBER_KEYS = ("rms_norm_eps", "rope_theta")


def check_model_config(model_path: str) -> None:
    """config.json's sizes must have JSON's number types: ``"hidden_size": "64"`` used to end in a
    TypeError traceback from deep inside the model build."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return  # the loader's own message covers a missing file
    raw = read_json(path, "model config", fix="restore config.json from the original checkpoint")
    nested = [raw[k] for k in ("text_config",) if isinstance(raw.get(k), dict)]
    for section in [raw, *nested]:
        for key in _INT_KEYS:
            v = section.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UserError(f"{path}: {key} must be a positive integer, got {v!r}; restore config.json "
                                f"from the original checkpoint")
        for key in _NUMBER_KEYS:
            v = section.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise UserError(f"{path}: {key} must be a positive number, got {v!r}; restore config.json "
                                f"from the original checkpoint")


def _model_config(model_path: str) -> Any:
    check_model_config(model_path)
    return llama.LlamaConfig.from_hf(model_path)


def check_max_length(max_length: int, model_path: str) -> None:
    """``data.max_length`` must fit the model's context (``max_position_embeddings``)."""
    context = _model_config(model_path).max_position_embeddings
    if max_length > context:
        raise UserError(f"data.max_length {max_length} is longer than the model's context of {context} "
                        f"tokens (max_position_embeddings in {model_path}/config.json); lower "
                        f"data.max_length to at most {context}, or, if the model really handles longer "
                        f"inputs (e.g. RoPE scaling), raise max_position_embeddings in its config.json")


def check_token_ids(examples: Sequence[Any], model_path: str, data_path: str) -> None:
    """Every token id of the prepared examples must index the model's vocabulary (config.json)."""
    vocab = _model_config(model_path).vocab_size
    top, where = -1, None
    for ex in examples:
        ids = ex.input_ids
        if ids:
            m = max(ids)
            if m > top:
                top, where = m, ex
    if top >= vocab:
        source = (getattr(where, "row", None) or {}).get("source", "a row")
        raise UserError(f"the tokenizer of {model_path} produces token id {top} ({source} of {data_path}) "
                        f"but the model's vocabulary has {vocab} entries (vocab_size in config.json): the "
                        f"tokenizer files and the weights come from different models; use the tokenizer "
                        f"that was trained with these weights")


_ADAPTER_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)"
                          r"\.lora_([AB])\.weight")


def check_adapter_shapes(weights: dict[str, Any], r: int, model_path: str) -> None:
    """LoRA tensor shapes against the sizes config.json gives each Llama projection, before any weight
    is loaded (an adapter for another model size fails in a second, not after a 7B load).

    Keys this does not recognise are left to ``lora.load_adapter``'s strict check against the model.
    """
    c = _model_config(model_path)
    head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    h, i = c.hidden_size, c.intermediate_size
    sides = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
             "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    for key, tensor in weights.items():
        m = _ADAPTER_KEY.fullmatch(key)
        if not m or m.group(2) not in sides:
            continue
        layer, proj, which = int(m.group(1)), m.group(2), m.group(3)
        if layer >= c.num_hidden_layers:
            raise UserError(f"{key} is for layer {layer}, but the model has {c.num_hidden_layers} layers; "
                            f"use the base model the adapter was trained on")
        n_in, n_out = sides[proj]
        expected = (r, n_in) if which == "A" else (n_out, r)
        if tuple(tensor.shape) != expected:
            raise UserError(f"{key} has shape {list(tensor.shape)} but the model needs {list(expected)} "
                            f"(from its config.json); the adapter was trained on a different model size: "
                            f"use its own base model")


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def check_model_weights(model_path: str) -> None:
    """Every tensor in the base's safetensors files must be floating point (read from the headers only,
    no weight is loaded): an int32 tensor used to fail only once training asked it for gradients.

    Missing, truncated or unreadable files are left to the loader, whose messages name them.
    """
    for path in sorted(Path(model_path).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 -- safe_open is not a dict
                    dtype = f.get_slice(key).get_dtype()
                    if dtype not in _FLOAT_DTYPES:
                        raise UserError(f"{path}: tensor {key} has dtype {dtype}; a model's weights are "
                                        f"floating point (F32, F16, BF16): the file is damaged or was not "
                                        f"written by save_pretrained; restore it from the original model")
        except UserError:
            raise
        except Exception:  # noqa: BLE001 -- a damaged file: llama.from_pretrained reports it in one line
            continue
