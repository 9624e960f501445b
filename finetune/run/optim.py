"""Optimizer, learning-rate schedule and mixed precision of a training run (``train.*`` settings)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from finetune.config import TrainConfig
from finetune.errors import UserError


def lr_factor(step: int, total_steps: int, *, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak LR for the (0-based) optimizer step ``step``.

    Warmup is linear and never 0 (nanoGPT's ``(it + 1) / (warmup + 1)``), then cosine
    (``0.5 (1 + cos(pi p))``, Loshchilov & Hutter 2017, SGDR without restarts), linear (``1 - p``) or
    constant, with p the fraction of the post-warmup steps already done.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(params: list[nn.Parameter], train_cfg: TrainConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: torch's (fused on CUDA) or bitsandbytes' 8-bit / paged ones.

    The 8-bit variants keep the two Adam moments in blockwise 8-bit (Dettmers et al. 2022); the paged
    one also lets them spill to CPU memory under pressure, as in the QLoRA paper (Dettmers et al. 2023).
    """
    if train_cfg.optimizer == "adamw":
        fused = device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                 **({"fused": True} if fused else {}))
    if device.type != "cuda":
        raise UserError(f"train.optimizer={train_cfg.optimizer} needs a CUDA device (bitsandbytes' 8-bit "
                        "optimizers are GPU kernels); use train.optimizer: adamw on CPU")
    import bitsandbytes as bnb  # lazy: loading it probes CUDA libraries; only 8-bit optimizers need it

    cls = bnb.optim.PagedAdamW8bit if train_cfg.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


@dataclass
class Precision:
    """How a step computes: the autocast context and the loss scaler.

    The scaler is a real ``GradScaler`` that is *disabled* unless fp16 needs loss scaling; disabled,
    its ``scale`` returns the loss as is, ``unscale_``/``update`` do nothing and ``step`` is the
    optimizer's, so the loop runs one code path for every precision.
    """

    label: str  # fp32 | bf16 | fp16
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler


def make_precision(train_cfg: TrainConfig, model_dtype: str, device: torch.device) -> Precision:
    """bf16 autocast on CUDA; fp16 autocast + GradScaler only when asked (warned); fp32 on CPU."""
    amp = train_cfg.amp
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            warnings.warn(f"train.amp={amp} is ignored on {device}: CPU training computes in float32",
                          stacklevel=2)
        amp = "fp32"
    elif amp == "auto":
        amp = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[model_dtype]
    if amp == "fp16":
        warnings.warn("train.amp=fp16: float16 autocast with a GradScaler (loss scaling) can overflow and "
                      "skip steps; prefer bf16 on GPUs that support it (Ampere and newer)", stacklevel=2)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = contextlib.nullcontext if dtype is None else (lambda: torch.autocast("cuda", dtype=dtype))
    return Precision(amp, autocast, torch.amp.GradScaler("cuda", enabled=amp == "fp16"))
