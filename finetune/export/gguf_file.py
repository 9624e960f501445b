"""The merged model as one GGUF file (llama.cpp, Ollama, LM Studio), written with the ``gguf`` package.

What goes in, and where each rule comes from (facts taken from llama.cpp's ``convert_hf_to_gguf.py`` and
``gguf-py``, ggml-org/llama.cpp; read there, not copied):
- **Architecture**: Llama, Llama-3, SmolLM2 and Mistral are ``llama`` (the converter registers
  ``MistralForCausalLM`` with its Llama class), Qwen2 is ``qwen2``. Keys ``{arch}.context_length``,
  ``embedding_length``, ``block_count``, ``feed_forward_length``, ``attention.head_count(_kv)``,
  ``attention.layer_norm_rms_epsilon``, ``rope.freq_base``, ``rope.dimension_count`` (and
  ``attention.key_length``/``value_length`` when ``head_dim`` is not hidden/heads),
  ``attention.sliding_window`` when the config has one; rope scaling ``linear``/``yarn`` as
  ``rope.scaling.*`` keys, Llama-3's as the ``rope_freqs.weight`` tensor of per-frequency divisors.
- **Tensor names**: gguf-py's own table (``gguf.get_tensor_name_map``): ``token_embd``, ``blk.N.attn_q``,
  ``attn_k``, ``attn_v``, ``attn_output``, ``ffn_gate``/``ffn_up``/``ffn_down``, ``attn_norm``,
  ``ffn_norm``, ``output_norm``, ``output`` (absent when the head is tied to the embedding).
- **q/k rows** (``llama`` only; Qwen2's rotation is NeoX-style and stays as HF has it): llama.cpp rotates
  interleaved pairs while HF rotates halves, so the converter reorders each head's rows:
  ``w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)``, with the
  KV head count for k; biases of q/k the same way.
- **Types**: 1-D tensors (norms, biases) and ``rope_freqs`` stay F32; the 2-D weights take the chosen
  type. A tensor whose rows do not split into whole 32-value blocks falls back to F16 for q8_0/q4_0 (as
  the converter does). q4_0 is not a converter type (llama-quantize makes it); we keep the embedding and
  the output head at Q8_0 there, since 4 bits on those cost the most quality.
- **Tokenizer**: a SentencePiece ``tokenizer.model`` becomes the ``llama`` vocabulary (pieces, scores,
  types NORMAL/UNKNOWN/CONTROL/USER_DEFINED/UNUSED/BYTE, pre-tokenizer ``default``, ``[PADi]`` UNUSED
  entries up to the model's vocab_size); a byte-level BPE ``tokenizer.json`` becomes ``gpt2`` (tokens by
  id, merges as ``"a b"``, added special tokens CONTROL, other added USER_DEFINED, ``[PADi]`` holes
  USER_DEFINED) with the pre-tokenizer llama.cpp names for that split (``gpt-2``, ``smollm``,
  ``llama-bpe``, ``qwen2``). The converter recognises the split by hashing a test sentence's ids; we
  read the tokenizer.json's pre-tokenizer itself, which names the same split.
- **Special ids, add-BOS, chat template**: from our ``llama.Tokenizer`` (the one training used), written
  under the standard ``tokenizer.ggml.*`` and ``tokenizer.chat_template`` keys.

The weights are the merged ones (``lora.export``'s stream: each 4-bit weight dequantised by bitsandbytes,
the LoRA update added in fp32), one tensor at a time: the header is written from a first pass over
shapes, the data in a second, so no second copy of the model is ever held in memory.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import sentencepiece as spm
import torch

from finetune.errors import UserError
from llama.model import rope_inv_freq

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# our model_type -> llama.cpp architecture name
ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTED = {"llama"}  # architectures whose q/k rows are reordered for llama.cpp's interleaved RoPE


class GGUFExportError(UserError):
    """A model or tokenizer this exporter cannot write as GGUF (one line, exit 2 in the CLI)."""


def check_gguf_type(name: str) -> None:
    if name not in GGUF_TYPES:
        raise GGUFExportError(f"--gguf-type {name!r} is not supported; choose one of: "
                              f"{', '.join(GGUF_TYPES)}")


def arch_of(model_type: str) -> str:
    """llama.cpp's architecture name for one of our families, or a one-line refusal."""
    if model_type not in ARCHES:
        raise GGUFExportError(f"GGUF export is not supported for the {model_type!r} family yet (supported: "
                              f"llama, mistral, qwen2; Llama-2/3 and SmolLM2 are llama); --format hf works "
                              f"for every family")
    return ARCHES[model_type]


def _qtypes() -> dict[str, Any]:

    Q = gguf.GGMLQuantizationType
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}


def _file_type(name: str) -> int:

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[name]


# ---------------------------------------------------------------------------------------------------
# tensors
def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (the converter's formula, see top)."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def rope_freq_factors(cfg: Any) -> torch.Tensor | None:
    """Llama-3 rope scaling as llama.cpp stores it: per-frequency divisors ``f_i / f_i_scaled`` (F32)."""
    if cfg.rope_type != "llama3":
        return None


    plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    return (plain / rope_inv_freq(cfg)).float()


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str | None  # None for tensors we make (rope_freqs)
    name: str
    qtype: Any  # gguf.GGMLQuantizationType


def _convert(t: torch.Tensor, hf_name: str | None, arch: str, *, cfg: Any) -> torch.Tensor:
    t = t.detach().to(device="cpu", dtype=torch.float32)
    if arch in _PERMUTED and hf_name is not None:
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            t = permute_rows(t, cfg.num_attention_heads)
        elif hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            t = permute_rows(t, cfg.num_key_value_heads or cfg.num_attention_heads)
    return t.contiguous()


def _choose_qtype(name: str, shape: tuple[int, ...], gguf_type: str) -> Any:

    Q, q = gguf.GGMLQuantizationType, _qtypes()
    if len(shape) < 2 or name.startswith("rope_freqs"):
        return Q.F32
    want = q[gguf_type]
    if gguf_type == "q4_0" and name.split(".")[0] in ("token_embd", "output"):
        want = Q.Q8_0
    if want in (Q.Q8_0, Q.Q4_0):
        block = gguf.GGML_QUANT_SIZES[want][0]
        if shape[-1] % block:
            return Q.F16  # as the converter falls back when a row is not whole blocks
    return want


def _encode(t: torch.Tensor, qtype: Any) -> np.ndarray:

    Q = gguf.GGMLQuantizationType
    a = t.numpy()
    if qtype == Q.F32:
        return a.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)  # bf16, q8_0, q4_0: gguf-py's reference quantisers (uint8)


def _gguf_name(name_map: Any, hf_name: str) -> str:
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise GGUFExportError(f"GGUF export: no llama.cpp tensor name for {hf_name!r}; this model has a "
                              f"layer the GGUF {name_map!r} table does not know (use --format hf)")
    return name


# ---------------------------------------------------------------------------------------------------
# tokenizer
_GPT2_SPLIT_MARKERS = {  # (digits part of the split regex) -> llama.cpp pre-tokenizer name
    r"\p{N}{1,3}": "llama-bpe",  # Llama-3's split
    r"\p{N}|": "qwen2",  # Qwen2's split: one digit at a time
}


def bpe_pre_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for a byte-level tokenizer.json's pre-tokenizer (see module docstring)."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    digits = kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits")
    if digits and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        for marker, name in _GPT2_SPLIT_MARKERS.items():
            if marker in regex:
                return name
    warnings.warn(f"GGUF export: the tokenizer.json pre-tokenizer {kinds} is not one llama.cpp has a name "
                  "for; writing 'default' (llama.cpp may split text differently from training)", stacklevel=2)
    return "default"


def _sentencepiece_vocab(model_file: Path, vocab_size: int, added: dict[int, tuple[str, bool]]
                         ) -> tuple[list[str], list[float], list[int]]:

    T = gguf.TokenType
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_file.read_bytes())
    n = max(vocab_size, sp.get_piece_size(), *(i + 1 for i in added))
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores, types = [-10000.0] * n, [int(T.UNUSED)] * n
    for i in range(sp.get_piece_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = int(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                       T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL)
    for i, (content, special) in added.items():
        if i >= sp.get_piece_size():
            tokens[i], scores[i] = content, -1000.0
            types[i] = int(T.CONTROL if special else T.USER_DEFINED)
    return tokens, scores, types


def _bpe_vocab(spec: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int], list[str]]:

    T = gguf.TokenType
    model = spec.get("model") or {}
    by_id = {int(i): t for t, i in (model.get("vocab") or {}).items()}
    special: dict[int, bool] = {}
    for t in spec.get("added_tokens") or []:
        by_id[int(t["id"])] = t["content"]
        special[int(t["id"])] = bool(t.get("special"))
    n = max(vocab_size, max(by_id, default=-1) + 1)
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(T.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(T.NORMAL if i not in special else T.CONTROL if special[i] else T.USER_DEFINED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges


def add_tokenizer(writer: Any, tok: Any, model_dir: Path, *, vocab_size: int) -> str:
    """Write the vocabulary, special ids, add-BOS and chat template; returns the tokenizer model name."""
    model_file = Path(tok.source)
    if model_file.name == "tokenizer.model":
        added = _added_tokens(model_dir)
        tokens, scores, types = _sentencepiece_vocab(model_file, vocab_size, added)
        kind = "llama"
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    else:
        spec = json.loads(model_file.read_text(encoding="utf-8"))
        if (spec.get("model") or {}).get("byte_fallback") or _has_metaspace(spec):
            raise GGUFExportError(f"GGUF export: {model_file} is a SentencePiece-style tokenizer.json; put "
                                  "the checkpoint's tokenizer.model beside it (llama.cpp's 'llama' "
                                  "vocabulary needs its scores) or use --format hf")
        tokens, types, merges = _bpe_vocab(spec, vocab_size)
        kind = "gpt2"
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre(bpe_pre_name(spec))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    if tok.unk_id is not None:
        writer.add_unk_token_id(tok.unk_id)
    writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(bool(tok.add_bos))
    writer.add_add_eos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
    return kind


def _has_metaspace(spec: dict[str, Any]) -> bool:
    return any("Metaspace" in json.dumps(spec.get(k)) for k in ("pre_tokenizer", "decoder"))


def _added_tokens(model_dir: Path) -> dict[int, tuple[str, bool]]:
    """tokenizer_config.json's added_tokens_decoder: id -> (text, special)."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for key, value in (cfg.get("added_tokens_decoder") or {}).items():
        if isinstance(value, dict) and "content" in value:
            out[int(key)] = (value["content"], bool(value.get("special", True)))
    return out


# ---------------------------------------------------------------------------------------------------
# metadata
def add_architecture(writer: Any, cfg: Any, name: str) -> None:
    """The hyper-parameters llama.cpp reads (see the module docstring)."""
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.sliding_window:
        writer.add_sliding_window(cfg.sliding_window)
    scaling, kind = cfg.rope_scaling or {}, cfg.rope_type
    if kind == "linear":

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind not in ("default", "llama3", None):
        raise GGUFExportError(f"GGUF export: rope scaling {kind!r} has no llama.cpp equivalent we write "
                              "(supported: none, linear, llama3); use --format hf")


# ---------------------------------------------------------------------------------------------------
# the file
def plan_tensors(names_and_shapes: Iterable[tuple[str, tuple[int, ...]]], arch: str, cfg: Any, *,
                 gguf_type: str) -> list[PlannedTensor]:

    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    plan = []
    if cfg.rope_type == "llama3":
        rope = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(PlannedTensor(None, rope, gguf.GGMLQuantizationType.F32))
    for hf_name, shape in names_and_shapes:
        name = _gguf_name(name_map, hf_name)
        plan.append(PlannedTensor(hf_name, name, _choose_qtype(name, shape, gguf_type)))
    return plan


def write_gguf(path: Path, tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]], cfg: Any, *, tok: Any,
               model_dir: Path, gguf_type: str, name: str = "model",
               progress: Callable[[int, int, str], None] | None = None) -> int:
    """Write the GGUF to ``path`` (which must not exist yet); returns the number of tensors written.

    ``tensors()`` yields (HF name, fp32-able tensor) for every weight, LoRA merged; it is called twice
    (shapes, then data). ``progress(i, n, name)`` after each tensor.
    """

    check_gguf_type(gguf_type)
    arch = arch_of(cfg.model_type)
    shapes = [(n, tuple(t.shape)) for n, t in tensors()]
    plan = plan_tensors(shapes, arch, cfg, gguf_type=gguf_type)
    rope = rope_freq_factors(cfg)

    writer = gguf.GGUFWriter(path=None, arch=arch)
    add_architecture(writer, cfg, name)
    writer.add_file_type(_file_type(gguf_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tok, model_dir, vocab_size=cfg.vocab_size)

    shape_of = dict(shapes)
    for p in plan:
        shape = tuple(rope.shape) if p.hf_name is None else shape_of[p.hf_name]
        info_shape, nbytes, dtype = _info(shape, p.qtype)
        writer.add_tensor_info(p.name, info_shape, dtype, nbytes, raw_dtype=p.qtype)
    writer.open_output_file(Path(path))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        by_name = {p.hf_name: p for p in plan}
        done = 0
        if rope is not None:
            writer.write_tensor_data(_encode(rope, plan[0].qtype))
            done += 1
        for hf_name, t in tensors():
            p = by_name[hf_name]
            writer.write_tensor_data(_encode(_convert(t, hf_name, arch, cfg=cfg), p.qtype))
            done += 1
            if progress is not None:
                progress(done, len(plan), p.name)
        for f in writer.fout or []:
            f.flush()
    finally:
        writer.close()
    return len(plan)


def _info(shape: tuple[int, ...], qtype: Any) -> tuple[tuple[int, ...], int, Any]:
    """(shape as the writer takes it, bytes, numpy dtype) of one tensor stored as ``qtype``."""

    Q = gguf.GGMLQuantizationType
    count = int(np.prod(shape))
    if qtype == Q.F32:
        return shape, count * 4, np.float32
    if qtype == Q.F16:
        return shape, count * 2, np.float16
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return tuple(byte_shape), int(np.prod(byte_shape)), np.uint8
