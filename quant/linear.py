"""The 4-bit linear: bitsandbytes stores the weight, our autograd Function computes with it.

Storage is bitsandbytes' own (`Params4bit` + `QuantState`, its quantiser, its state_dict
serialisation), so `isinstance(m, bnb.nn.Linear4bit)` and `m.weight.quant_state` hold. The compute
path is ours: measured on an H100 (see docs/DESIGN.md, "Performance model"), a `bnb.nn.Linear4bit` call
costs 0.6-0.9 ms per linear regardless of size, mostly overhead, while `dequantize_4bit` takes ~0.1 ms
and the bf16 matmul 0.2-0.5 ms. So forward = dequantise + one matmul in the compute dtype; backward =
dequantise again + one matmul for the input gradient. The 16-bit weight is never saved for backward
(that would undo the memory saving), and the base gets no weight gradient (it is frozen).

`linear_4bit` is the single function to replace with a fused dequant-matmul kernel later.

Why the module keeps plain-tensor aliases of its storage (`Packed4bit`): `Params4bit` is a tensor
subclass with its own `__torch_function__`, and torch.compile (dynamo) cannot trace the call that
turns it back into a plain tensor (`as_subclass`), so every 4-bit linear used to be a graph break.
The aliases share memory with the parameter and its quant state (nothing is copied); they are made
when the module is built, rebuilt after `.to()`/`load_state_dict`, and checked in eager mode, so the
traced region only sees plain tensors and bitsandbytes' own registered ops (which have fake
implementations for tracing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F
from bitsandbytes.nn import Params4bit
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
from torch import nn

from .config import QuantConfig, QuantError


def dequantize(weight: Params4bit | nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense `[out, in]` weight of a 4-bit parameter (or module), in `dtype` (default: as stored)."""
    if isinstance(weight, nn.Module):
        weight = weight.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        raise QuantError(f"dequantize: the weight {tuple(weight.shape)} has no bitsandbytes quant_state; it "
                         "is not a quantised 4-bit weight")
    # as_subclass: hand bitsandbytes a plain tensor, so torch_function never wraps the result in Params4bit.
    w = bnbf.dequantize_4bit(weight.as_subclass(torch.Tensor), qs)
    return w if dtype is None else w.to(dtype)


@dataclass(frozen=True)
class Packed4bit:
    """Plain tensors (aliases, no copies) and constants that dequantise one 4-bit weight.

    `data` is the packed uint8 weight; `absmax` the per-block scales (fp32, or uint8 when double
    quantised, in which case `absmax2`/`code2`/`offset` undo the second quantisation).
    """

    data: torch.Tensor
    absmax: torch.Tensor
    absmax2: torch.Tensor | None
    code2: torch.Tensor | None
    offset: torch.Tensor | None
    blocksize: int
    blocksize2: int
    quant_type: str
    shape: tuple[int, int]
    dtype: torch.dtype

    @classmethod
    def of(cls, weight: Params4bit) -> Packed4bit:
        qs = weight.quant_state
        if qs is None:
            raise QuantError(f"the weight {tuple(weight.shape)} has no bitsandbytes quant_state; it is not a "
                             "quantised 4-bit weight")
        nested = bool(qs.nested)
        return cls(data=weight.data, absmax=qs.absmax,  # .data: a plain-tensor alias of the packed bytes
                   absmax2=qs.state2.absmax if nested else None, code2=qs.state2.code if nested else None,
                   offset=torch.as_tensor(qs.offset, dtype=torch.float32, device=qs.absmax.device)
                   if nested else None,
                   blocksize=int(qs.blocksize), blocksize2=int(qs.state2.blocksize) if nested else 0,
                   quant_type=str(qs.quant_type), shape=(int(qs.shape[0]), int(qs.shape[1])), dtype=qs.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense `[out, in]` weight, as `bitsandbytes.functional.dequantize_4bit` computes it.

        The same two registered bitsandbytes ops that function calls, with the same arguments, so the
        values are bit-identical (a test checks it); written out only so tracing sees plain tensors.
        """
        absmax = self.absmax
        if self.absmax2 is not None:
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                absmax, self.absmax2, self.code2, self.blocksize2, torch.float32) + self.offset
        w = torch.ops.bitsandbytes.dequantize_4bit.default(self.data, absmax, self.blocksize, self.quant_type,
                                                             list(self.shape), self.dtype)
        return w if dtype is None or dtype == w.dtype else w.to(dtype)


def _same_storage(packed: Packed4bit | None, weight: Any) -> bool:
    """Whether `packed` still aliases `weight` and its current quant state (eager-mode check)."""
    qs = getattr(weight, "quant_state", None)
    return (packed is not None and qs is not None and packed.absmax is qs.absmax
            and packed.data.data_ptr() == weight.data_ptr() and packed.data.device == weight.device)


class _Dequant4bitLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantised on the fly, in forward and again in backward.

    Only the packed 4-bit weight is kept for backward (a reference to the model's own parameter, no
    copy), so activation memory is that of x alone, as with a dense layer under checkpointing.
    """

    @staticmethod  # positional parameters: autograd.Function.apply passes no keywords
    def forward(ctx, x: torch.Tensor, packed: Packed4bit, bias: torch.Tensor | None,  # noqa: ANN001
                dtype: torch.dtype) -> torch.Tensor:
        ctx.packed, ctx.dtype, ctx.x_dtype = packed, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # Autocast would re-cast inside; the dtype was already chosen by the caller.
        with torch.autocast(x.device.type, enabled=False):
            w = packed.dequantize(dtype)
            return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        grad_x = grad_bias = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.to(ctx.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = (g @ ctx.packed.dequantize(ctx.dtype)).to(ctx.x_dtype)  # dL/dx = g W
            if ctx.needs_input_grad[2]:
                grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


def linear_4bit(x: torch.Tensor, weight: Params4bit | Packed4bit, bias: torch.Tensor | None, *,
                dtype: torch.dtype) -> torch.Tensor:
    """x @ dequant(weight)^T + bias, computed and returned in `dtype`. Swap this for a fused kernel.

    `weight` is a `Params4bit` (eager only) or its `Packed4bit` aliases (traceable by torch.compile).
    """
    packed = weight if isinstance(weight, Packed4bit) else Packed4bit.of(weight)
    return _Dequant4bitLinear.apply(x, packed, bias, dtype)


class Linear4bit(bnb.nn.Linear4bit):
    """A bitsandbytes `Linear4bit` (same storage, same state_dict) whose forward is `linear_4bit`.

    The input is cast to `compute_dtype` and the output is returned in it. Under autocast the
    autocast dtype wins, as it would for an `nn.Linear`.
    """

    @classmethod
    def from_params(cls, weight: Params4bit, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                    ) -> Linear4bit:
        """Wrap an already-quantised `Params4bit` (and an optional dense bias); nothing is allocated."""
        qs = weight.quant_state
        out_features, in_features = qs.shape
        # Built on meta: bnb's constructor would otherwise allocate and init a full fp32 weight first.
        m = cls(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                compress_statistics=qs.nested, quant_type=qs.quant_type, quant_storage=weight.dtype,
                device="meta")
        weight.module = m
        weight.requires_grad_(False)
        m.weight = weight
        m.quant_state = qs
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        m.refresh_packed()
        return m

    def refresh_packed(self) -> None:
        """(Re)build the plain-tensor aliases the forward computes with (see the module docstring)."""
        fix_4bit_weight_quant_state_from_module(self)
        qs = getattr(self.weight, "quant_state", None)
        # object.__setattr__: a plain attribute, not a buffer (it must not be moved, saved or broadcast).
        object.__setattr__(self, "packed", Packed4bit.of(self.weight) if qs is not None else None)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 -- nn.Module's hook for .to()/.cuda()/...
        out = super()._apply(fn, recurse)
        self.refresh_packed()  # the move made a new Params4bit (and quant state): alias the new storage
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_packed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and not _same_storage(getattr(self, "packed", None),
                                                                   self.weight):
            # Eager safety net: a conversion that rebuilt the parameter (bnb restores a lost quant state
            # from the module) or assigned a new one. Traced code trusts the aliases made here.
            self.refresh_packed()
        dtype = self.compute_dtype or x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        return linear_4bit(x, self.packed, self.bias, dtype=dtype)

    def extra_repr(self) -> str:
        qs = self.weight.quant_state
        return (f"{super().extra_repr()}, quant_type={qs.quant_type}, blocksize={qs.blocksize}, "
                f"double_quant={qs.nested}, compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")


def to_4bit(linear: nn.Linear, qc: QuantConfig, name: str = "") -> nn.Module:
    """Quantise an `nn.Linear` on its own device with bitsandbytes; returns our `Linear4bit`.

    The weight is cast to `compute_dtype` first, so the quant state's dtype (what dequantisation
    returns) is the compute dtype and the forward needs no extra cast. A module that is already
    4-bit is returned unchanged. The caller's linear keeps its dense weight; drop it to free memory.
    """
    where = f" {name}" if name else ""
    if isinstance(linear, bnb.nn.Linear4bit):
        return linear
    if not isinstance(linear, nn.Linear):
        raise QuantError(f"to_4bit{where}: expected an nn.Linear, got {type(linear).__name__}")
    if linear.weight.is_meta:
        raise QuantError(f"to_4bit{where}: the weight is on the meta device (not loaded yet); quantise after "
                         "loading, or use quant.load_quantized for a pre-quantised directory")
    w = linear.weight.detach().to(qc.compute_dtype)
    # Params4bit.to(device) on an unquantised parameter is bitsandbytes' own quantise step.
    params = Params4bit(w, requires_grad=False, blocksize=qc.blocksize, compress_statistics=qc.double_quant,
                        quant_type=qc.quant_type, quant_storage=torch.uint8).to(w.device)
    del w
    return Linear4bit.from_params(params, linear.bias, qc.compute_dtype)
