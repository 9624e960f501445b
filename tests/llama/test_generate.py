"""Generation: the KV cache equals a full forward; greedy ids equal transformers' generate."""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import hf_generate, left_pad
from transformers import LlamaForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import llama
from llama.generate import decode_step, filter_logits, sample

PROMPTS = [[1, 45, 300, 17, 9, 88, 120], [1, 5], [1, 400, 401, 402, 7], [1, 33, 34]]






def test_kv_cache_decode_equals_full_forward(tiny_model_dir):
    model = llama.from_pretrained(tiny_model_dir)
    ids, mask = left_pad(PROMPTS)
    B, P = ids.shape
    steps = 6
    follow = torch.randint(3, 512, (B, steps), generator=torch.Generator().manual_seed(0))
    full_ids = torch.cat([ids, follow], dim=1)
    full_mask = torch.cat([mask, torch.ones(B, steps, dtype=torch.long)], dim=1)
    caches = model.make_kv_caches(B, P + steps)
    with torch.no_grad():
        reference = model(full_ids, attention_mask=full_mask)  # no cache: one causal forward
        logits = decode_step(model, ids, attention_mask=full_mask, kv_caches=caches,
                             input_pos=torch.arange(P))
        torch.testing.assert_close(logits, reference[:, P - 1], rtol=0, atol=1e-5)
        for s in range(steps - 1):
            logits = decode_step(model, follow[:, s:s + 1], attention_mask=full_mask, kv_caches=caches,
                                 input_pos=torch.tensor([P + s]))
            torch.testing.assert_close(logits, reference[:, P + s], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", [
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
         rope_theta=500000.0),
    dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True),  # tied random models just repeat
])
def test_greedy_ids_equal_transformers_generate(variant, make_checkpoint):
    path = make_checkpoint(**variant)
    model = llama.from_pretrained(path)
    ref = LlamaForCausalLM.from_pretrained(path).eval()
    n = 12
    with torch.no_grad():
        expected = hf_generate(ref, PROMPTS, n, eos=2)
    ours = llama.generate_ids(model, PROMPTS, max_new_tokens=n)  # eos from the config (2), pad 0
    assert ours == expected
    # An EOS that really occurs mid-way: every row stops before it, exactly like transformers.
    row = next(r for r in expected if len(set(r)) > 1)
    k = next(k for k in range(1, len(row)) if row[k] not in row[:k])
    with torch.no_grad():
        expected = hf_generate(ref, PROMPTS, n, eos=row[k])
    ours = llama.generate_ids(model, PROMPTS, max_new_tokens=n, eos_id=row[k], pad_id=0, batch_size=3)
    assert ours == expected and row[:k] in ours


def test_no_eos_max_new_tokens_and_stop_fn(tiny_model_dir):
    model = llama.from_pretrained(tiny_model_dir)
    full = llama.generate_ids(model, PROMPTS, max_new_tokens=9, eos_id=[])
    assert [len(r) for r in full] == [9] * len(PROMPTS)
    assert llama.generate_ids(model, PROMPTS, max_new_tokens=0) == [[]] * len(PROMPTS)
    assert llama.generate_ids(model, [], max_new_tokens=5) == []
    # stop_fn ends a row and keeps what it saw; the others run on, unaffected by the batch change.
    stopped = llama.generate_ids(model, PROMPTS, max_new_tokens=9, eos_id=[],
                                 stop_fn=lambda new: new[-1] == full[1][4])
    assert stopped[1] == full[1][:full[1].index(full[1][4]) + 1]
    for got, want in zip(stopped, full):
        assert got == want[:len(got)]
    with pytest.raises(ValueError, match="at least one token"):
        llama.generate_ids(model, [[1], []])


def test_generation_under_inference_mode_restores_training_mode(tiny_model_dir):
    model = llama.from_pretrained(tiny_model_dir).train()
    with torch.inference_mode():
        a = llama.generate_ids(model, PROMPTS, max_new_tokens=5, eos_id=[])
    assert model.training
    with torch.no_grad():
        b = llama.generate_ids(model, PROMPTS, max_new_tokens=5, eos_id=[])
    assert a == b


def test_seeded_sampling_is_reproducible(tiny_model_dir):
    model = llama.from_pretrained(tiny_model_dir)
    kw = dict(max_new_tokens=10, eos_id=[], temperature=1.5, top_p=0.98)
    a = llama.generate_ids(model, PROMPTS, seed=123, **kw)
    assert a == llama.generate_ids(model, PROMPTS, seed=123, **kw)
    assert a != llama.generate_ids(model, PROMPTS, seed=124, **kw)
    greedy = llama.generate_ids(model, PROMPTS, max_new_tokens=10, eos_id=[])
    assert llama.generate_ids(model, PROMPTS, max_new_tokens=10, eos_id=[], temperature=0.7, top_k=1,
                              seed=5) == greedy


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (0.7, None, None), (1.0, 5, None), (1.3, None, 0.8), (0.9, 20, 0.5), (1.0, None, 0.05),
])
def test_filter_logits_equals_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(3)) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).expand(20000, 6)
    gen = torch.Generator().manual_seed(0)
    draws = sample(logits, temperature=1.0, top_k=4, generator=gen)
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    want = filter_logits(logits[:1], temperature=1.0, top_k=4).softmax(-1)[0]
    assert freq[4:].sum() == 0
    torch.testing.assert_close(freq, want, rtol=0, atol=0.015)


def test_four_bit_lora_wrapped_model_generates_like_its_own_full_forward(tiny_model_dir):
    import bitsandbytes as bnb
    from torch import nn

    def hook(name, linear):
        m = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                              compute_dtype=torch.float32, quant_type="nf4", device="meta")
        m.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4").to("cpu")
        return m if name.startswith("model.layers.") else linear

    class Wrapped(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.extra = base, nn.Linear(base.in_features, base.out_features, bias=False)
            nn.init.normal_(self.extra.weight, std=0.02)

        def forward(self, x):
            return self.base(x) + self.extra(x)

    model = llama.from_pretrained(tiny_model_dir, linear_hook=hook)
    for layer in model.model.layers:
        layer.self_attn.v_proj = Wrapped(layer.self_attn.v_proj)
    got = llama.generate_ids(model, PROMPTS, max_new_tokens=6, eos_id=[])
    for prompt, new in zip(PROMPTS, got):  # oracle: greedy argmax of an uncached forward per prompt
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert new == seq[len(prompt):]


def test_generate_text_equals_transformers_and_trims_stop_strings(tiny_model_dir):
    model = llama.from_pretrained(tiny_model_dir)
    ref = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = llama.Tokenizer.from_pretrained(tiny_model_dir)
    prompts = ["Gentile Mario Rossi, le confermo", "Ciao", "La spedizione per Forlì è partita;"]
    with torch.no_grad():
        ids = hf_generate(ref, [tok.encode(p, bos=True) for p in prompts], 10, eos=tok.eos_id)
    expected = [tok.decode(r) for r in ids]
    assert llama.generate(model, tok, prompts, max_new_tokens=10, batch_size=2) == expected
    stop = next(t for t in expected if len(t) > 4)[2:4]
    texts = llama.generate(model, tok, prompts, max_new_tokens=10, stop=[stop])
    for got, want in zip(texts, expected):
        assert got == want[:want.find(stop)] if stop in want else got == want
