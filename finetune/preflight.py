"""Checks that compare the data with the model's config.json before any weight is loaded.

Both mistakes here used to surface late or not at all: a tokenizer with more pieces than the model's
embedding table trains until the first out-of-range id (an IndexError on CPU, a device-side assert on
CUDA), and rows longer than the model's context trained silently on positions it never learned.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from finetune.errors import UserError


def _model_config(model_path: str) -> Any:
    import llama

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
