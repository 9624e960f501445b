"""LlamaConfig: the hyper-parameters of a Llama-family decoder, read from a Hugging Face `config.json`.

Families: Llama, Mistral, Mixtral, Gemma, Phi(-1.5/-2) and Qwen2 (see FAMILIES). They share one
decoder; the config says where they differ.

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


# One decoder (llama/model.py) runs all of these; `model_type` switches the few places they differ.
FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",  # Llama + sliding-window attention
    "MixtralForCausalLM": "mixtral",  # Mistral + sparse mixture-of-experts feed-forward
    "GemmaForCausalLM": "gemma",  # (1 + w) RMSNorm, sqrt(hidden)-scaled embeddings, GeGLU, tied head
    "PhiForCausalLM": "phi",  # parallel attention + MLP on one LayerNorm, partial rotary, biases
    "Qwen2ForCausalLM": "qwen2",  # Llama + bias on q/k/v
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
SUPPORTED_MODEL_TYPES = tuple(FAMILIES.values())

# How each family's transformers class lays out the decoder where config.json has no say: the values
# of LlamaConfig's layout fields. One row per family over LLAMA_LAYOUT; a new family is a row here
# (plus its parity test), and llama/model.py reads only the fields, never `model_type`.
LLAMA_LAYOUT: dict[str, Any] = {
    "norm_type": "rms",  # "rms" (RMSNorm) or "layer" (LayerNorm with bias)
    "norm_offset": False,  # RMSNorm times (1 + weight): weights stored around 0
    "scale_embeddings": False,  # embeddings times sqrt(hidden_size)
    "parallel_block": False,  # x + attn(ln x) + mlp(ln x) on one norm, not two sequential residuals
    "gated_mlp": True,  # down(act(gate x) * up x); False: fc2(act(fc1 x))
    "attention_bias": False,  # bias on q, k, v and the output projection
    "qkv_bias": False,  # bias on q, k, v only
    "mlp_bias": False,
    "lm_head_bias": False,
    "out_proj_name": "o_proj",  # the checkpoint's name of the attention output projection
    "final_norm_name": "norm",  # the checkpoint's name of the norm after the last layer
}
FAMILY_LAYOUTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "mixtral": {},
    "gemma": {"norm_offset": True, "scale_embeddings": True},
    # PhiModel has a bias on every linear and no switch for it.
    "phi": {"norm_type": "layer", "parallel_block": True, "gated_mlp": False, "attention_bias": True,
            "mlp_bias": True, "lm_head_bias": True, "out_proj_name": "dense",
            "final_norm_name": "final_layernorm"},
    "qwen2": {"qkv_bias": True},
}
NORM_TYPES = ("rms", "layer")
# Families whose transformers class rotates only part of each head when config.json asks for it; the
# others' classes do not implement a partial_rotary_factor, so a config.json that sets one is refused.
PARTIAL_ROTARY_FAMILIES = ("phi",)
# Extra keys each RoPE variant needs (besides rope_theta); see llama/model.py:rope_inv_freq.
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# transformers' names for the activations we implement (gelu_new and gelu_pytorch_tanh are the same
# tanh approximation of GELU, Hendrycks & Gimpel 2016).
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# config.json keys that would change the network if set to anything but the value we implement:
# (key, accepted values, what it is). Refused with one line rather than silently ignored. Keys not
# listed here (use_cache, initializer_range, pretraining_tp: the same sums sliced, ...) do not change
# the maths of a forward pass.
_MUST_BE: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("qk_layernorm", (None, False), "LayerNorm on queries and keys"),
    ("use_bidirectional_attention", (None, False), "bidirectional (non-causal) attention"),
    ("router_jitter_noise", (None, 0, 0.0), "multiplicative jitter on the router input"),
    ("attn_logit_softcapping", (None,), "attention logit soft-capping (Gemma-2)"),
    ("final_logit_softcapping", (None,), "final logit soft-capping (Gemma-2)"),
    ("query_pre_attn_scalar", (None,), "a query scale other than 1/sqrt(head_dim) (Gemma-2)"),
    ("use_qk_norm", (None, False), "RMSNorm on queries and keys"),
    ("attention_chunk_size", (None,), "chunked attention"),
    ("mlp_only_layers", (None, []), "dense layers inside a mixture-of-experts stack"),
    ("shared_expert_intermediate_size", (None, 0), "a shared expert beside the routed ones"),
)


@dataclass
class LlamaConfig:
    """The hyper-parameters of every supported family, flat.

    Most fields are read from config.json. The layout fields (None by default: norm_type ...
    final_norm_name) are what a family's transformers class hard-codes; they are filled from
    FAMILY_LAYOUTS by `model_type`, once, here, and an explicit value wins (tests flip them one at a time).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None = num_attention_heads (MHA); fewer = GQA
    head_dim: int | None = None  # None = hidden_size // num_attention_heads (Gemma sets 256)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear"|"dynamic"|"llama3", "factor": ..., ...} (without rope_theta)
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2  # Llama-3.1 lists several
    pad_token_id: int | None = None  # Llama-2 has none; padding is masked by position anyway
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in, e.g. "bfloat16"
    model_type: str = "llama"  # llama | mistral | mixtral | gemma | phi | qwen2
    # Sliding-window attention (Mistral, Mixtral, Qwen2 with use_sliding_window): a query sees the
    # `sliding_window` most recent keys, itself included. `layer_types` says which layers slide
    # (None = all of them when sliding_window is set).
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    partial_rotary_factor: float = 1.0  # RoPE rotates only this fraction of each head (Phi: 0.4)
    layer_norm_eps: float = 1e-5  # Phi's LayerNorm (the RMSNorm families use rms_norm_eps)
    attention_dropout: float = 0.0  # dropout on attention probabilities, training only
    resid_pdrop: float = 0.0  # Phi: dropout on the attention and MLP outputs, training only
    embd_pdrop: float = 0.0  # Phi: dropout on the embeddings, training only
    num_local_experts: int = 0  # Mixtral: experts per layer (0 = dense MLP)
    num_experts_per_tok: int = 2  # Mixtral: experts each token is routed to (top-k)
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss when the loop adds it
    # The layout (None = the family's value from FAMILY_LAYOUTS; see LLAMA_LAYOUT for the meanings).
    norm_type: str | None = None
    norm_offset: bool | None = None
    scale_embeddings: bool | None = None
    parallel_block: bool | None = None
    gated_mlp: bool | None = None
    attention_bias: bool | None = None
    qkv_bias: bool | None = None
    mlp_bias: bool | None = None
    lm_head_bias: bool | None = None
    out_proj_name: str | None = None
    final_norm_name: str | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise LoadError(f"config: model_type={self.model_type!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        for key, value in {**LLAMA_LAYOUT, **FAMILY_LAYOUTS[self.model_type]}.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.norm_type not in NORM_TYPES:
            raise LoadError(f"config: norm_type={self.norm_type!r} is not one of {', '.join(NORM_TYPES)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise LoadError(f"config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}; fix config.json")
        if self.hidden_act not in ACTIVATIONS:
            raise LoadError(f"config: hidden_act={self.hidden_act!r} is not supported; supported: "
                            f"{', '.join(ACTIVATIONS)}")
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise LoadError(f"config: partial_rotary_factor={self.partial_rotary_factor} gives "
                            f"{self.rotary_dim} rotary dims of head_dim={self.head_dim}; it must be an even "
                            "number > 0")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise LoadError(f"config: sliding_window={self.sliding_window} must be a positive number of "
                            "tokens or null")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad or len(self.layer_types) != self.num_hidden_layers:
                raise LoadError(f"config: layer_types {bad or self.layer_types} not supported; need "
                                f"{self.num_hidden_layers} entries from: {', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise LoadError("config: layer_types has sliding_attention layers but sliding_window is null")
        if self.num_local_experts and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise LoadError(f"config: num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                            f"num_local_experts={self.num_local_experts}")

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_token_ids(self) -> list[int]:
        """All end-of-sequence ids (a config may give one or a list)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @property
    def embed_scale(self) -> float | None:
        """What the embeddings are multiplied by: sqrt(hidden_size) with scale_embeddings, else None."""
        return self.hidden_size ** 0.5 if self.scale_embeddings else None

    def is_sliding(self, layer: int) -> bool:
        """True if decoder layer `layer` uses sliding-window attention."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

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


def _family(raw: dict[str, Any], where: str) -> str:
    archs = raw.get("architectures") or []
    bad = [a for a in archs if a not in FAMILIES]
    if bad or (not archs and raw.get("model_type") not in SUPPORTED_MODEL_TYPES):
        name = bad[0] if bad else f"model_type={raw.get('model_type')!r}"
        raise LoadError(f"{where}: architecture {name} is not supported; supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    kinds = {FAMILIES[a] for a in archs} or {raw["model_type"]}
    if len(kinds) > 1:
        raise LoadError(f"{where}: architectures {archs} name different families; keep one")
    return kinds.pop()


def _hf_to_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    family = _family(raw, where)
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise LoadError(f"{where} lacks {', '.join(missing)}; it is not a complete {family} config.json")
    for key, allowed, what in _MUST_BE:
        if key in raw and raw[key] not in allowed:
            raise LoadError(f"{where}: {key}={raw[key]!r} ({what}) is not implemented; supported families "
                            f"({', '.join(SUPPORTED_MODEL_TYPES)}) run without it")

    # transformers 5.x: rope_parameters = {rope_theta, rope_type, ...}; 4.x: rope_theta + rope_scaling.
    rope = raw.get("rope_parameters")
    if isinstance(rope, dict):
        rope = dict(rope)
        theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
        scaling: dict[str, Any] | None = rope
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = dict(raw["rope_scaling"]) if raw.get("rope_scaling") else None
    # Phi: partial_rotary_factor is top-level in 4.x and inside rope_parameters in 5.x.
    partial = raw.get("partial_rotary_factor", 1.0)
    if scaling is not None:
        partial = scaling.pop("partial_rotary_factor", partial)
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        else:
            scaling = _normalise_rope_scaling(scaling, where)

    if partial != 1 and family not in PARTIAL_ROTARY_FAMILIES:
        raise LoadError(f"{where}: partial_rotary_factor={partial} is not implemented by {family}'s "
                        f"transformers class (only {', '.join(PARTIAL_ROTARY_FAMILIES)}); remove it")
    fields = {k: raw[k] for k in _REQUIRED}
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act",
                "bos_token_id", "eos_token_id", "layer_norm_eps", "attention_dropout", "resid_pdrop",
                "embd_pdrop"):
        if raw.get(key) is not None:
            fields[key] = raw[key]
    fields.update(pad_token_id=raw.get("pad_token_id"), rope_theta=float(theta), rope_scaling=scaling,
                  torch_dtype=raw.get("dtype") or raw.get("torch_dtype"), model_type=family,
                  partial_rotary_factor=float(partial))
    fields.update(_family_fields(raw, family))
    # What the family's transformers class hard-codes wins over config.json (PhiModel ignores an
    # `attention_bias: false`, Qwen2 always has q/k/v biases).
    fields.update(FAMILY_LAYOUTS[family])
    return fields


def _family_fields(raw: dict[str, Any], family: str) -> dict[str, Any]:
    """What each family's transformers class decides from config.json beyond the common keys."""
    out: dict[str, Any] = {}
    if family in ("mistral", "mixtral"):
        out["sliding_window"] = raw.get("sliding_window")  # every layer slides when it is set
    elif family == "qwen2":
        # Qwen2 slides only with use_sliding_window, and then only layers >= max_window_layers
        # (transformers 4.x); 5.x writes that out as layer_types.
        window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
        types = raw.get("layer_types")
        if types is None and window is not None:
            first = raw.get("max_window_layers", raw["num_hidden_layers"])
            types = ["sliding_attention" if i >= first else "full_attention"
                     for i in range(raw["num_hidden_layers"])]
        if types is not None and all(t == "full_attention" for t in types):
            window, types = None, None
        out.update(sliding_window=window, layer_types=types)
    elif family == "gemma":
        # Gemma's published config.json says hidden_act "gelu" but was trained with the tanh
        # approximation; transformers 4.x reads `hidden_activation` (None = tanh) and 5.x maps "gelu"
        # to "gelu_pytorch_tanh". Both end at the tanh GELU unless hidden_activation says otherwise.
        act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
        out["hidden_act"] = "gelu_pytorch_tanh" if act == "gelu" else act
        out.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", True))
    elif family == "phi":
        out["tie_word_embeddings"] = raw.get("tie_word_embeddings", False)
        out["hidden_act"] = raw.get("hidden_act", "gelu_new")
    if family == "mixtral":
        for key in ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef"):
            if raw.get(key) is not None:
                out[key] = raw[key]
        out.setdefault("num_local_experts", 8)  # MixtralConfig's defaults (8 experts, top-2)
    # Keys a family's transformers class does not read (a Llama's sliding_window, ...) are ignored
    # as transformers ignores them: the network is the one transformers builds.
    return out


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
