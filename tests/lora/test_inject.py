"""inject: PEFT's target semantics, freezing, counts, clear errors, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from lora_testlib import hf_llama, make_toy, model_and_logits, randomize_lora
from torch import nn

import lora
from lora import LoRAError, LoRALinear


def _peft_targets(model_dir, target_modules) -> set[str]:
    """The module paths PEFT wraps for `target_modules` on HF's LlamaForCausalLM (the oracle)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(hf_llama(model_dir), LoraConfig(r=2, lora_alpha=4, target_modules=target_modules))
    prefix = "base_model.model."
    return {n.removeprefix(prefix).removesuffix(".lora_A") for n, _ in pm.named_modules()
            if n.endswith(".lora_A")}


@pytest.mark.parametrize("targets", [
    ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear",
    r".*\.(gate|down)_proj",
    ["model.layers.1.self_attn.v_proj", "up_proj"],
])
def test_targets_select_what_peft_selects(tiny_model_dir, targets):
    model = hf_llama(tiny_model_dir)
    stats = lora.inject(model, targets=targets, r=2, alpha=4)
    assert set(stats.names) == _peft_targets(tiny_model_dir, targets)
    assert set(lora.lora_modules(model)) == set(stats.names)
    assert "lm_head" not in stats.names


def test_freezes_everything_else_and_counts(tiny_model_dir):
    model = hf_llama(tiny_model_dir)
    total_before = sum(p.numel() for p in model.parameters())
    stats = lora.inject(model, r=4, alpha=8)
    # q,k,v,o per layer: A [4, 64] + B [out, 4]; q/o out 64, k/v out 32 (GQA), 2 layers.
    per_layer = 4 * 64 * 4 + 4 * (64 + 32 + 32 + 64)
    assert stats.trainable == 2 * per_layer
    assert stats.total == total_before + stats.trainable
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert "trainable params" in str(stats)


def test_no_match_names_existing_linears(tiny_model_dir):
    model = hf_llama(tiny_model_dir)
    with pytest.raises(LoRAError, match=r"\['q_prj'\].*model\.layers\.N\.self_attn\.q_proj"):
        lora.inject(model, targets=["q_prj", "v_proj"])
    with pytest.raises(LoRAError, match="regex.*must match the whole path.*mlp.gate_proj"):
        lora.inject(model, targets=r"q_proj")  # fullmatch, as in PEFT
    with pytest.raises(LoRAError, match="invalid"):
        lora.inject(model, targets=r"(q_proj")
    # Nothing was changed by the failed calls.
    assert not lora.lora_modules(model)
    assert all(p.requires_grad for p in model.parameters())


def test_inject_twice_raises(tiny_model_dir):
    model = make_toy()
    lora.inject(model, targets=["q_proj"], r=2, alpha=2)
    with pytest.raises(LoRAError, match="already has LoRA"):
        lora.inject(model, targets=["v_proj"], r=2, alpha=2)


def test_multihead_attention_out_proj_is_not_a_target():
    # MHA uses out_proj.weight directly, so wrapping it would be a silent no-op: it must not be chosen.
    model = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    stats = lora.inject(model, targets="all-linear", r=2, alpha=4, dropout=0.0)
    assert sorted(stats.names) == ["linear1", "linear2"]
    assert type(model.self_attn.out_proj) is not LoRALinear


@pytest.mark.parametrize("backend", ["hf", "ours"])
def test_gradient_checkpointing_gives_every_a_and_b_a_gradient(tiny_model_dir, backend):
    model, _ = model_and_logits(backend, tiny_model_dir)
    lora.inject(model, targets="all-linear", r=2, alpha=4, dropout=0.0)
    randomize_lora(model)
    if backend == "hf":
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing = True
    model.train()
    calls = []
    lora.lora_modules(model)["model.layers.0.self_attn.q_proj"].register_forward_hook(
        lambda *_: calls.append(1))
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(lora.trainable_parameters(model), lr=0.1)
    out = model(input_ids=ids) if backend == "hf" else model(ids)
    logits = out.logits if backend == "hf" else out
    nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1)).backward()
    assert len(calls) == 2  # forward + recompute in backward: checkpointing really was on
    mods = lora.lora_modules(model)
    assert len(mods) == 14
    for name, m in mods.items():
        for p in (m.lora_A.weight, m.lora_B.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    frozen = [p for n, p in model.named_parameters() if ".lora_" not in n]
    assert all(p.grad is None for p in frozen)


def test_injected_modules_follow_the_models_train_eval_mode():
    model = make_toy().eval()
    model.layers[0].q_proj.train()  # e.g. a module swapped in after model.eval()
    lora.inject(model, targets=["q_proj"], r=2, alpha=4, dropout=0.5)
    assert not any(m.training for m in model.modules())
    x = torch.randn(3, 2, 8)
    assert torch.equal(model(x), model(x))  # no active dropout
    model.train()
    assert all(m.training for m in lora.lora_modules(model).values())


@pytest.mark.parametrize("regex", [r"(\w*\.?\w*)*X", r"(?:\w+\.)+q_proj", r"(a|ab)*c",
                                   r"([a-z_]+|\.)+q_proj"])
def test_backtracking_target_regexes_are_refused_at_once(regex):
    import time

    model = make_toy()
    start = time.perf_counter()
    with pytest.raises(LoRAError, match="can take exponential time to match"):
        lora.inject(model, targets=regex, r=2)
    assert time.perf_counter() - start < 0.1
    assert not lora.lora_modules(model)


def test_rank_larger_than_a_layer_is_refused_before_any_allocation():
    model = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(LoRAError, match=r"r=1000000 is larger than the smaller side of 0 \(32 -> 8\)"):
        lora.inject(model, targets="all-linear", r=1_000_000)
    with pytest.raises(LoRAError, match="positive integer"):
        lora.inject(model, targets="all-linear", r=0)
    assert not lora.lora_modules(model) and all(p.requires_grad for p in model.parameters())
    lora.inject(model, targets=["0"], r=8)  # r equal to the smaller side is fine
