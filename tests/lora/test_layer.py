"""LoRALinear maths: identity at init, the update formula, merge/unmerge, disable, dtypes, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from lora_testlib import make_toy, model_and_logits, randomize_lora
from torch import nn

import lora
from lora import LoRAError, LoRALinear


def test_b_zero_equals_base_exactly():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    m = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 5, 12)
    assert torch.equal(m(x), base(x))
    # Also for a whole model, every linear wrapped.
    model = make_toy()
    x = torch.randn(4, 3, 8)
    ref = model(x)
    lora.inject(model, targets="all-linear", r=3, alpha=6, dropout=0.0)
    assert torch.equal(model(x), ref)


def test_init_matches_peft_defaults_and_shapes():
    torch.manual_seed(0)
    m = LoRALinear(nn.Linear(64, 32), r=8, alpha=16)
    assert m.lora_A.weight.shape == (8, 64) and m.lora_B.weight.shape == (32, 8)
    assert m.lora_A.bias is None and m.lora_B.bias is None
    assert torch.count_nonzero(m.lora_B.weight) == 0
    # kaiming_uniform(a=sqrt(5)) on [r, in] gives U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1 / math.sqrt(64)
    assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.abs().max() > 0.8 * bound
    assert m.lora_A.weight.dtype == torch.float32 and m.lora_A.weight.requires_grad


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_formula(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    m = LoRALinear(base, r=4, alpha=12, use_rslora=use_rslora)
    randomize_lora(m)
    scaling = 12 / math.sqrt(4) if use_rslora else 12 / 4
    assert m.scaling == pytest.approx(scaling)
    x = torch.randn(2, 10)
    want = base(x) + scaling * (x @ m.lora_A.weight.T @ m.lora_B.weight.T)
    torch.testing.assert_close(m(x), want, rtol=0, atol=1e-6)


def test_merge_unmerge_roundtrip_and_merge_twice_is_noop():
    model = make_toy()
    lora.inject(model, targets="all-linear", r=4, alpha=8, dropout=0.0)
    randomize_lora(model, std=0.3)
    x = torch.randn(4, 3, 8)
    before = model(x)
    with torch.no_grad():
        base_only = {n: m.base.weight.clone() for n, m in lora.lora_modules(model).items()}
    lora.merge(model)
    assert all(m.merged for m in lora.lora_modules(model).values())
    merged = model(x)
    weights_after_one = {n: m.base.weight.clone() for n, m in lora.lora_modules(model).items()}
    lora.merge(model)  # no-op
    for n, m in lora.lora_modules(model).items():
        assert torch.equal(m.base.weight, weights_after_one[n])
    lora.unmerge(model)
    after = model(x)
    assert (merged - before).abs().max() <= 1e-5
    assert (after - before).abs().max() <= 1e-5
    for n, m in lora.lora_modules(model).items():
        assert (m.base.weight - base_only[n]).abs().max() <= 1e-6
    lora.unmerge(model)  # no-op too
    assert (model(x) - before).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["ours", "hf"])
def test_merge_unmerge_on_a_llama(tiny_model_dir, backend):
    model, logits = model_and_logits(backend, tiny_model_dir)
    lora.inject(model, targets="all-linear", r=4, alpha=8, use_rslora=True)
    randomize_lora(model)
    ids = torch.randint(3, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    with lora.disable_adapter(model):
        base = logits(model, ids)
    before = logits(model, ids)
    assert (before - base).abs().max() > 0.1
    lora.merge(model)
    lora.merge(model)
    merged = logits(model, ids)
    lora.unmerge(model)
    after = logits(model, ids)
    assert (merged - before).abs().max() <= 1e-5 and (after - before).abs().max() <= 1e-5


def test_disable_adapter_gives_base_and_restores_state():
    model = make_toy()
    x = torch.randn(2, 3, 8)
    ref = model(x)
    lora.inject(model, targets=["q_proj", "v_proj"], r=2, alpha=4, dropout=0.0)
    randomize_lora(model)
    adapted = model(x)
    assert (adapted - ref).abs().max() > 1e-3
    with lora.disable_adapter(model):
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)
    lora.merge(model)
    with lora.disable_adapter(model):  # merged weights are taken out meanwhile
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)
    assert all(m.merged for m in lora.lora_modules(model).values())
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)


def test_only_lora_gets_grads_and_base_is_unchanged_after_a_step():
    model = make_toy()
    stats = lora.inject(model, targets=["q_proj", "v_proj", "down"], r=4, alpha=8, dropout=0.1)
    randomize_lora(model)  # non-zero B, so A gets a gradient too
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    params = lora.trainable_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(p.numel() for p in params) == stats.trainable
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    model(torch.randn(4, 3, 8)).square().mean().backward()
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_bf16_base_fp32_adapter_and_autocast():
    torch.manual_seed(0)
    base32 = nn.Linear(32, 16)
    base16 = nn.Linear(32, 16).to(torch.bfloat16)
    base16.load_state_dict({k: v.to(torch.bfloat16) for k, v in base32.state_dict().items()})
    m16 = LoRALinear(base16, r=4, alpha=8)
    randomize_lora(m16, std=0.2)
    assert m16.lora_A.weight.dtype == torch.float32  # adapter stays fp32 over a bf16 base
    x = torch.randn(5, 32)
    # Without autocast: bf16 in, bf16 out (the base output's dtype), LoRA branch computed in fp32.
    y = m16(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    xb = x.to(torch.bfloat16)
    want = base16(xb).float() + 2.0 * (xb.float() @ m16.lora_A.weight.T @ m16.lora_B.weight.T)
    torch.testing.assert_close(y.float(), want.to(torch.bfloat16).float(), rtol=0, atol=1e-6)
    # Under autocast over an fp32 base: output in the autocast dtype, close to the fp32 result,
    # gradients reach the fp32 adapter in fp32.
    m32 = LoRALinear(base32, r=4, alpha=8)
    randomize_lora(m32, std=0.2)
    ref = m32(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m32(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert m32.lora_A.weight.grad.dtype == torch.float32 and m32.lora_B.weight.grad.abs().sum() > 0


def test_adapter_dtype_is_configurable():
    m = LoRALinear(nn.Linear(8, 8), r=2, alpha=2, dtype=torch.bfloat16)
    assert m.lora_A.weight.dtype == torch.bfloat16
    assert m(torch.randn(1, 8)).dtype == torch.float32


@pytest.mark.parametrize("kwargs, msg", [
    (dict(r=0, alpha=8), "positive integer"),
    (dict(r=4, alpha=0), "alpha"),
    (dict(r=4, alpha=8, dropout=1.0), "dropout"),
])
def test_bad_hyperparameters_raise(kwargs, msg):
    with pytest.raises(LoRAError, match=msg):
        LoRALinear(nn.Linear(4, 4), **kwargs)


def test_non_linear_base_raises():
    with pytest.raises(LoRAError, match="in_features"):
        LoRALinear(nn.LayerNorm(4), r=2, alpha=2)
