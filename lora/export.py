"""Merge and deploy: write base + adapter as one ordinary 16/32-bit Hugging Face model directory.

A 4-bit base cannot take the merge in place: re-quantising W + scaling * B @ A would throw away much
of the (small) update. So each quantised weight is dequantised (bitsandbytes' own
`dequantize_4bit`), the update is added in fp32, and the result is written unquantised, streamed
shard by shard so the merged model never sits in memory all at once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .layer import LoRAError, LoRALinear, _is_quantized

# Everything a tokenizer / generation setup may need next to the weights.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The `[out, in]` floating-point weight of a linear, dequantising bitsandbytes 4/8-bit storage."""
    w = linear.weight
    if getattr(w, "quant_state", None) is not None:  # bnb Params4bit (NF4/FP4)
        import bitsandbytes.functional as bnbf  # lazily: only 4-bit bases need bitsandbytes

        return bnbf.dequantize_4bit(w.data, w.quant_state)
    if w.dtype == torch.int8 and getattr(w, "SCB", None) is not None:  # bnb Int8Params: row-wise absmax
        return w.data.float() * (w.SCB.float().unsqueeze(1) / 127.0)
    if not w.is_floating_point():
        raise LoRAError(f"cannot dequantise the {w.dtype} weight of {type(linear).__name__}")
    return w.detach()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _merged_tensors(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every parameter and persistent buffer, LoRA folded in, on the CPU."""
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    seen: set[int] = set()
    skip_under: list[str] = []

    def out(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=dtype if t.is_floating_point() else t.dtype).contiguous()

    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in skip_under):
            continue
        prefix = name + "." if name else ""
        if isinstance(m, LoRALinear) or _is_quantized(m) is not None:
            skip_under.append(name)
            base = m.base if isinstance(m, LoRALinear) else m
            w = dense_weight(base).float()
            if isinstance(m, LoRALinear) and not m.merged and not m.disabled:
                w = w + m.delta_weight().detach().float().to(w.device)
                if owners[id(base.weight)] > 1:
                    raise LoRAError(f"{name} shares its weight with another module (tied embeddings?); "
                                    f"merging would untie them: keep LoRA off tied layers to export")
            seen.add(id(base.weight))
            yield prefix + "weight", out(w)
            if getattr(base, "bias", None) is not None:
                yield prefix + "bias", out(base.bias)
            continue
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights (lm_head = embed_tokens): HF writes the first name only
                continue
            seen.add(id(p))
            yield prefix + pname, out(p)
        for bname, b in m.named_buffers(recurse=False):
            if b is not None and bname not in m._non_persistent_buffers_set:
                yield prefix + bname, out(b)


def _export_dtype(config: dict, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    if name not in _DTYPES:
        raise LoRAError(f"config.json has dtype {name!r}; pass merge_and_export(..., dtype=torch.bfloat16)")
    return _DTYPES[name]


def merge_and_export(model: nn.Module, out_dir: str | os.PathLike, base_dir: str | os.PathLike, *,
                     dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB") -> Path:
    """Write `model` with its LoRA merged as a plain HF model dir that transformers and llama load.

    `base_dir` is the original HF directory: its config.json is copied (quantization_config removed,
    dtype set) and so are its tokenizer files. Weights are stored in `dtype` (default: the base
    config's dtype) in safetensors shards of at most `max_shard_size`, with
    `model.safetensors.index.json` when there is more than one. `out_dir` must be new or empty.
    """
    out, base_dir = Path(out_dir), Path(base_dir)
    cfg_path = base_dir / "config.json"
    if not cfg_path.is_file():
        raise LoRAError(f"merge_and_export: no config.json in base_dir {base_dir}; pass the HF directory the "
                        f"model was loaded from")
    if out.exists() and any(out.iterdir()):
        raise LoRAError(f"merge_and_export: {out} is not empty; choose a new directory")
    config = json.loads(cfg_path.read_text())
    dtype = _export_dtype(config, dtype)
    config.pop("quantization_config", None)
    dtype_name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype_name
    if "torch_dtype" not in config and "dtype" not in config:
        config["torch_dtype"] = dtype_name

    limit = _parse_size(max_shard_size)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = []
    total = 0
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        idx = len(shards)
        save_file(pending, str(out / f"shard-{idx:05d}.tmp"), metadata={"format": "pt"})
        shards.append(list(pending))
        pending, pending_bytes = {}, 0

    with torch.no_grad():
        for key, t in _merged_tensors(model, dtype):
            nbytes = t.numel() * t.element_size()
            if pending and pending_bytes + nbytes > limit:
                flush()
            pending[key] = t
            pending_bytes += nbytes
            total += nbytes
        flush()

    # Shard names need the shard count, known only now: rename the temporaries.
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / f"shard-{i:05d}.tmp", out / fname)
        weight_map.update({k: fname for k in keys})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for fname in TOKENIZER_FILES:
        if (base_dir / fname).is_file():
            shutil.copy2(base_dir / fname, out / fname)
    return out
