"""The 4-bit linear traces: no graph break in an NF4 + LoRA training forward or a KV-cache decode step.

Dynamo cannot turn bitsandbytes' `Params4bit` back into a plain tensor, so `quant.Linear4bit` keeps
plain-tensor aliases (`Packed4bit`) of its storage and calls bitsandbytes' registered ops on them.
These tests pin: the aliases dequantise to exactly bitsandbytes' values, they follow the module when
its storage changes, `torch._dynamo.explain` counts zero graph breaks, and inductor's compiled
logits and gradients equal eager ones (fp32, <= 1e-5).
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
from torch import nn

import llama
import lora
import quant
from llama.generate import _decode_one, decode_step

CPU32 = quant.QuantConfig(compute_dtype=torch.float32)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, model_type="llama")


def nf4_lora_model(layers: int = 1, seed: int = 0) -> llama.Llama:
    torch.manual_seed(seed)
    model = llama.Llama(llama.LlamaConfig.from_hf(dict(TINY, num_hidden_layers=layers)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    quant.quantize_model(model, CPU32)
    lora.inject(model, targets="all-linear", r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # a non-zero B, so the adapter really contributes
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_packed_aliases_dequantise_to_bitsandbytes_values(quant_type: str, double_quant: bool) -> None:
    lin = nn.Linear(128, 48)
    m = quant.to_4bit(lin, quant.QuantConfig(quant_type=quant_type, double_quant=double_quant,
                                             compute_dtype=torch.float32))
    expected = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
    assert torch.equal(m.packed.dequantize(), expected)
    assert m.packed.data.data_ptr() == m.weight.data_ptr()  # an alias, not a copy
    assert type(m.packed.data) is torch.Tensor


def test_aliases_follow_a_replaced_weight() -> None:
    a = quant.to_4bit(nn.Linear(64, 32, bias=False), CPU32)
    b = quant.to_4bit(nn.Linear(64, 32, bias=False), CPU32)
    x = torch.randn(3, 64)
    assert not torch.equal(a(x), b(x))
    a.weight = b.weight  # a parameter assigned by hand: the eager forward re-aliases it
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert a.packed.data.data_ptr() == b.weight.data_ptr()


def test_no_graph_break_in_training_forward_with_checkpointing_and_in_decode_step() -> None:
    torch._dynamo.reset()
    model = nf4_lora_model(layers=2).train()
    model.gradient_checkpointing = True
    ids = torch.randint(3, 256, (2, 12))

    def train_loss(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, hidden_only=True).float().square().mean()

    ex = torch._dynamo.explain(train_loss)(ids)
    assert ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
    assert ex.graph_count == 1

    model.eval()
    caches = model.make_kv_caches(2, 16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        ex = torch._dynamo.explain(decode_step)(model, ids[:, :1], attention_mask=mask, kv_caches=caches,
                                                input_pos=torch.tensor([12]))
    assert ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
    assert ex.graph_count == 1
    # ... and the step generate_ids compiles (fullgraph=True), on its precomputed tables
    real = mask.bool()
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ex = torch._dynamo.explain(_decode_one)(model, ids[:, :1], real=real, positions=positions,
                                                keys=torch.arange(16), kv_caches=caches,
                                                slot=torch.tensor([12]))
    assert ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
    assert ex.graph_count == 1


def test_inductor_logits_and_lora_grads_equal_eager(compiler) -> None:
    model = nf4_lora_model(layers=1).train()
    ids = torch.randint(3, 256, (2, 10))
    params = lora.trainable_parameters(model)

    def loss_and_grads(fn) -> tuple[torch.Tensor, list[torch.Tensor]]:  # noqa: ANN001
        for p in params:
            p.grad = None
        logits = fn(ids)
        logits.float().logsumexp(-1).mean().backward()
        return logits.detach(), [p.grad.clone() for p in params]

    eager_logits, eager_grads = loss_and_grads(model)
    compiled_logits, compiled_grads = loss_and_grads(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=0, atol=1e-5)
    for g_c, g_e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)
