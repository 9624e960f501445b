"""`LoRALinear`: a frozen linear-like module plus a trainable low-rank update (Hu et al., 2021).

    y = base(x) + scaling * B(A(dropout(x))),   A: in -> r,  B: r -> out
    scaling = alpha / r            (LoRA, eq. 3)
    scaling = alpha / sqrt(r)      (rsLoRA, Kalajdzievski 2023: keeps the update's scale rank-stable)

Composition, not subclassing: `base` can be `nn.Linear`, bitsandbytes `Linear4bit` (or any subclass,
e.g. our quant's) or `Linear8bitLt`; only `base(x)`, `in_features` and `out_features` are used on
the forward path. Parameter names (`lora_A.weight` `[r, in]`, `lora_B.weight` `[out, r]`) and the
initialisation (A kaiming-uniform with a=sqrt(5), B zeros, so the wrapped module starts equal to the
base) are PEFT's, which makes PEFT adapters a plain copy.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRAError(ValueError):
    """A LoRA request that cannot be honoured; the message says what, where and how to fix it."""


def _is_quantized(module: nn.Module) -> str | None:
    """Name of the bitsandbytes class in `module`'s MRO, or None for a plain float linear.

    Checked by class name so that `lora` never imports bitsandbytes just to look.
    """
    for cls in type(module).__mro__:
        if cls.__name__ in ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4"):
            return cls.__name__
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(weight, "quant_state", None) is not None:
        return type(weight).__name__
    return None


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    except RuntimeError:  # a device type without autocast at all (e.g. meta)
        return False


def check_hyperparameters(*, r: int, alpha: float, dropout: float, prefix: str = "") -> None:
    """The rules every adapter obeys (run configs are checked against these too): rank r a positive
    integer, alpha > 0, dropout in [0, 1). Raise ``LoRAError`` "<prefix><name> must be ..., got ..."."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoRAError(f"{prefix}r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise LoRAError(f"{prefix}alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoRAError(f"{prefix}dropout must be in [0, 1), got {dropout!r}")


class LoRALinear(nn.Module):
    """Wraps `base` (kept frozen) and adds `scaling * lora_B(lora_A(lora_dropout(x)))`.

    `dtype` is the adapter's own dtype (fp32 by default, whatever the base is): small fp32 adapters
    cost little memory and keep AdamW's updates from being rounded away in bf16.
    """

    def __init__(self, base: nn.Module, *, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        check_hyperparameters(r=r, alpha=alpha, dropout=dropout, prefix="LoRA ")
        in_features = getattr(base, "in_features", None)
        out_features = getattr(base, "out_features", None)
        if not isinstance(in_features, int) or not isinstance(out_features, int):
            raise LoRAError(f"LoRALinear needs a linear-like module with in_features/out_features; "
                            f"got {type(base).__name__}")
        device = next((p.device for p in base.parameters()), None)
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.dropout_p = dropout
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters()
        # New modules start in training mode; inherit the base's, so that injecting into a model in
        # eval() does not switch dropout on behind the user's back.
        self.train(base.training)

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)), B = 0, so the update starts at zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # Deliberately no `weight` property forwarding to the base: code that computes F.linear(x, m.weight)
    # by hand would then skip the adapter silently; without it, it fails loudly instead.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.disabled or self.merged:
            return y
        # Outside autocast the branch runs in the adapter's dtype (fp32 over a bf16 base); under
        # autocast the matmuls run in the autocast dtype anyway, so skip a useless up-cast.
        if not _autocast_on(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        delta = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        # Add at the wider of the two dtypes, then round once to the base output's dtype (as PEFT does).
        return (y + delta).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, `[out, in]`, in the adapter's dtype: what merging adds to W."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge(self, name: str = "") -> None:
        """W <- W + scaling * B @ A in place (exact for fp32 bases; a no-op when already merged)."""
        if self.merged:
            return
        self._check_mergeable(name)
        w = self.base.weight
        with torch.no_grad():
            w.add_(self.delta_weight().to(device=w.device, dtype=w.dtype))
        self.merged = True

    def unmerge(self, name: str = "") -> None:
        """W <- W - scaling * B @ A, undoing `merge` (a no-op when not merged)."""
        if not self.merged:
            return
        w = self.base.weight
        with torch.no_grad():
            w.sub_(self.delta_weight().to(device=w.device, dtype=w.dtype))
        self.merged = False

    def _check_mergeable(self, name: str) -> None:
        where = name or type(self.base).__name__
        quant = _is_quantized(self.base)
        if quant is not None:
            raise LoRAError(f"cannot merge LoRA into {where}: its base is a quantised {quant}, and merging "
                            f"would re-quantise and lose accuracy; use lora.merge_and_export(model, out_dir, "
                            f"base_dir) to write a merged 16-bit model instead")
        w = getattr(self.base, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() \
                or tuple(w.shape) != (self.out_features, self.in_features):
            raise LoRAError(f"cannot merge LoRA into {where}: its base has no floating-point "
                            f"[{self.out_features}, {self.in_features}] weight")

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.use_rslora}, "
                f"merged={self.merged}, disabled={self.disabled}")
