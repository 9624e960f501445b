"""Put 4-bit linears into a model: while the checkpoint streams in (a llama linear_hook), or afterwards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .linear import to_4bit

LinearHook = Callable[[str, nn.Linear], nn.Module]


def make_hook(qc: QuantConfig) -> LinearHook:
    """A `linear_hook` for `llama.from_pretrained`: quantise each selected linear as soon as it loads.

    The loader hands over one dense linear at a time and drops it once the hook returns, so the peak
    is the 4-bit model plus one dense linear, never the dense model. Linears `qc` does not select are
    returned unchanged (the loader keeps them as they are, in its dtype).
    """

    def hook(name: str, linear: nn.Linear) -> nn.Module:
        return to_4bit(linear, qc, name) if qc.selects(name) else linear

    return hook


def nf4(compute_dtype: torch.dtype | str = torch.bfloat16, **kwargs: Any) -> LinearHook:
    """Shorthand: `make_hook(QuantConfig(quant_type="nf4", compute_dtype=..., **kwargs))`."""
    return make_hook(QuantConfig(**{"quant_type": "nf4", **kwargs, "compute_dtype": compute_dtype}))


def quantize_model(model: nn.Module, qc: QuantConfig) -> nn.Module:
    """Swap every selected `nn.Linear` of an already-loaded model for a 4-bit one, in place.

    Needs the dense model in memory first; prefer the loader hook (`make_hook`) for big checkpoints.
    Returns the model.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and qc.selects(name):
            new = to_4bit(module, qc, name)
            if new is not module:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)
    return model
