"""The 4-bit linear: bitsandbytes stores the weight, our autograd Function computes with it.

Storage is bitsandbytes' own (`Params4bit` + `QuantState`, its quantiser, its state_dict
serialisation), so `isinstance(m, bnb.nn.Linear4bit)` and `m.weight.quant_state` hold. The compute
path is ours: measured on an H100 (see DESIGN.md, "Performance model"), a `bnb.nn.Linear4bit` call
costs 0.6-0.9 ms per linear regardless of size, mostly overhead, while `dequantize_4bit` takes ~0.1 ms
and the bf16 matmul 0.2-0.5 ms. So forward = dequantise + one matmul in the compute dtype; backward =
dequantise again + one matmul for the input gradient. The 16-bit weight is never saved for backward
(that would undo the memory saving), and the base gets no weight gradient (it is frozen).

`linear_4bit` is the single function to replace with a fused dequant-matmul kernel later.
"""

from __future__ import annotations

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


class _Dequant4bitLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantised on the fly, in forward and again in backward.

    Only the packed 4-bit weight is kept for backward (a reference to the model's own parameter, no
    copy), so activation memory is that of x alone, as with a dense layer under checkpointing.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Params4bit, bias: torch.Tensor | None,  # noqa: ANN001
                dtype: torch.dtype) -> torch.Tensor:
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # Autocast would re-cast inside; the dtype was already chosen by the caller.
        with torch.autocast(x.device.type, enabled=False):
            w = dequantize(weight, dtype)
            return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        grad_x = grad_bias = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.to(ctx.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = (g @ dequantize(ctx.weight, ctx.dtype)).to(ctx.x_dtype)  # dL/dx = g W
            if ctx.needs_input_grad[2]:
                grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


def linear_4bit(x: torch.Tensor, weight: Params4bit, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    """x @ dequant(weight)^T + bias, computed and returned in `dtype`. Swap this for a fused kernel."""
    return _Dequant4bitLinear.apply(x, weight, bias, dtype)


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
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A module conversion that rebuilt the Parameter loses .quant_state; bnb restores it from the module.
        fix_4bit_weight_quant_state_from_module(self)
        dtype = self.compute_dtype or x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        return linear_4bit(x, self.weight, self.bias, dtype)

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
