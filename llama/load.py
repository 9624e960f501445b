"""Load a HF checkpoint of a supported family (safetensors, one file or sharded) into `Llama`, tensor
by tensor.

The model is built on the meta device (no memory), every tensor header is checked against it
before any data is read, then tensors stream in one at a time, converted to the target dtype on
the way. Each shard is re-opened per tensor: safetensors memory-maps the file, and pages touched
through a mapping that stays open count as resident memory until it is closed, so one long-lived
handle would hold the whole shard in RSS next to the converted copy.

`linear_hook(name, linear) -> module` is called as soon as a linear's tensors are loaded (see
docs/INTERFACES.md); `quant` uses it to turn each weight into 4 bits before the next one arrives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import LlamaConfig, LoadError
from .model import Llama

LinearHook = Callable[[str, nn.Linear], nn.Module]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_CONVERT = ("convert it once with transformers: AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(dir, safe_serialization=True)")


def from_pretrained(path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = torch.float32,
                    linear_hook: LinearHook | None = None) -> Llama:
    """Load a HF Llama directory (config.json + safetensors) into a `Llama`, returned in eval mode.

    dtype: the dtype every tensor is converted to (None or "auto": the checkpoint's own dtype).
    device: "cpu", "cuda", "cuda:1", ... or "auto" (CUDA when available).
    Raises `LoadError` (a ValueError) with a one-line message on any bad input.
    """
    path = Path(path)
    if not path.is_dir():
        raise LoadError(f"{path}: no such model directory; pass the folder that holds config.json "
                        "and the *.safetensors weights")
    where = _find_weights(path)  # tensor name -> shard file
    shapes = _read_headers(where, path)  # tensor name -> shape, from the headers only
    _check_counts(path, shapes)  # before a skeleton of config.json's size is built
    cfg = LlamaConfig.from_hf(path)
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                          else "cpu" if device == "auto" else device)
    dtype = _resolve_dtype(dtype, cfg)
    with torch.device("meta"):
        model = Llama(cfg)
    _check_headers(model, shapes=shapes, where=where, path=path)
    _stream(model, where, device=device, dtype=dtype, hook=linear_hook)
    model.model.rotary_emb.reset(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # unreachable after _check_headers; kept so a bug can never return a half-empty model
        raise LoadError(f"{path}: tensors never loaded: {', '.join(left[:5])}")
    return model.eval()


def _resolve_dtype(dtype: torch.dtype | str | None, cfg: LlamaConfig) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = cfg.torch_dtype or "float32"
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise LoadError(f"dtype {dtype!r} is not a torch floating dtype; use float32, bfloat16, float16")
        dtype = resolved
    return dtype


def _find_weights(path: Path) -> dict[str, Path]:
    """Map every tensor name to the file that holds it (single file, or the sharded index)."""
    if (path / SINGLE_FILE).is_file():
        with _open(path / SINGLE_FILE) as f:
            return {name: path / SINGLE_FILE for name in f.keys()}
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:  # ValueError: JSONDecodeError
            raise LoadError(f"{index} is not a valid safetensors index (needs a 'weight_map' object: "
                            f"{_clip(str(e))}); re-save the checkpoint with save_pretrained") from None
        if not isinstance(weight_map, dict):
            raise LoadError(f"{index} is not a valid safetensors index: 'weight_map' must be an object of "
                            f"tensor name -> shard file, got {_json_type(weight_map)}; re-save the "
                            "checkpoint with save_pretrained")
        for name, file in weight_map.items():
            if not _is_shard_name(file):
                shown = _clip(repr(file[:80])) if isinstance(file, str) else _json_type(file)
                raise LoadError(f"{index} maps {_clip(name)} to {shown}, which is not a file name inside "
                                f"{path}: a shard is named relative to the model folder (e.g. "
                                "model-00001-of-00002.safetensors), never absolute or through '..'; "
                                "restore the index the checkpoint was saved with")
        absent = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if absent:
            lost = [n for n, f in weight_map.items() if f in absent]
            raise LoadError(f"{index} names shard {absent[0]} which is absent from {path}"
                            f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}, so "
                            f"{len(lost)} tensor(s) are missing: {summarise_names(lost)}; copy every shard "
                            "listed in the index")
        return {name: path / f for name, f in weight_map.items()}
    if any(path.glob("pytorch_model*.bin")):
        raise LoadError(f"{path} holds only pytorch_model*.bin (a pickle, which can run code: we never "
                        f"unpickle); {_CONVERT}")
    if any(path.glob("consolidated*.pth")):
        raise LoadError(f"{path} holds Meta's original consolidated*.pth format; convert it to the HF "
                        "layout with transformers' convert_llama_weights_to_hf.py")
    found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    raise LoadError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE} (found: {found}); "
                    "save the model with save_pretrained(..., safe_serialization=True)")


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _json_type(value: object) -> str:
    return "null" if value is None else f"{_JSON_TYPES.get(type(value), 'a value')} (JSON)"


def _is_shard_name(file: object) -> bool:
    """A relative path that stays inside the model folder: no root, no drive, no '..', no control
    characters. Judged on the name alone, so shards that are symlinks (the HF hub cache's snapshots
    link into its blobs/ folder) still load."""
    if not isinstance(file, str) or not file or _CONTROL.search(file) or "\\" in file:
        return False
    name = PurePosixPath(file)
    return bool(name.parts) and not name.is_absolute() and ".." not in name.parts and ":" not in name.parts[0]


def _count(n: int) -> str:
    """An int from config.json for an error line: exact up to 19 digits (str() of an int past 4300
    digits raises, and a 4000-digit number says nothing more than "over 10^19")."""
    return str(n) if n < 10**19 else "over 10^19"


def _clip(text: str, limit: int = 80) -> str:
    """At most `limit` characters of `text` for an error line (only the head is ever looked at)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def summarise_names(names: list[str], limit: int = 6) -> str:
    """Every name, compactly and exactly: names that differ in one number are merged into a range,
    e.g. `model.layers.[1].block_sparse_moe.experts.[0-7].w[1-3].weight` stands for 24 tensors."""
    by_pattern: dict[str, list[list[frozenset[int]]]] = {}
    for name in names:
        nums = [frozenset({int(n)}) for n in re.findall(r"\d+", name)]
        by_pattern.setdefault(re.sub(r"\d+", "#", name), []).append(nums)
    out = []
    for pattern, items in sorted(by_pattern.items()):
        for i in reversed(range(pattern.count("#"))):  # merge along one number at a time: stays exact
            merged: dict[tuple[frozenset[int], ...], set[int]] = {}
            for nums in items:
                merged.setdefault(tuple(nums[:i] + nums[i + 1:]), set()).update(nums[i])
            items = [[*rest[:i], frozenset(v), *rest[i:]] for rest, v in merged.items()]
        for nums in items:
            text = iter(str(min(n)) if len(n) == 1 else f"[{_ranges(sorted(n))}]" for n in nums)
            out.append(re.sub("#", lambda _, t=text: next(t), pattern))
    more = f", ... ({len(out) - limit} more)" if len(out) > limit else ""
    return ", ".join(out[:limit]) + more


def _ranges(values: list[int]) -> str:
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


@contextmanager
def _open(file: Path) -> Iterator[Any]:
    """safe_open that turns a corrupt or truncated file into a LoadError naming it."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise LoadError(f"{file} is not a readable safetensors file (truncated or corrupt: {e}); "
                        "re-download or re-save it") from e


def _ignored(name: str, cfg: LlamaConfig) -> bool:
    # transformers < 4.31 saved RoPE tables as `...rotary_emb.inv_freq` (Llama-2-7b-hf has them);
    # they are recomputed. A tied checkpoint may still carry lm_head.weight: the embedding wins.
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def _expected(model: Llama) -> dict[str, tuple[int, ...]]:
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del shapes["lm_head.weight"]  # an alias of model.embed_tokens.weight, not stored
    return shapes


def _read_headers(where: dict[str, Path], path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers (each file opened once, no data read)."""
    by_file: dict[Path, list[str]] = {}
    for name in sorted(where):
        by_file.setdefault(where[name], []).append(name)
    shapes: dict[str, tuple[int, ...]] = {}
    for file, file_names in by_file.items():
        with _open(file) as f:
            held = set(f.keys())
            for name in file_names:
                if name not in held:
                    raise LoadError(f"{path / INDEX_FILE} maps {_clip(name)} to {file.name}, which does not "
                                    "hold it; the index and the shards come from different saves")
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


# config.json counts that decide how many modules the skeleton gets (building 100000 meta layers takes
# minutes), with the tensor names that show how many the checkpoint really has.
_COUNTS = (("num_hidden_layers", re.compile(r"model\.layers\.(\d{1,12})\."), "layer"),
           ("num_local_experts", re.compile(r"model\.layers\.\d{1,12}\.block_sparse_moe\.experts\."
                                            r"(\d{1,12})\."), "expert"))


def _check_counts(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """config.json's layer and expert counts against the tensors present, before the model is built:
    a count larger than the checkpoint's would otherwise build that many meta modules first (minutes
    for `num_hidden_layers: 100000`) only to report their tensors missing. An unreadable config.json
    is left to `LlamaConfig.from_hf`, whose messages say what is wrong with it."""
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(raw, dict):
        return
    for key, pattern, what in _COUNTS:
        want = raw.get(key)
        if not isinstance(want, int) or isinstance(want, bool):
            continue
        held = sorted({int(m.group(1)) for n in shapes if (m := pattern.match(n))})
        if key == "num_local_experts" and not held and raw.get("model_type") != "mixtral":
            continue  # a dense checkpoint: the config's own rules say num_local_experts is not for it
        if want <= len(held):
            continue  # too few in config.json: the unexpected tensors are named after the (small) build
        said = f"config.json says {key}={_count(want)}, the weights hold {len(held)} {what}(s)"
        if what == "layer" and held == list(range(len(held))):
            per_layer = sum(1 for n in shapes if n.startswith(f"model.layers.{held[0]}.")
                            and not n.endswith("rotary_emb.inv_freq")) if held else 0
            first = f"model.layers.{len(held)}.*"
            span = (first if want - len(held) == 1 else f"{first} to model.layers.{want - 1}.*"
                    if want <= 10**19 else f"{first} and every layer above it")
            lacks = f"{_count(per_layer * (want - len(held)))} tensor(s)" if per_layer else "the tensors"
            raise LoadError(f"{path}: the checkpoint lacks {lacks} the config needs: every {span} ({said}); "
                            "config.json and the weights disagree, or a shard is incomplete")
        present = f"{'model.layers' if what == 'layer' else 'experts'}.[{_clip(_ranges(held), 40)}] present"
        raise LoadError(f"{path}: {said} ({present}); config.json and the weights disagree, or a shard is "
                        "incomplete")


def _check_headers(model: Llama, *, shapes: dict[str, tuple[int, ...]], where: dict[str, Path],
                   path: Path) -> None:
    """Names and shapes from the headers only, before any tensor data is read."""
    expected = _expected(model)
    names = {n for n in shapes if not _ignored(n, model.config)}
    missing, unexpected = sorted(expected.keys() - names), sorted(names - expected.keys())
    if missing:
        raise LoadError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the config needs: "
                        f"{summarise_names(missing)}; config.json and the weights disagree, or a shard is "
                        "incomplete")
    if unexpected:
        raise LoadError(f"{path}: the checkpoint has {len(unexpected)} tensor(s) a "
                        f"{model.config.model_type} model does not use: {summarise_names(unexpected)}; is "
                        "this a (non-quantized) checkpoint matching its config.json?")
    for name in sorted(names):
        if shapes[name] != expected[name]:
            raise LoadError(f"{where[name]}: tensor {name} has shape {list(shapes[name])}, expected "
                            f"{list(expected[name])} from config.json; the config does not match the weights")


def _stream(model: Llama, where: dict[str, Path], *, device: torch.device, dtype: torch.dtype,
            hook: LinearHook | None) -> None:
    cfg = model.config
    names = sorted((n for n in where if not _ignored(n, cfg)), key=lambda n: (str(where[n]), n))
    pending: dict[str, dict[str, torch.Tensor]] = {}  # linear path -> its tensors loaded so far
    for name in names:
        with _open(where[name]) as f:
            try:
                t = f.get_tensor(name)
            except SafetensorError as e:
                raise LoadError(f"{where[name]}: cannot read tensor {name} ({e}); the file is corrupt, "
                                "re-download or re-save it") from e
        # copy=True: safetensors hands out tensors backed by the file's memory map; a model living
        # on that mapping would crash (SIGBUS) if the file were rewritten while it is loaded.
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
        module_path, attr = name.rsplit(".", 1)
        module = model.get_submodule(module_path)
        if isinstance(module, nn.Linear):
            got = pending.setdefault(module_path, {})
            got[attr] = t
            if "weight" in got and ("bias" in got or module.bias is None):
                del pending[module_path]
                _finish_linear(model, module_path, module, tensors=got, hook=hook)
        else:
            setattr(module, attr, nn.Parameter(t))
            if name == "model.embed_tokens.weight" and cfg.tie_word_embeddings:
                model.tie_weights()
                _finish_linear(model, "lm_head", model.lm_head, tensors={}, hook=hook)
        del t, module  # the replaced full-precision linear must not outlive this iteration


def _finish_linear(model: Llama, path: str, linear: nn.Linear, *, tensors: dict[str, torch.Tensor],
                   hook: LinearHook | None) -> None:
    """Give the meta linear its real tensors, let the hook replace it, drop our references."""
    for attr, t in tensors.items():
        setattr(linear, attr, nn.Parameter(t))
    tensors.clear()
    if hook is None:
        return
    new = hook(path, linear)
    if not isinstance(new, nn.Module):
        raise TypeError(f"linear_hook returned {type(new).__name__} for {path}; it must return an "
                        "nn.Module (the linear itself to keep it)")
    if new is not linear:
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
