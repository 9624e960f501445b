"""Where a model's weight memory goes: 4-bit weights and their statistics, dense frozen, trainable."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import QuantConfig


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of a model's parameters in three disjoint parts (shared tensors counted once).

    quantized_*: 4-bit weights: packed codes (two per byte) and their quantisation statistics
        (per-block absmax, with double quantisation the 8-bit absmax plus its fp32 second-level
        scales and offset, and the 16- and 256-entry code tables).
    dense_*: frozen weights kept in a float dtype (embeddings, lm_head, norms, biases).
    trainable_*: parameters with requires_grad (LoRA adapters; the optimizer adds ~2x this for Adam).
    """

    quantized_params: int
    quantized_bytes: int
    quant_stats_bytes: int
    dense_params: int
    dense_bytes: int
    trainable_params: int
    trainable_bytes: int

    @property
    def bits_per_quantized_param(self) -> float:
        """Storage per 4-bit weight including statistics: NF4 + double quant, blocksize 64 ≈ 4.127."""
        if not self.quantized_params:
            return 0.0
        return 8 * (self.quantized_bytes + self.quant_stats_bytes) / self.quantized_params

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.quant_stats_bytes + self.dense_bytes + self.trainable_bytes

    def __str__(self) -> str:
        return (f"4-bit {_size(self.quantized_bytes + self.quant_stats_bytes)} "
                f"({self.quantized_params:,} params, {self.bits_per_quantized_param:.3f} bits/param incl. "
                f"{_size(self.quant_stats_bytes)} quant stats) | dense frozen {_size(self.dense_bytes)} "
                f"({self.dense_params:,} params) | trainable {_size(self.trainable_bytes)} "
                f"({self.trainable_params:,} params) | total {_size(self.total_bytes)}")


def memory_report(model: nn.Module) -> MemoryReport:
    """Count the bytes of every parameter of `model` (and of the 4-bit weights' quant states)."""
    seen: set[tuple[str, int, int]] = set()  # memory already counted (a tensor shared by two modules)

    def nbytes(t: torch.Tensor | None) -> int:
        if t is None or not isinstance(t, torch.Tensor):
            return 0
        key = (str(t.device), t.untyped_storage().data_ptr() if not t.is_meta else id(t), t.storage_offset())
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    q_params = q_bytes = stats = d_params = d_bytes = t_params = t_bytes = 0
    for p in model.parameters():  # named_parameters de-duplicates tied weights
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            q_params += torch.Size(qs.shape).numel()
            q_bytes += nbytes(p)
            stats += nbytes(qs.absmax) + nbytes(qs.code)
            if qs.nested:
                stats += nbytes(qs.offset) + nbytes(qs.state2.absmax) + nbytes(qs.state2.code)
        elif p.requires_grad:
            t_params += p.numel()
            t_bytes += nbytes(p)
        else:
            d_params += p.numel()
            d_bytes += nbytes(p)
    return MemoryReport(q_params, q_bytes, stats, d_params, d_bytes, t_params, t_bytes)


def estimate_memory(model: nn.Module, qc: QuantConfig) -> MemoryReport:
    """The `memory_report` that quantising `model` with `qc` would give, from shapes alone.

    Works on a meta-device skeleton (no weights, no memory), so the 4-bit footprint of a 47B-parameter
    Mixtral can be stated without the checkpoint; LoRA injected into the skeleton counts as trainable.
    Per selected linear of n weights in blocks of b: ceil(n/2) bytes of codes; statistics ceil(n/b)
    absmax (uint8 with double quant, else fp32), the 16-entry fp32 code table and, with double quant,
    ceil(n/b/256) fp32 second-level absmax, their 256-entry code table and one fp32 offset: what
    bitsandbytes stores (checked against a real quantised model in the tests). Everything else counts
    at its own dtype, as in `memory_report`.
    """
    # A LoRA adapter's own lora_A / lora_B linears are never quantised (the LoRA `base` linear is).
    selected = {id(m.weight) for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and qc.selects(name)
                and not name.rpartition(".")[2].startswith("lora_")}
    q_params = q_bytes = stats = d_params = d_bytes = t_params = t_bytes = 0
    for p in model.parameters():
        n = p.numel()
        if id(p) in selected:
            blocks = -(-n // qc.blocksize)
            q_params += n
            q_bytes += -(-n // 2)
            if qc.double_quant:
                stats += 16 * 4 + blocks + 4 * -(-blocks // 256) + 256 * 4 + 4
            else:
                stats += 16 * 4 + 4 * blocks
        elif p.requires_grad:
            t_params += n
            t_bytes += n * p.element_size()
        else:
            d_params += n
            d_bytes += n * p.element_size()
    return MemoryReport(q_params, q_bytes, stats, d_params, d_bytes, t_params, t_bytes)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
