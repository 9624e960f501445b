"""Dequantise once for inference: a dense base with the adapter merged, when it fits in memory.

Generating from a 4-bit base dequantises every weight at every decode step (forward only, but each
step is a whole pass over the weights), and an unmerged adapter adds two small matmuls per linear.
For evaluation nothing is trained, so each 4-bit linear can be replaced, once, by an `nn.Linear`
holding its dequantised weight (bitsandbytes' own values) plus the LoRA update, added in fp32 and
rounded once to the compute dtype (as `lora.merge_and_export` does). On fp32 that gives the 4-bit +
LoRA path's logits to ~1e-6; on bf16 the merged weight is rounded once more than the unmerged sum.

The swap is in place and one linear at a time, so the peak is the final dense model plus one
linear. Whether it fits is checked against free memory first (CUDA: free device memory plus what
torch's caching allocator holds unused; CPU: the kernel's MemAvailable), with a margin for the KV
cache and activations; the decision is one printed line either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lora
import quant

GiB = 2**30
MARGIN = 1.15  # headroom over the weights: KV cache, activations, allocator fragmentation


@dataclass(frozen=True)
class DensePlan:
    extra_bytes: int  # memory the dense copy adds (dense weights minus the 4-bit ones it replaces)
    available_bytes: int  # free memory on the model's device now
    layers: int  # linears that would change (4-bit ones, and LoRA-wrapped ones)

    @property
    def fits(self) -> bool:
        return self.extra_bytes * MARGIN <= self.available_bytes


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown: never guess that it fits


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each linear to densify: LoRA wrappers (with their base) and bare 4-bit linears."""
    out, under = [], []
    for name, m in model.named_modules():
        if any(name.startswith(u + ".") for u in under):
            continue
        if isinstance(m, lora.LoRALinear) or _is_4bit(m):
            out.append((name, m))
            under.append(name)
    return out


def _is_4bit(m: nn.Module) -> bool:
    return getattr(getattr(m, "weight", None), "quant_state", None) is not None


def plan_dense(model: nn.Module, dtype: torch.dtype | None = None) -> DensePlan:
    """How much memory a dense merged copy adds, and how much is free (nothing is changed)."""
    extra = 0
    targets = _targets(model)
    for _, m in targets:
        base = m.base if isinstance(m, lora.LoRALinear) else m
        if _is_4bit(base):
            out_f, in_f = base.weight.quant_state.shape
            size = torch.empty((), dtype=dtype or base.weight.quant_state.dtype).element_size()
            packed = base.weight.numel() * base.weight.element_size()
            extra += out_f * in_f * size - packed
    device = next(model.parameters()).device
    return DensePlan(extra_bytes=max(extra, 0), available_bytes=available_memory(device), layers=len(targets))


def densify(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every 4-bit / LoRA linear by a dense ``nn.Linear`` (adapter merged), in place; returns model.

    ``dtype``: the dense weights' dtype (default: each 4-bit weight's compute dtype, or the base's).
    The model is meant for inference afterwards: the adapter is folded in and no longer separate.
    """
    for name, m in _targets(model):
        base = m.base if isinstance(m, lora.LoRALinear) else m
        with torch.no_grad():
            if _is_4bit(base):
                w = quant.dequantize(base).float()  # bitsandbytes' exact dequantised values
                out_dtype = dtype or base.weight.quant_state.dtype
            else:
                w = base.weight.detach().float()
                out_dtype = dtype or base.weight.dtype
            if isinstance(m, lora.LoRALinear) and not m.merged and not m.disabled:
                w = w + m.delta_weight().detach().float().to(w.device)  # merged in fp32, rounded once
            bias = getattr(base, "bias", None)
            dense = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
            dense.weight = nn.Parameter(w.to(out_dtype), requires_grad=False)
            if bias is not None:
                dense.bias = nn.Parameter(bias.detach().to(out_dtype), requires_grad=False)
        del w
        dense.train(m.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
    return model


def maybe_densify(model: nn.Module, setting: bool | str, *, log: Callable[[str], None] = print,
                  dtype: torch.dtype | None = None) -> bool:
    """``eval.dense``: densify when asked (true) or when it fits (auto); one line says what happens.

    Returns True if the model is now dense. Asked for (true) but too big: says so, stays 4-bit.
    """
    plan = plan_dense(model, dtype)
    if plan.layers == 0:
        return False  # already dense, no adapter: nothing to fold
    if setting is False:
        log("generation: eval.dense false: generating from the 4-bit / unmerged weights")
        return False
    need, free = plan.extra_bytes / GiB, plan.available_bytes / GiB
    if not plan.fits:
        asked = "eval.dense true, but a" if setting is True else "generation: a"
        log(f"{asked} dense merged copy needs {need:.2f} GiB more (x{MARGIN} headroom) and only "
            f"{free:.2f} GiB is free: generating from the 4-bit weights")
        return False
    densify(model, dtype)
    log(f"generation: dense merged copy (each 4-bit weight dequantised once, adapter folded in): "
        f"+{need:.2f} GiB, {free:.2f} GiB was free")
    return True
