"""LoRA over real bitsandbytes 4-bit (NF4) and 8-bit bases: same maths as over the dequantised weight."""

from __future__ import annotations

import pytest
import torch
from lora_testlib import hf_llama, quantize_linears, randomize_lora, to_linear4bit
from torch import nn

import lora
from lora import LoRAError, LoRALinear

bnb = pytest.importorskip("bitsandbytes")


def _pair(base_q: nn.Module, bias: torch.Tensor | None, **kw) -> tuple[LoRALinear, LoRALinear]:
    """LoRALinear over the quantised module and over an nn.Linear holding its dequantised weight."""
    w = lora.dense_weight(base_q)
    dense = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        dense.weight.copy_(w)
        if bias is not None:
            dense.bias.copy_(bias)
    a, b = LoRALinear(base_q, **kw), LoRALinear(dense, **kw)
    randomize_lora(a, std=0.2)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "lora_" in k}, strict=False)
    return a, b


def _forward_backward(m: LoRALinear, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = m(x)
    y.backward(g)
    return y.detach(), x.grad, m.lora_A.weight.grad, m.lora_B.weight.grad


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_over_linear4bit_equals_lora_over_dequantised(use_rslora):
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    q = to_linear4bit(lin)
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.dtype == torch.uint8
    w = lora.dense_weight(q)
    assert w.shape == (96, 128) and 1e-3 < (w - lin.weight).abs().max() < 0.1  # really NF4-rounded
    a, b = _pair(q, lin.bias, r=8, alpha=16, use_rslora=use_rslora)
    x, g = torch.randn(3, 7, 128), torch.randn(3, 7, 96)
    ya, gxa, gAa, gBa = _forward_backward(a, x, g)
    yb, gxb, gAb, gBb = _forward_backward(b, x, g)
    for got, want in ((ya, yb), (gxa, gxb), (gAa, gAb), (gBa, gBb)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert q.weight.grad is None


def test_lora_over_linear4bit_bf16_compute():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    q = to_linear4bit(lin, compute_dtype=torch.bfloat16)
    a, b = _pair(q, lin.bias, r=4, alpha=8)
    x, g = torch.randn(5, 64), torch.randn(5, 64)
    ya, gxa, *_ = _forward_backward(a, x, g)
    yb, gxb, *_ = _forward_backward(b, x, g)
    # bnb computes the base matmul in bf16: agree to bf16 precision.
    torch.testing.assert_close(ya, yb, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gxa, gxb, rtol=2e-2, atol=2e-2)


def test_lora_over_linear8bit_equals_lora_over_dequantised():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    m8 = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False, threshold=0.0)
    m8.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    m8.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    m8 = m8.to("cpu")
    a, b = _pair(m8, lin.bias, r=4, alpha=8)
    x, g = torch.randn(4, 64), torch.randn(4, 48)
    for got, want in zip(_forward_backward(a, x, g), _forward_backward(b, x, g)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(LoRAError, match="Linear8bitLt.*merge_and_export"):
        a.merge()


def test_inject_and_train_over_a_4bit_llama(tiny_model_dir):
    model = hf_llama(tiny_model_dir)
    dense_total = sum(p.numel() for p in model.parameters())
    quantized = quantize_linears(model)
    assert len(quantized) == 14
    stats = lora.inject(model, targets="all-linear", r=4, alpha=8, dropout=0.0)
    assert len(stats.names) == 14
    assert stats.total == dense_total + stats.trainable  # 4-bit weights counted at their logical size
    randomize_lora(model)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    opt = torch.optim.AdamW(lora.trainable_parameters(model), lr=1e-3)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    model.train()
    logits = model(input_ids=ids).logits
    nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1)).backward()
    for name, m in lora.lora_modules(model).items():
        assert m.lora_A.weight.grad.abs().sum() > 0 and m.lora_B.weight.grad.abs().sum() > 0, name
    opt.step()
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)
    with pytest.raises(LoRAError, match=r"layers\.0\.self_attn\.q_proj: .* Linear4bit.*merge_and_export"):
        lora.merge(model)
    assert not any(m.merged for m in lora.lora_modules(model).values())
