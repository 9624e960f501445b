"""Logits equal transformers' LlamaForCausalLM, through our production loader, for every variant."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

import llama

FP32_TOL = 1e-4  # the bar for fp32 logits
# bf16 (8-bit mantissa): we do the same ops in the same order as transformers, so on CPU the
# measured max |ours - HF| is 0.0 (fp32: 0.0 too); 1e-2 (~2 bf16 ulps at logits of size ~1) leaves
# room for other kernels' summation orders. Either is ~5e-3 from the fp32 logits.
BF16_TOL = 1e-2


def llama3_rope() -> dict:
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}


CASES = {
    "llama2-mha": dict(num_key_value_heads=4),
    "llama3-gqa-rope-llama3": dict(rope_scaling=llama3_rope(), rope_theta=500000.0),
    "llama3-legacy-config": dict(rope_scaling=llama3_rope(), rope_theta=500000.0, legacy_config=True),
    "tied-embeddings": dict(tie_word_embeddings=True),
    "attention-and-mlp-bias": dict(attention_bias=True, mlp_bias=True),
    "fp16-stored": dict(dtype=torch.float16),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # max_position_embeddings 24 < the 40 tokens fed, so dynamic NTK actually rescales
    "rope-dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=24),
    "explicit-head-dim": dict(head_dim=32),
}


def load_both(path, dtype=torch.float32):
    ours = llama.from_pretrained(path, dtype=dtype)
    ref = LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return ours, ref


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers_fp32(case, make_checkpoint):
    path = make_checkpoint(max_shard_size="60KB", **CASES[case])
    assert (path / "model.safetensors.index.json").exists()
    ours, ref = load_both(path)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= FP32_TOL, f"{case}: max abs diff {diff:.2e}"


def test_logits_equal_transformers_bf16(make_checkpoint):
    path = make_checkpoint(rope_scaling=llama3_rope(), rope_theta=500000.0)
    ours, ref = load_both(path, torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    assert a.dtype == torch.bfloat16
    assert (a.float() - b.float()).abs().max().item() <= BF16_TOL


def test_state_dict_keys_are_transformers_keys(make_checkpoint):
    for tied in (False, True):
        ours, ref = load_both(make_checkpoint(tie_word_embeddings=tied, attention_bias=tied))
        ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
        assert list(ours_sd) == list(ref_sd)
        assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
        assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone_and_transformers(side, tiny_model_dir):
    ours, ref = load_both(tiny_model_dir)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 512, (n,), generator=gen) for n in (11, 4, 7)]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    with torch.no_grad():
        batch = ours(ids, attention_mask=mask)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hf = ref(ids, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(batch).all()  # padded rows too: no NaN from all-masked softmax rows
    for i, s in enumerate(seqs):
        real = mask[i].bool()
        with torch.no_grad():
            alone = ours(s[None])[0]
        torch.testing.assert_close(batch[i][real], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(batch[i][real], hf[i][real], rtol=0, atol=FP32_TOL)


def test_padding_gives_finite_gradients(tiny_model_dir):
    model = llama.from_pretrained(tiny_model_dir).train()
    ids = torch.randint(3, 512, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    model(ids, attention_mask=mask).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_hidden_only_is_final_normed_hidden(tiny_model_dir):
    model = llama.from_pretrained(tiny_model_dir)
    ref = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        hidden = model(ids, hidden_only=True)
        ref_hidden = ref.model(ids).last_hidden_state
        assert hidden.shape == (2, 10, 64)
        torch.testing.assert_close(model.lm_head(hidden), model(ids), rtol=0, atol=0)
    torch.testing.assert_close(hidden, ref_hidden, rtol=0, atol=FP32_TOL)


class CountingWrapper(nn.Module):
    """Has no `.weight`: the model must call linears only through their forward."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base, self.calls = base, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.base(x)


def test_linears_can_be_swapped_by_setattr(tiny_model_dir):
    model = llama.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        before = model(ids)
    wrappers = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            wrappers.append(CountingWrapper(module))
            setattr(model.get_submodule(parent) if parent else model, child, wrappers[-1])
    assert len(wrappers) == 2 * 7 + 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    assert all(w.calls == 1 for w in wrappers)


class TinyAdapter(nn.Module):
    """A LoRA-shaped wrapper (frozen base + trainable low-rank path), local to this test."""

    def __init__(self, base: nn.Module, r: int = 4) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)  # non-zero so lora_A gets a gradient too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


def nf4_hook(name: str, linear: nn.Linear) -> nn.Module:
    """Replace decoder linears by bitsandbytes NF4 modules (CPU works in bitsandbytes >= 0.46)."""
    if not name.startswith("model.layers."):
        return linear
    m = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4", device="meta")
    m.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4").to("cpu")
    if linear.bias is not None:
        m.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return m


@pytest.mark.parametrize("four_bit", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(four_bit, tiny_model_dir):
    torch.manual_seed(0)
    model = llama.from_pretrained(tiny_model_dir, linear_hook=nf4_hook if four_bit else None)
    if four_bit:
        assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        for attn_name in ("q_proj", "v_proj"):
            setattr(layer.self_attn, attn_name, TinyAdapter(getattr(layer.self_attn, attn_name)))
    model.train()
    ids = torch.randint(3, 512, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        logits = model(ids, attention_mask=mask)
        F.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1)).backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(trainable) == 2 * 2 * 2
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        grads.append([p.grad.clone() for p in trainable])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
