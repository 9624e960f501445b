"""Save and load adapters in PEFT's on-disk format, so PEFT and this package read each other's files.

    adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, use_rslora, ...
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight  [r, in]
                                 base_model.model.<module path>.lora_B.weight  [out, r]

Loading is strict where PEFT is lenient (PEFT only warns about missing keys): every key must land
in a LoRA module of the right shape and every LoRA module must get both of its weights, otherwise
`LoRAError` says which; a half-loaded adapter would train or evaluate the wrong model silently.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from .inject import compile_target_regex, inject, linear_names, lora_modules, match_targets
from .layer import LoRAError, LoRALinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# adapter_config.json keys that may carry a value. Every other key (use_dora, modules_to_save,
# rank_pattern, layers_to_transform, arrow_config, ... and whatever future PEFT versions add) must be
# empty/false: each of them changes the maths or the file layout, and refusing it beats loading
# something subtly different.
_ALLOWED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "r", "lora_alpha",
            "lora_dropout", "target_modules", "use_rslora", "inference_mode", "init_lora_weights",
            "peft_version", "auto_mapping", "megatron_core", "qalora_group_size", "ensure_weight_tying",
            "runtime_config"}
_MUST_BE = {"bias": "none"}
# Init schemes that rewrite the *base* weights (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA): such an adapter
# is only right on the modified base, so it is refused here.
_INIT_OK = (True, False, "gaussian", "eva", "orthogonal")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's keys (`base_model.model.<path>.lora_A.weight`), detached."""
    sd: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        sd[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        sd[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return sd


def _common(mods: dict[str, LoRALinear], attr: str) -> Any:
    values = {getattr(m, attr) for m in mods.values()}
    if len(values) != 1:
        raise LoRAError(f"LoRA modules disagree on {attr} ({sorted(values)}); one adapter_config.json can "
                        f"describe only one value")
    return values.pop()


def _target_modules(model: nn.Module, names: Iterable[str]) -> list[str]:
    """PEFT `target_modules` that select exactly `names`: the short suffixes when they do, else full paths."""
    names = set(names)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in linear_names(model) if n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if selected == names else sorted(names)


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None,
                   task_type: str | None = "CAUSAL_LM") -> dict[str, Any]:
    """The `adapter_config.json` content describing the LoRA in `model` (PEFT's LoraConfig keys)."""
    mods = lora_modules(model)
    if not mods:
        raise LoRAError(f"{type(model).__name__} has no LoRA modules to save; call lora.inject first")
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": _common(mods, "r"),
        "lora_alpha": _common(mods, "alpha"),
        "lora_dropout": _common(mods, "dropout_p"),
        "target_modules": _target_modules(model, mods),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": _common(mods, "use_rslora"),
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a new, exclusively created temp file next to `path`, then rename it over `path`.

    `O_EXCL | O_NOFOLLOW`: an existing file or a symlink planted under the temp name (a shared folder)
    is never opened or followed. A failed write (disk full) removes the temp file and re-raises.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *,
                 base_model_name_or_path: str | None = None, task_type: str | None = "CAUSAL_LM") -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT format) into `out_dir`.

    `PeftModel.from_pretrained(hf_model, out_dir)` loads the result. Each file is written to a
    temporary name and renamed, so an interrupted save never leaves a half-written adapter.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = adapter_config(model, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    sd = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    _atomic_write(out / WEIGHTS_NAME, save(sd, metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode("utf-8"))
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate `adapter_config.json`: plain LoRA only, with r, lora_alpha and target_modules."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise LoRAError(f"no {CONFIG_NAME} in {adapter_dir}; an adapter dir holds {CONFIG_NAME} and "
                        f"{WEIGHTS_NAME}")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise LoRAError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); rewrite it as UTF-8 "
                        f"JSON") from None
    except ValueError as e:  # JSONDecodeError, or NaN/Infinity (not JSON)
        raise LoRAError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise LoRAError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        got = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise LoRAError(f"{path} has peft_type={got!r}; only LoRA adapters (peft_type 'LORA') are supported")
    for key, value in cfg.items():
        if key in _MUST_BE:
            ok = value in (None, _MUST_BE[key])
        elif key == "init_lora_weights":
            ok = any(value is v or (isinstance(v, str) and value == v) for v in _INIT_OK)
        else:
            ok = key in _ALLOWED or value in (None, False, [], {}, "")
        if not ok:
            raise LoRAError(f"{path} sets {key}={value!r}, which plain LoRA does not support; lora loads "
                            f"plain LoRA adapters only")
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) is None:
            raise LoRAError(f"{path} has no {key!r}; it is needed to rebuild the adapter")
    _check_types(cfg, path)
    return cfg


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _check_types(cfg: dict[str, Any], path: Path) -> None:
    """The keys that rebuild the adapter must have PEFT's types: `"32"` or `"sixteen"` is a broken file."""
    def bad(key: str, rule: str) -> LoRAError:
        return LoRAError(f"{path}: {key} must be {rule}, got {cfg[key]!r}; fix the value in the file")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    r = cfg["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise bad("r", "a positive integer (the adapter rank)")
    if not number(cfg["lora_alpha"]) or cfg["lora_alpha"] <= 0:
        raise bad("lora_alpha", "a positive number")
    dropout = cfg.get("lora_dropout")
    if dropout is not None and (not number(dropout) or not 0 <= dropout < 1):
        raise bad("lora_dropout", "a number in [0, 1)")
    targets = cfg["target_modules"]
    if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise bad("target_modules", "a non-empty list of module names or a regex string")
    if isinstance(targets, str) and targets != "all-linear":
        compile_target_regex(targets)  # refuses a regex that could backtrack for hours
    if cfg.get("use_rslora") is not None and not isinstance(cfg["use_rslora"], bool):
        raise bad("use_rslora", "true or false")


def _read_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise LoRAError(f"{adapter_dir} holds adapter_model.bin (a pickle, never loaded here); convert "
                            f"it once: safetensors.torch.save_file(torch.load(path, weights_only=True), "
                            f"'{WEIGHTS_NAME}')")
        raise LoRAError(f"no {WEIGHTS_NAME} in {adapter_dir}")
    try:
        with safe_open(str(path), framework="pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not a dict
    except Exception as e:  # noqa: BLE001 -- safetensors' own error type (SafetensorError) for a damaged file
        raise LoRAError(f"{path} is truncated or not a safetensors file ({' '.join(str(e).split())[:160]}); "
                        f"copy the adapter again or use another checkpoint") from None
    for key, t in weights.items():
        if not t.is_floating_point():
            raise LoRAError(f"{path}: {key} has dtype {str(t.dtype).removeprefix('torch.')}; LoRA weights "
                            f"are floating point (float32, bfloat16 or float16): the file is not a LoRA "
                            f"adapter or was damaged")
        if not bool(torch.isfinite(t).all()):
            raise LoRAError(f"{path}: {key} holds NaN or inf values (the run that wrote it had diverged); "
                            f"use an earlier checkpoint")
    return weights


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config, tensors) of an adapter dir, fully checked without any model: types of the config,
    whole and floating-point finite tensors. `load_adapter` then checks them against the model."""
    adapter_dir = Path(adapter_dir)
    return read_adapter_config(adapter_dir), _read_weights(adapter_dir)


def _few(items: Iterable[str], limit: int = 6) -> str:
    items = sorted(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike,
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a PEFT-format LoRA adapter into `model` (in place; also returned), strictly.

    A model without LoRA gets it injected first, as `adapter_config.json` describes (r, lora_alpha,
    lora_dropout, target_modules, use_rslora; adapter weights in `dtype`). A model that already has
    LoRA must agree with the config on rank, scaling and the set of wrapped modules. Every tensor must
    fit; anything missing, unexpected or mis-shaped raises `LoRAError` before any weight is copied.
    """
    adapter_dir = Path(adapter_dir)
    cfg, weights = read_adapter(adapter_dir)
    r, alpha, rslora = int(cfg["r"]), cfg["lora_alpha"], bool(cfg.get("use_rslora", False))
    mods = lora_modules(model)
    if mods:
        for name, m in mods.items():
            if (m.r, m.alpha, m.use_rslora) != (r, alpha, rslora):
                raise LoRAError(f"adapter {adapter_dir} has r={r}, lora_alpha={alpha}, use_rslora={rslora} "
                                f"but {name} has r={m.r}, alpha={m.alpha}, use_rslora={m.use_rslora}; load "
                                f"it into a model without LoRA so it is injected as configured")
            if m.merged:
                raise LoRAError(f"{name} is merged; call lora.unmerge(model) before loading an adapter")
        shapes = {name: (m.in_features, m.out_features) for name, m in mods.items()}
    else:  # plan the injection first, so a mismatching adapter leaves the model untouched
        shapes = {}
        for name in match_targets(model, cfg["target_modules"]):
            lin = model.get_submodule(name)
            shapes[name] = (lin.in_features, lin.out_features)
    expected: dict[str, tuple[int, int]] = {}
    for name, (n_in, n_out) in shapes.items():
        expected[f"{PREFIX}{name}.lora_A.weight"] = (r, n_in)
        expected[f"{PREFIX}{name}.lora_B.weight"] = (n_out, r)
    missing = expected.keys() - weights.keys()
    unexpected = weights.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({_few(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_few(unexpected)})")
        raise LoRAError(f"adapter {adapter_dir} does not fit the model's LoRA modules: {'; '.join(parts)}; "
                        f"check target_modules and that the adapter was trained on this architecture")
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise LoRAError(f"adapter {adapter_dir}: {key} has shape {list(weights[key].shape)} but the "
                            f"model expects {list(shape)} (r={r}); was it trained on a different model size?")
    if not mods:
        inject(model, targets=cfg["target_modules"], r=r, alpha=alpha,
               dropout=float(cfg.get("lora_dropout") or 0.0), use_rslora=rslora, dtype=dtype)
        mods = lora_modules(model)
    params = {}
    for name, m in mods.items():
        params[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        params[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(weights[key].to(dtype=param.dtype))
    return model
