"""Shared helpers for the lora tests (imported as `lora_testlib`): toy models, tiny HF Llamas
(transformers is the oracle), real bitsandbytes 4-bit linears."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import lora


class ToyBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.q_proj(h) * torch.sigmoid(self.v_proj(h))
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Toy(nn.Module):
    """A small non-Llama model with Llama-like suffixes (q_proj, v_proj) and others (up, down, head)."""

    def __init__(self, d: int = 16, n_layers: int = 2, n_out: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.layers = nn.ModuleList(ToyBlock(d) for _ in range(n_layers))
        self.lm_head = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def make_toy(seed: int = 0, **kwargs) -> Toy:
    torch.manual_seed(seed)
    return Toy(**kwargs)


def randomize_lora(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every A and B non-zero values (B starts at zero, which would hide most bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sorted(lora.lora_modules(model).items()):
            for p in (m.lora_A.weight, m.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def randomize_peft(peft_model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Same for a PEFT model's lora_A/lora_B parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in peft_model.named_parameters() if ".lora_" in n):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def hf_llama(model_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def hf_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def have_our_llama() -> bool:
    """True once the project's llama package has its loader (it is written in parallel)."""
    return (importlib.util.find_spec("llama") is not None
            and Path(__file__).resolve().parents[2].joinpath("llama", "load.py").is_file())


def our_llama(model_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    if not have_our_llama():
        pytest.skip("llama.from_pretrained is not there yet")
    import llama

    return llama.from_pretrained(model_dir, dtype=dtype).eval()


def model_and_logits(backend: str, model_dir: Path, dtype: torch.dtype = torch.float32):
    """(model, logits_fn) for "hf" (transformers' LlamaForCausalLM) or "ours" (llama.from_pretrained)."""
    if backend == "hf":
        return hf_llama(model_dir, dtype), hf_logits
    model = our_llama(model_dir, dtype)

    def logits(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return m(ids)

    return model, logits


def to_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A real bitsandbytes NF4 Linear4bit holding `linear`'s weight (`.to('cpu')` quantises it)."""
    import bitsandbytes as bnb

    m = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4")
    m.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        m.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return m.to("cpu").train(linear.training)


def quantize_linears(model: nn.Module, pattern: str = r".*layers\.\d+\..*") -> list[str]:
    """Swap every nn.Linear whose path fully matches `pattern` for a Linear4bit; returns the paths."""
    import re

    done = []
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and re.fullmatch(pattern, name):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, to_linear4bit(m))
            done.append(name)
    return done
