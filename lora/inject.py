"""Put LoRA into any model by swapping its linear children, and the model-wide helpers around it.

Targets follow PEFT's matching rules so that PEFT's `target_modules` mean the same here:
a list of names matches a module whose path equals the name or ends with `.name`; a single string
is a regex that must match the whole path (`re.fullmatch`); `"all-linear"` is every linear except
the output head (`lm_head`, or what `model.get_output_embeddings()` returns).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .layer import LoRAError, LoRALinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class InjectStats:
    """What `inject` did: parameter counts (4-bit weights counted at their logical size) and the paths."""

    trainable: int
    total: int
    names: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"LoRA on {len(self.names)} modules: trainable params {self.trainable:,} / "
                f"{self.total:,} ({self.percent:.4f}%)")


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` in `model`, by module path (the path of the linear it replaced)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def linear_names(model: nn.Module) -> list[str]:
    """Paths of the linear layers LoRA could wrap: `nn.Linear` (bitsandbytes' subclass it too) and
    existing `LoRALinear`s, but not the linears inside a `LoRALinear`, nor `nn.MultiheadAttention`'s
    `out_proj` (MHA reads its weight directly and never calls it, so a wrapper would never run)."""
    names: list[str] = []
    skip: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(m, LoRALinear):
            skip.append(name)
            names.append(name)
        elif isinstance(m, nn.MultiheadAttention):
            skip.append(name)
        elif isinstance(m, nn.Linear):
            names.append(name)
    return names


def _output_head_names(model: nn.Module) -> set[str]:
    heads = {n for n in linear_names(model) if n.rsplit(".", 1)[-1] == "lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        heads |= {n for n, m in model.named_modules() if out is not None and m is out}
    return heads


def _name_list(names: Sequence[str], limit: int = 12) -> str:
    # Collapse per-layer repeats (model.layers.0.x, model.layers.1.x) so the message stays readable.
    shown = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in names})
    more = f", ... ({len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def _nested_repeat(items: object, inside: bool = False) -> bool:
    """True if a repeat (`*`, `+`, `{m,}`, `{m,n}` with n > 1), or an alternation, sits inside a repeat."""
    try:
        from re import _constants as C  # Python 3.11+
    except ImportError:  # pragma: no cover -- Python 3.10
        import sre_constants as C  # noqa: N812
    repeats = (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", C.MAX_REPEAT))
    for op, av in items:  # type: ignore[attr-defined]
        if op in repeats:
            lo, hi, sub = av
            if hi is C.MAXREPEAT or hi > 1:
                if inside:
                    return True
                if _nested_repeat(sub, True):
                    return True
            elif _nested_repeat(sub, inside):
                return True
        elif op is C.SUBPATTERN:
            if _nested_repeat(av[-1], inside):
                return True
        elif op is C.BRANCH:
            if inside:  # (a|ab)* : alternatives under a repeat can overlap just like nested repeats
                return True
            if any(_nested_repeat(alt, inside) for alt in av[1]):
                return True
        elif op in (C.ASSERT, C.ASSERT_NOT):
            if _nested_repeat(av[1], inside):
                return True
    return False


def compile_target_regex(targets: str, what: str = "LoRA targets regex") -> re.Pattern:
    """Compile a `targets` regex, refusing the shapes that make Python's backtracking matcher exponential.

    Python's `re` has no timeout: a pattern such as `(\\w*\\.?\\w*)*X` takes exponential time on a path
    it does not match. The dangerous shapes all repeat something that itself repeats, so a repeat
    nested in a repeat is refused (module paths are dotted names: `.*q_proj` or a list of names
    says the same). What is left runs in time polynomial in the (short) module path.
    """
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise LoRAError(f"{what} {targets!r} is invalid: {e}") from None
    try:
        try:
            from re import _parser as parser  # Python 3.11+
        except ImportError:  # pragma: no cover -- Python 3.10
            import sre_parse as parser
        nested = _nested_repeat(parser.parse(targets).data)
    except Exception:  # noqa: BLE001 -- the private parser changed: keep the compiled pattern
        nested = False
    if nested:
        raise LoRAError(f"{what} {targets!r} repeats a group that itself repeats or "
                        f"alternates (such as (a*)*, (\\w+\\.)+ or (a|ab)*), which can take exponential "
                        f"time to match; write it without the nested repeat (e.g. '.*\\.(q_proj|v_proj)') "
                        f"or give a list of names")
    return pattern


def match_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Module paths of the linears `targets` selects (PEFT semantics; see the module docstring).

    Raises `LoRAError` naming the linears that exist when nothing (or, for a list, one entry)
    matches: a typo must not silently train nothing.
    """
    linears = linear_names(model)
    if isinstance(targets, str) and targets == "all-linear":
        heads = _output_head_names(model)
        found = [n for n in linears if n not in heads]
        if not found:
            raise LoRAError(f"targets='all-linear' found no linear layer (other than the output head) in "
                            f"{type(model).__name__}")
        return found
    if isinstance(targets, str):
        pattern = compile_target_regex(targets)
        found = [n for n in linears if pattern.fullmatch(n)]
        if not found:
            raise LoRAError(f"LoRA targets regex {targets!r} matches no linear layer (it must match the "
                            f"whole path); linear layers are: {_name_list(linears)}")
        return found
    targets = list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise LoRAError(f"LoRA targets must be a non-empty list of module names, a regex or 'all-linear'; "
                        f"got {targets!r}")
    found = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linears)]
    if unmatched:
        raise LoRAError(f"LoRA targets {unmatched} match no linear layer in {type(model).__name__}; "
                        f"linear layers are: {_name_list(linears)}")
    return found


def _numel(p: torch.Tensor) -> int:
    # A 4-bit Params4bit stores two weights per byte; its quant_state knows the logical shape.
    qs = getattr(p, "quant_state", None)
    shape = getattr(qs, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared parameters counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _set_child(model: nn.Module, path: str, child: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    # Follow the parent's train/eval mode: a model put in eval() must not get active LoRA dropout
    # (modules swapped in later, e.g. by a quantiser, may have been left in training mode).
    child.train(parent.training)
    setattr(parent, attr, child)


def inject(model: nn.Module, targets: str | Sequence[str] = DEFAULT_TARGETS, *, r: int = 16,
           alpha: float = 32, dropout: float = 0.05, use_rslora: bool = False,
           dtype: torch.dtype = torch.float32) -> InjectStats:
    """Wrap every targeted linear of `model` in a `LoRALinear` (in place) and freeze everything else.

    Call it once the base weights are loaded (and quantised, if they are). Only the new `lora_A` /
    `lora_B` weights have `requires_grad=True` afterwards. Returns the counts and the wrapped paths.
    """
    existing = lora_modules(model)
    if existing:
        raise LoRAError(f"model already has LoRA on {len(existing)} modules (e.g. {next(iter(existing))}); "
                        f"inject once per model, or load the adapter with lora.load_adapter")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoRAError(f"LoRA rank r must be a positive integer, got {r!r}")
    names = match_targets(model, targets)
    for name in names:  # before any allocation: r = 1,000,000 must not be an out-of-memory kill
        lin = model.get_submodule(name)
        side = min(lin.in_features, lin.out_features)
        if r > side:
            raise LoRAError(f"LoRA rank r={r} is larger than the smaller side of {name} "
                            f"({lin.in_features} -> {lin.out_features}); a rank above {side} adds "
                            f"parameters without adding expressiveness: use r <= {side}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        _set_child(model, name, LoRALinear(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                           dtype=dtype))
    trainable, total = count_parameters(model)
    return InjectStats(trainable=trainable, total=total, names=names)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A and B weights (what `save_adapter` stores): hand these to the optimiser."""
    params: list[nn.Parameter] = []
    for m in lora_modules(model).values():
        params += [m.lora_A.weight, m.lora_B.weight]
    return params


def _require_lora(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    mods = lora_modules(model)
    if not mods:
        raise LoRAError(f"lora.{what}: {type(model).__name__} has no LoRA modules; call lora.inject or "
                        f"lora.load_adapter first")
    return mods


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += scaling * B @ A) so inference costs nothing extra.

    All modules are checked before any is changed; quantised bases refuse (see merge_and_export).
    Merging an already merged model is a no-op.
    """
    mods = _require_lora(model, "merge")
    for name, m in mods.items():
        if not m.merged:
            m._check_mergeable(name)
    for name, m in mods.items():
        m.merge(name)


def unmerge(model: nn.Module) -> None:
    """Undo `merge` (W -= scaling * B @ A); exact up to fp32 rounding for fp32 bases."""
    for name, m in _require_lora(model, "unmerge").items():
        m.unmerge(name)


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes the base alone (merged adapters are unmerged meanwhile)."""
    mods = _require_lora(model, "disable_adapter")
    state = {name: (m.merged, m.disabled) for name, m in mods.items()}
    try:
        for name, m in mods.items():
            m.unmerge(name)
            m.disabled = True
        yield model
    finally:
        for name, m in mods.items():
            was_merged, was_disabled = state[name]
            m.disabled = was_disabled
            if was_merged:
                m.merge(name)
