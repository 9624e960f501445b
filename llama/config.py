"""LlamaConfig: the hyper-parameters of a Llama decoder, read from a Hugging Face `config.json`.

Two shapes of config.json exist in the wild and both must load:
- transformers 4.x (every published Llama-2/3 checkpoint): top-level `rope_theta`, `rope_scaling`
  (`None` or a dict with `rope_type`, or the older key `type`), `torch_dtype`, usually no `head_dim`;
- transformers 5.x: `rope_parameters` (a dict holding `rope_theta` and `rope_type`) and `dtype`.
Both are normalised here into one flat dataclass, so nothing downstream knows which one it was.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class LoadError(ValueError):
    """A checkpoint or config that cannot be loaded; the message says what, where and how to fix it."""


# Mistral without a sliding window is the same network as Llama (same names, same maths).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# Extra keys each RoPE variant needs (besides rope_theta); see llama/model.py:rope_inv_freq.
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None = num_attention_heads (MHA); fewer = GQA
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear"|"dynamic"|"llama3", "factor": ..., ...} (without rope_theta)
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2  # Llama-3.1 lists several
    pad_token_id: int | None = None  # Llama-2 has none; padding is masked by position anyway
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in, e.g. "bfloat16"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise LoadError(f"config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}; fix config.json")
        if self.hidden_act != "silu":
            raise LoadError(f"config: hidden_act={self.hidden_act!r} is not supported (Llama uses 'silu'); "
                            "this checkpoint is not a Llama-family model")
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def eos_token_ids(self) -> list[int]:
        """All end-of-sequence ids (a config may give one or a list)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> LlamaConfig:
        """Build from a HF model dir, a config.json path, or its parsed dict (4.x or 5.x shape)."""
        where = "config dict"
        if isinstance(source, dict):
            raw = source
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            if not path.is_file():
                raise LoadError(f"{where} not found: a HF model directory needs config.json "
                                "(written by save_pretrained)")
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LoadError(f"{where} is not valid JSON ({e}); restore the file from the original "
                                "checkpoint") from e
            if not isinstance(raw, dict):
                raise LoadError(f"{where} must hold a JSON object, got {type(raw).__name__}")
        return cls(**_hf_to_fields(raw, where))


def _hf_to_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    archs = raw.get("architectures") or []
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad or (not archs and raw.get("model_type") not in SUPPORTED_MODEL_TYPES):
        name = bad[0] if bad else f"model_type={raw.get('model_type')!r}"
        raise LoadError(f"{where}: architecture {name} is not supported; this library runs "
                        f"{' and '.join(SUPPORTED_ARCHITECTURES)} checkpoints only")
    window = raw.get("sliding_window")
    if window is not None and window < raw.get("max_position_embeddings", 4096):
        raise LoadError(f"{where}: sliding_window={window} (Mistral v0.1 style) is not supported; only "
                        "full attention (sliding_window: null) is the same network as Llama")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise LoadError(f"{where} lacks {', '.join(missing)}; it is not a complete Llama config.json")

    # transformers 5.x: rope_parameters = {rope_theta, rope_type, ...}; 4.x: rope_theta + rope_scaling.
    rope = raw.get("rope_parameters")
    if isinstance(rope, dict):
        rope = dict(rope)
        theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
        scaling: dict[str, Any] | None = rope
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = dict(raw["rope_scaling"]) if raw.get("rope_scaling") else None
    if scaling is not None:
        scaling.pop("partial_rotary_factor", None)  # 1.0 for every Llama; other values are not Llama
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        else:
            scaling = _normalise_rope_scaling(scaling, where)

    fields = {k: raw[k] for k in _REQUIRED}
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act",
                "bos_token_id", "eos_token_id"):
        if raw.get(key) is not None:
            fields[key] = raw[key]
    fields.update(pad_token_id=raw.get("pad_token_id"), rope_theta=float(theta), rope_scaling=scaling,
                  torch_dtype=raw.get("dtype") or raw.get("torch_dtype"))
    return fields


def _normalise_rope_scaling(scaling: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """One spelling: `rope_type` (4.x configs before 4.36 wrote `type`); check the needed keys."""
    scaling = dict(scaling)
    kind = scaling.pop("type", None)
    kind = scaling.setdefault("rope_type", kind or "default")
    if kind not in ROPE_TYPES:
        raise LoadError(f"{where}: rope type {kind!r} is not supported; supported: "
                        f"{', '.join(ROPE_TYPES)} (yarn/longrope are not Llama rope types)")
    need = [k for k in ROPE_TYPES[kind] if k not in scaling]
    if need:
        raise LoadError(f"{where}: rope_scaling of type {kind!r} lacks {', '.join(need)}; "
                        "copy them from the original config.json")
    return scaling
