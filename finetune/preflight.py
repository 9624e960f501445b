"""Checks that compare the data with the model's config.json before any weight is loaded.

Both mistakes here used to surface late or not at all: a tokenizer with more pieces than the model's
embedding table trains until the first out-of-range id (an IndexError on CPU, a device-side assert on
CUDA), and rows longer than the model's context trained silently on positions it never learned.
"""

from __future__ import annotations

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
