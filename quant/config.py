"""What to quantise and how: `QuantConfig`, and the one error type of the package."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

# bitsandbytes' quantize_4bit accepts exactly these block sizes.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class QuantError(ValueError):
    """A user-facing quantisation error: one line saying what is wrong, where, and how to fix it."""


@dataclass(frozen=True)
class QuantConfig:
    """How base weights are stored in 4 bits (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

    quant_type: "nf4" (NormalFloat: 16 levels at the quantiles of N(0, 1), information-theoretically
        right for normally distributed weights) or "fp4" (a 4-bit float; worse for LLM weights).
    double_quant: quantise the per-block fp32 absmax scales again, to 8 bits in blocks of 256. Storage
        per weight falls from 4 + 32/64 = 4.5 bits to 4 + 8/64 + 32/(64*256) ≈ 4.127 bits.
    blocksize: weights per absmax scale (64 as in the paper; smaller = more accurate, more scales).
    compute_dtype: the dtype the dequantised weight is multiplied in: bf16 on GPU (fp16 works but
        needs a GradScaler in training), fp32 on CPU (bf16 matmuls are slow there).
    targets: regex searched in a linear's module path; the default picks every linear inside the
        decoder blocks (q/k/v/o and the MLP), where ~96% of a Llama's parameters are.
    skip: name patterns kept in the compute dtype even when `targets` matches. Each is a regex that
        must match whole dotted components of the path ("lm_head" matches `lm_head`, "layers\\.1"
        does not match `layers.10`).

    Why `lm_head` and `embed_tokens` stay 16-bit by default: together they are ~4% of Llama-2-7B's
    parameters (2 x 32000 x 4096), so quantising them saves little memory, but their error is not
    averaged away: the embedding row of a token *is* the input of the whole network, and the head's
    error lands directly on every logit. The head also sits at the top of the backward pass, so the
    loss gradient reaching every LoRA adapter in every layer first flows through it; a noisier head
    means noisier gradients everywhere. (transformers' bitsandbytes integration likewise leaves the
    output head unconverted "for numerical stability"; embeddings are not linears there at all.)
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype = torch.bfloat16
    targets: str = r"^model\.layers\.\d+\."
    skip: tuple[str, ...] = ("lm_head", "embed_tokens")

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise QuantError(f"quant_type {self.quant_type!r} is not supported; use one of {QUANT_TYPES}")
        if self.blocksize not in BLOCKSIZES:
            raise QuantError(f"blocksize {self.blocksize!r} is not supported by bitsandbytes; use one of "
                             f"{BLOCKSIZES}")
        if not isinstance(self.double_quant, bool):
            raise QuantError(f"double_quant must be true or false, got {self.double_quant!r}")
        object.__setattr__(self, "compute_dtype", _as_dtype(self.compute_dtype))
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        object.__setattr__(self, "skip", skip)
        for pattern in (self.targets, *skip):
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise QuantError(f"quant name pattern {pattern!r} is not a valid regex ({e}); fix targets "
                                 "or skip") from None

    def selects(self, name: str) -> bool:
        """True if the linear at module path `name` should be stored in 4 bits."""
        if not re.search(self.targets, name):
            return False
        return not any(re.search(rf"(?:^|\.)(?:{p})(?:$|\.)", name) for p in self.skip)

    def storage(self) -> dict[str, Any]:
        """The settings that decide the stored bits (a pre-quantised file must agree on all of them)."""
        return {"quant_type": self.quant_type, "double_quant": self.double_quant, "blocksize": self.blocksize}

    def to_dict(self) -> dict[str, Any]:
        return {**self.storage(), "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
                "targets": self.targets, "skip": list(self.skip)}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype not in COMPUTE_DTYPES:
        raise QuantError(f"compute_dtype {dtype!r} is not supported; use bfloat16, float16 or float32")
    return dtype
