"""A whole tiny HF Llama through llama.from_pretrained with the quant hook: wiring, accuracy, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llama
import quant

FP32 = torch.float32


def _ids(vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def _four_bit(model: nn.Module) -> dict[str, quant.Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, quant.Linear4bit)}


def _dequantised_twin(path: Path, model4: nn.Module) -> nn.Module:
    """The same Llama in fp32 whose linears hold the dequantised 4-bit weights: NF4's error, no wiring."""
    twin = llama.from_pretrained(path, dtype=FP32)
    with torch.no_grad():
        for name, m in _four_bit(model4).items():
            twin.get_submodule(name).weight.copy_(quant.dequantize(m, FP32))
    return twin


def test_hook_quantises_exactly_the_decoder_linears(tiny_model_dir: Path) -> None:
    model = llama.from_pretrained(tiny_model_dir, linear_hook=quant.nf4(compute_dtype=FP32))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    q4 = set(_four_bit(model))
    n_layers = model.config.num_hidden_layers
    assert len(q4) == 7 * n_layers and q4 == {n for n in linears if n.startswith("model.layers.")}
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == FP32
    assert type(model.model.embed_tokens) is nn.Embedding
    for m in q4:
        qs = model.get_submodule(m).weight.quant_state
        assert (qs.quant_type, qs.blocksize, qs.nested) == ("nf4", 64, True)
    # The post-hoc path stores the very same bits as the streaming one.
    dense = quant.quantize_model(llama.from_pretrained(tiny_model_dir, dtype=FP32),
                                 quant.QuantConfig(compute_dtype=FP32))
    for name, m in _four_bit(dense).items():
        assert torch.equal(m.weight.data, model.get_submodule(name).weight.data)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_isolation_logits_equal_dequantised_fp32_twin(tiny_model_dir: Path, quant_type: str) -> None:
    model4 = llama.from_pretrained(tiny_model_dir, linear_hook=quant.nf4(compute_dtype=FP32,
                                                                         quant_type=quant_type))
    twin = _dequantised_twin(tiny_model_dir, model4)
    ids, mask = _ids(), torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0  # left padding: the mask path too
    with torch.no_grad():
        torch.testing.assert_close(model4(ids, attention_mask=mask), twin(ids, attention_mask=mask),
                                   rtol=1e-5, atol=1e-5)


def test_logits_close_to_fp32_model(tiny_model_dir: Path) -> None:
    model4 = llama.from_pretrained(tiny_model_dir, linear_hook=quant.nf4(compute_dtype=FP32))
    ref = llama.from_pretrained(tiny_model_dir, dtype=FP32)
    with torch.no_grad():
        a, b = model4(_ids()), ref(_ids())
    rel = ((a - b).norm() / b.norm()).item()
    # Measured 0.11 (max abs 0.10 on logits of std 0.18): NF4 noise on a random model whose every weight
    # is N(0, 0.02) and carries signal; a wiring bug (wrong layer, transposed weight) gives rel ~1.
    assert rel < 0.2, rel
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.75


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_gradients_reach_4bit_inputs(tiny_model_dir: Path, checkpointing: bool) -> None:
    model4 = llama.from_pretrained(tiny_model_dir, linear_hook=quant.nf4(compute_dtype=FP32)).train()
    twin = _dequantised_twin(tiny_model_dir, model4).train()
    for m in (model4, twin):
        m.gradient_checkpointing = checkpointing
        for name, p in m.named_parameters():
            p.requires_grad_("layers" not in name)  # train embeddings, final norm and head only

    # Gradients arriving at each 4-bit layer's input (a tensor hook also fires on the tensors that
    # non-reentrant checkpointing recomputes during backward).
    grads: dict[str, dict[str, torch.Tensor]] = {"4bit": {}, "twin": {}}

    def capture(model: nn.Module, store: dict[str, torch.Tensor]) -> None:
        for name in _four_bit(model4):
            def pre(_m: nn.Module, args: tuple, name: str = name) -> None:
                if args[0].requires_grad:
                    args[0].register_hook(lambda g: store.__setitem__(name, g))
            model.get_submodule(name).register_forward_pre_hook(pre)

    capture(model4, grads["4bit"])
    capture(twin, grads["twin"])
    ids = _ids()
    losses = []
    for m in (model4, twin):
        logits = m(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads["4bit"].keys() == set(_four_bit(model4))  # every 4-bit layer's input got a gradient
    for name, g in grads["4bit"].items():
        assert g.abs().sum() > 0 and torch.isfinite(g).all(), name
        torch.testing.assert_close(g, grads["twin"][name], rtol=1e-4, atol=1e-6)
    emb4, emb_twin = model4.model.embed_tokens.weight, twin.model.embed_tokens.weight
    torch.testing.assert_close(emb4.grad, emb_twin.grad, rtol=1e-4, atol=1e-7)

    packed = {n: m.weight.data.clone() for n, m in _four_bit(model4).items()}
    before = emb4.detach().clone()
    opt = torch.optim.AdamW([p for p in model4.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    assert not torch.equal(before, emb4)
    assert all(torch.equal(packed[n], m.weight.data) for n, m in _four_bit(model4).items())
    with torch.no_grad():
        logits = model4(ids)
        after = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert after.item() < losses[0]


@pytest.mark.gpu
def test_cuda_streaming_peak_is_4bit_model_plus_one_dense_linear(make_checkpoint) -> None:
    path = make_checkpoint(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=8, dtype=torch.bfloat16)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = llama.from_pretrained(path, device="cuda", dtype=torch.bfloat16,
                                  linear_hook=quant.nf4(compute_dtype=torch.bfloat16))
    peak = torch.cuda.max_memory_allocated() - base
    final = torch.cuda.memory_allocated() - base
    largest = 2 * 1024 * 2816  # one bf16 MLP linear
    assert final <= quant.memory_report(model).total_bytes * 1.05 + 2**20
    assert peak <= final + 3 * largest, (peak, final)  # dense linear + its bf16 copy + quantiser scratch
