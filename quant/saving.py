"""Save a quantised model once, reload it without re-quantising (minutes saved per 7B start).

Layout of the directory:
  quant_config.json          the storage settings, the list of 4-bit linears, library versions
  quantized_model.safetensors  every parameter and buffer; a 4-bit linear's entries are bitsandbytes'
                             own serialisation (`weight` packed uint8, `weight.absmax`,
                             `weight.quant_map`, `weight.nested_*`, `weight.quant_state.bitsandbytes__nf4`)

Non-persistent buffers (e.g. RoPE frequencies) are saved too, so that any meta-device skeleton comes
back complete without knowing how the model recomputes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.nn import Params4bit
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import QuantConfig, QuantError
from .linear import Linear4bit

CONFIG_FILE = "quant_config.json"
WEIGHTS_FILE = "quantized_model.safetensors"
FORMAT = "qlora-4bit"
_REQUANTISE = "re-quantise from the HF checkpoint and save again with quant.save_quantized"


def save_quantized(model: nn.Module, out_dir: str | Path, qc: QuantConfig) -> Path:
    """Write `model` (its 4-bit linears quantised as `qc` says) to `out_dir`; returns the directory."""
    out = Path(out_dir)
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    for name in quantized:
        _check_state(model.get_submodule(name).weight.quant_state, qc, f"model module {name}")
    tensors: dict[str, torch.Tensor] = {}
    seen_objects: set[int] = set()
    seen_memory: set[tuple[str, int, int]] = set()
    state = model.state_dict(keep_vars=True)  # bnb's _save_to_state_dict adds the packed quant state
    for name, t in model.named_buffers():
        state.setdefault(name, t)  # non-persistent buffers too (see module docstring)
    for name, t in state.items():
        if id(t) in seen_objects:  # a tied weight: stored once, re-tied by the skeleton on load
            continue
        seen_objects.add(id(t))
        t = t.detach().as_subclass(torch.Tensor)
        key = (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset())
        # safetensors refuses tensors that share memory; copy the rare ones that do (not tied weights).
        tensors[name] = t.contiguous() if key not in seen_memory else t.clone()
        seen_memory.add(key)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = {"format": FORMAT, **qc.to_dict(), "quantized": quantized,
            "bitsandbytes_version": bnb.__version__, "torch_version": torch.__version__}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def load_quantized(skeleton: nn.Module, in_dir: str | Path, qc: QuantConfig, *,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Fill a meta-device `skeleton` from a `save_quantized` directory; returns it in eval mode.

    The skeleton is any module built under `torch.device("meta")` with the saved model's structure
    (e.g. `llama.Llama(cfg)`). Linears that `qc` selects become 4-bit (`Linear4bit`) on `device`; other
    float parameters are cast to `qc.compute_dtype`. Raises `QuantError` if the directory was written
    with other storage settings or another set of 4-bit layers, or does not fit the skeleton.
    """
    src = Path(in_dir)
    meta = _read_meta(src, qc)
    device = torch.device(device)
    linears = {n: m for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)}
    wanted = sorted(n for n in linears if qc.selects(n))
    if sorted(meta["quantized"]) != wanted:
        extra = sorted(set(meta["quantized"]) - set(wanted))
        lacking = sorted(set(wanted) - set(meta["quantized"]))
        raise QuantError(f"{src / CONFIG_FILE}: the file's 4-bit layers differ from what quant "
                         f"targets/skip select in this model (4-bit only in the file: {extra[:3]}, "
                         f"selected but not 4-bit in the file: {lacking[:3]}); use the targets/skip it was "
                         f"saved with, or {_REQUANTISE}")
    file = src / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            used = _load_4bit(skeleton, linears, wanted, f=f, keys=keys, qc=qc, device=device, file=file)
            used |= _load_dense(skeleton, f, keys, qc=qc, device=device, file=file)
    except SafetensorError as e:
        raise QuantError(f"{file} is not a readable safetensors file ({e}); {_REQUANTISE}") from e
    if keys - used:
        raise QuantError(f"{file} holds {len(keys - used)} tensor(s) this model does not have, e.g. "
                         f"{sorted(keys - used)[:3]}; the skeleton's config differs from the saved model's")
    return skeleton.eval()


def _read_meta(src: Path, qc: QuantConfig) -> dict[str, Any]:
    path = src / CONFIG_FILE
    if not path.is_file():
        raise QuantError(f"{src} is not a pre-quantised model directory (no {CONFIG_FILE}); write one with "
                         "quant.save_quantized, or load the HF checkpoint with the quant hook instead")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or not isinstance(meta.get("quantized"), list):
            raise ValueError("missing 'format' or 'quantized'")
    except (ValueError, AttributeError) as e:
        raise QuantError(f"{path} is not a quant_config.json written by quant.save_quantized ({e}); "
                         f"{_REQUANTISE}") from None
    diff = [f"{k}={meta.get(k)!r} (config: {v!r})" for k, v in qc.storage().items() if meta.get(k) != v]
    if diff:
        raise QuantError(f"{src} was quantised with other settings: {', '.join(diff)}; set the quant config "
                         f"to match, or {_REQUANTISE}")
    return meta


def _check_state(qs: Any, qc: QuantConfig, where: str) -> None:
    got = {"quant_type": qs.quant_type, "double_quant": bool(qs.nested), "blocksize": qs.blocksize}
    diff = [f"{k}={got[k]!r} (config: {v!r})" for k, v in qc.storage().items() if got[k] != v]
    if diff:
        raise QuantError(f"{where} is quantised with {', '.join(diff)}; quantise with the same QuantConfig "
                         "you save or load with")


def _set(root: nn.Module, path: str, value: Any) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, value)


def _load_4bit(skeleton: nn.Module, linears: dict[str, nn.Linear], names: list[str], *, f: Any,
               keys: set[str], qc: QuantConfig, device: torch.device, file: Path) -> set[str]:
    used: set[str] = set()
    for name in names:
        prefix = f"{name}.weight."
        stat_keys = [k for k in keys if k.startswith(prefix)]
        if f"{name}.weight" not in keys or not stat_keys:
            raise QuantError(f"{file} lacks the 4-bit weight or quant state of {name}; {_REQUANTISE}")
        stats = {k[len(prefix):]: f.get_tensor(k).clone() for k in stat_keys}
        try:
            weight = Params4bit.from_prequantized(f.get_tensor(f"{name}.weight").clone(), stats,
                                                  requires_grad=False, device=device)
        except (ValueError, KeyError, AssertionError) as e:
            raise QuantError(f"{file}: the quant state of {name} is unreadable ({e}); {_REQUANTISE}") from e
        _check_state(weight.quant_state, qc, f"{file}: {name}")
        expected = tuple(linears[name].weight.shape)
        if tuple(weight.quant_state.shape) != expected:
            raise QuantError(f"{file}: {name} has shape {list(weight.quant_state.shape)}, the skeleton "
                             f"expects {list(expected)}; the skeleton's config differs from the saved "
                             "model's")
        bias = None
        if linears[name].bias is not None:
            bias = _dense(f, keys, f"{name}.bias", like=linears[name].bias, device=device, file=file)
            used.add(f"{name}.bias")
        _set(skeleton, name, Linear4bit.from_params(weight, bias, qc.compute_dtype))
        used |= {f"{name}.weight", *stat_keys}
    return used


def _dense(f: Any, keys: set[str], name: str, *, like: torch.Tensor, device: torch.device, file: Path,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    if name not in keys:
        raise QuantError(f"{file} lacks tensor {name}; the skeleton's config differs from the saved model's, "
                         f"or {_REQUANTISE}")
    t = f.get_tensor(name)
    if tuple(t.shape) != tuple(like.shape):
        raise QuantError(f"{file}: {name} has shape {list(t.shape)}, the skeleton expects "
                         f"{list(like.shape)}; the skeleton's config differs from the saved model's")
    # copy=True: never leave a model tensor backed by the file's memory map.
    return t.to(device=device, dtype=dtype if dtype and t.is_floating_point() else t.dtype, copy=True)


def _load_dense(skeleton: nn.Module, f: Any, keys: set[str], *, qc: QuantConfig, device: torch.device,
                file: Path) -> set[str]:
    """Every parameter and buffer still on meta; tied parameters get one shared tensor."""
    used: set[str] = set()
    groups: dict[int, list[str]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        if p.is_meta:
            groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in keys] or names
        like = skeleton.get_parameter(names[0])
        param = nn.Parameter(_dense(f, keys, present[0], like=like, device=device, file=file,
                                    dtype=qc.compute_dtype),
                             requires_grad=like.requires_grad)
        for n in names:
            _set(skeleton, n, param)
        used |= {n for n in names if n in keys}
    for name, b in list(skeleton.named_buffers(remove_duplicate=False)):
        if b.is_meta:
            # buffers keep their saved dtype
            _set(skeleton, name, _dense(f, keys, name, like=b, device=device, file=file))
            used.add(name)
    return used
