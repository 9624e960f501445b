"""Mistral, Mixtral, Gemma, Phi and Qwen2 through the one decoder, against transformers and PEFT.

Every checkpoint is a tiny random `<Family>ForCausalLM` written by transformers' own save_pretrained
(sharded, odd head counts, GQA/MQA; see hf_fixtures.FAMILY_CONFIGS), loaded by our production
loader. The bars are the issue's: fp32 logits within 1e-4 of transformers' with and without left
padding, greedy KV-cache generation identical to transformers' `generate`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import hf_fixtures
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import llama
import lora
import quant
from llama import LlamaConfig, LoadError

FP32_TOL = 1e-4
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
# The seed recipe's LoRA targets (the four attention projections) under each family's module names:
# Phi calls its output projection dense (PEFT targets the same names).
TARGETS = {"mistral": QKVO, "mixtral": QKVO, "gemma": QKVO, "qwen2": QKVO,
           "phi": ["q_proj", "k_proj", "v_proj", "dense"]}
FAMILIES = list(hf_fixtures.FAMILY_CONFIGS)
# (family, overrides): the published shape of each family plus the variants that change the maths.
CASES = {
    "mistral-window8": ("mistral", {}),
    "mistral-window8-legacy-config": ("mistral", dict(legacy_config=True)),
    "mixtral-5experts-top2": ("mixtral", {}),
    "mixtral-window6-legacy-config": ("mixtral", dict(sliding_window=6, legacy_config=True)),
    "gemma-mqa-headdim32": ("gemma", {}),
    "gemma-legacy-config": ("gemma", dict(legacy_config=True)),
    "phi-partial-rotary": ("phi", {}),
    "phi-legacy-config": ("phi", dict(legacy_config=True)),
    "qwen2": ("qwen2", {}),
    "qwen2-sliding-layer1": ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen2-sliding-legacy-config": ("qwen2", dict(use_sliding_window=True, sliding_window=6,
                                                  max_window_layers=1, legacy_config=True)),
}
PROMPTS = [[1, 45, 300, 17, 9, 88, 120], [1, 5], [1, 400, 401, 402, 7], [1, 33, 34]]
IDS = torch.randint(3, 512, (3, 40), generator=torch.Generator().manual_seed(0))


def hf_model(path: Path, family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return hf_fixtures.hf_classes(family)[1].from_pretrained(path, dtype=dtype).eval()


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory: pytest.TempPathFactory):
    """family -> a sharded tiny checkpoint of it (made once per module)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = hf_fixtures.make_family_checkpoint(
                tmp_path_factory.mktemp(family), family, max_shard_size="60KB")
        return made[family]

    return get


def _left_padded(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones_like(ids)
    mask[0, :13], mask[2, :3] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


def max_diffs(ours: nn.Module, ref: nn.Module, ids: torch.Tensor = IDS) -> tuple[float, float]:
    """(max |ours - HF| without padding, the same over the real tokens of a left-padded batch)."""
    padded, mask = _left_padded(ids)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = (ours(ids) - ref(ids).logits).abs().max().item()
        got = ours(padded, attention_mask=mask)
        want = ref(padded, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(got).all()
    return plain, (got - want)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(case, tmp_path):
    family, overrides = CASES[case]
    path = hf_fixtures.make_family_checkpoint(tmp_path, family, max_shard_size="60KB", **overrides)
    assert (path / "model.safetensors.index.json").exists()
    ours, ref = llama.from_pretrained(path), hf_model(path, family)
    stored = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])
    tied = {"lm_head.weight"} if ours.config.tie_word_embeddings else set()
    assert stored == set(ours.state_dict()) - tied
    plain, padded = max_diffs(ours, ref)
    print(f"{case}: max |logit diff| {plain:.2e} (no padding), {padded:.2e} (left padding)")
    assert plain <= FP32_TOL and padded <= FP32_TOL, (plain, padded)


def test_the_family_switches_change_the_network(family_dir):
    """Each family's difference from Llama matters on these inputs, so the parity above means something."""
    for family, change in [("mistral", dict(sliding_window=None)),
                           ("gemma", dict(norm_offset=False, scale_embeddings=False)),
                           ("qwen2", dict(qkv_bias=False)), ("phi", dict(partial_rotary_factor=1.0)),
                           ("mixtral", dict(num_experts_per_tok=1))]:
        path = family_dir(family)
        ours = llama.from_pretrained(path)
        cfg = LlamaConfig(**{**ours.config.to_dict(), **change})
        sd = ours.state_dict()
        if family == "qwen2":  # drop the q/k/v biases from the state dict too
            sd = {k: v for k, v in sd.items() if not k.endswith("_proj.bias")}
        other = llama.Llama(cfg)
        other.load_state_dict(sd, strict=True)
        with torch.no_grad():
            assert (ours(IDS) - other.eval()(IDS)).abs().max() > 5 * FP32_TOL, family


def test_bf16_logits_close_to_transformers(family_dir):
    """Same ops in the same order: measured max |diff| 0 (Mistral, Gemma, Qwen2) and 3.9e-3, one bf16 ulp
    at logits ~0.6 (Mixtral's expert sums, Phi's parallel sum); 1e-2 as for Llama."""
    for family in FAMILIES:
        path = family_dir(family)
        ours, ref = llama.from_pretrained(path, dtype=torch.bfloat16), hf_model(path, family, torch.bfloat16)
        with torch.no_grad():
            a, b = ours(IDS), ref(IDS).logits
        assert a.dtype == torch.bfloat16
        assert (a.float() - b.float()).abs().max().item() <= 1e-2, family




@pytest.mark.parametrize("case", ["mistral-window8", "mixtral-window6-legacy-config", "gemma-mqa-headdim32",
                                  "phi-partial-rotary", "qwen2-sliding-layer1"])
def test_greedy_generation_equals_transformers_generate(case, tmp_path):
    """12 new tokens after prompts of up to 7: generation runs well past the 6-8 token windows."""
    family, overrides = CASES[case]
    # Wider random weights than HF's init: a tied random model otherwise repeats its input token.
    path = hf_fixtures.make_family_checkpoint(tmp_path, family, initializer_range=0.3, **overrides)
    ours, ref = llama.from_pretrained(path), hf_model(path, family)
    n, eos = 12, 511
    want = hf_fixtures.hf_generate(ref, PROMPTS, n, eos)
    got = llama.generate_ids(ours, PROMPTS, max_new_tokens=n, eos_id=eos, pad_id=0)
    assert got == want
    assert max(len(r) for r in got) == n and len({tuple(r) for r in got}) > 1
    # A mid-way EOS stops each row exactly where transformers stops it, in smaller batches too.
    row = next(r for r in want if len(set(r)) > 2)
    k = next(k for k in range(2, len(row)) if row[k] not in row[:k])
    want = hf_fixtures.hf_generate(ref, PROMPTS, n, row[k])
    assert llama.generate_ids(ours, PROMPTS, max_new_tokens=n, eos_id=row[k], pad_id=0, batch_size=3) == want


def test_sliding_window_kv_cache_decode_equals_full_forward(family_dir):
    model = llama.from_pretrained(family_dir("mistral"))
    assert model.config.sliding_window == 8
    B, P, steps = 3, 5, 14  # 19 slots: most keys fall out of the window by the end
    ids, mask = _left_padded(IDS[:, :P + steps])
    mask[0, :] = 1
    caches = model.make_kv_caches(B, P + steps)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        logits = llama.decode_step(model, ids[:, :P], attention_mask=mask, kv_caches=caches,
                                   input_pos=torch.arange(P))
        torch.testing.assert_close(logits, full[:, P - 1], rtol=0, atol=1e-5)
        for s in range(steps):
            logits = llama.decode_step(model, ids[:, P + s:P + s + 1], attention_mask=mask, kv_caches=caches,
                                    input_pos=torch.tensor([P + s]))
            torch.testing.assert_close(logits, full[:, P + s], rtol=0, atol=1e-5)


def _four_bit(model: nn.Module) -> dict[str, quant.Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, quant.Linear4bit)}


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_through_the_loader_hook(family, family_dir):
    """Every decoder linear (each Mixtral expert's w1/w2/w3 too) is NF4; the logits are those of the
    same network with the dequantised weights (NF4's rounding, no wiring error) and near the fp32 ones."""
    path = family_dir(family)
    model4 = llama.from_pretrained(path, linear_hook=quant.nf4(compute_dtype=torch.float32))
    linears = {n for n, m in model4.named_modules() if isinstance(m, nn.Linear)}
    q4 = set(_four_bit(model4))
    assert q4 == {n for n in linears if n.startswith("model.layers.")} and q4
    if family == "mixtral":
        n_exp = model4.config.num_local_experts
        assert sum(".experts." in n for n in q4) == 3 * n_exp * model4.config.num_hidden_layers
        router = model4.model.layers[0].block_sparse_moe.gate
        assert router.weight.dtype == torch.float32 and not isinstance(router, nn.Linear)
    twin = llama.from_pretrained(path)
    fp32 = llama.from_pretrained(path)
    with torch.no_grad():
        for name, m in _four_bit(model4).items():
            twin.get_submodule(name).weight.copy_(quant.dequantize(m, torch.float32))
        padded, mask = _left_padded(IDS)
        got, want = model4(padded, attention_mask=mask), twin(padded, attention_mask=mask)
        assert (got - want)[mask.bool()].abs().max().item() <= 1e-4
        assert (got - fp32(padded, attention_mask=mask)).abs().max().item() > 0  # it really is 4-bit


@pytest.mark.parametrize("family", ["mixtral", "phi", "gemma"])
def test_prequantized_save_and_load_round_trip(family, family_dir, tmp_path):
    """quant.save_quantized / load_quantized into a meta skeleton (model.prequantized) keep the logits."""
    path = family_dir(family)
    qc = quant.QuantConfig(compute_dtype=torch.float32)
    model4 = llama.from_pretrained(path, linear_hook=quant.make_hook(qc))
    quant.save_quantized(model4, tmp_path / "q", qc)
    with torch.device("meta"):
        skeleton = llama.Llama(LlamaConfig.from_hf(path))
    again = quant.load_quantized(skeleton, tmp_path / "q", qc)
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), model4(IDS), rtol=0, atol=0)
    if family == "gemma":
        assert again.lm_head.weight is again.model.embed_tokens.weight


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_trains_with_gradient_checkpointing(family, family_dir):
    """4-bit base + LoRA: a few AdamW steps lower the loss; checkpointing gives the same gradients."""
    torch.manual_seed(0)
    model = llama.from_pretrained(family_dir(family), linear_hook=quant.nf4(compute_dtype=torch.float32))
    lora.inject(model, targets=TARGETS[family], r=4, alpha=8, dropout=0.0)
    model.train()
    ids, mask = IDS[:2, :16], torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0

    def loss_and_grads(ckpt: bool) -> tuple[float, list[torch.Tensor]]:
        model.gradient_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        logits = model(ids, attention_mask=mask)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in lora.trainable_parameters(model)]

    _, plain = loss_and_grads(False)
    _, ckpt = loss_and_grads(True)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    opt = torch.optim.AdamW(lora.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(5):
        loss, _ = loss_and_grads(False)
        losses.append(loss)
        opt.step()
    assert losses[-1] < losses[0] - 0.05, losses


# ---------------------------------------------------------------------- LoRA / PEFT / export
def _lora_targets(family: str, experts: bool = False) -> list[str]:
    return TARGETS[family] + (["w1", "w2", "w3"] if experts else [])


def _peft_strict(path: Path, family: str, adapter: Path) -> nn.Module:
    """PeftModel.from_pretrained that fails if PEFT loaded fewer or other keys than the file holds."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    pm = PeftModel.from_pretrained(hf_model(path, family), adapter).eval()
    file_keys = set(load_file(str(adapter / "adapter_model.safetensors")))
    assert set(get_peft_model_state_dict(pm)) == file_keys
    return pm


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapter_interop_with_peft_both_ways(family, family_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    path = family_dir(family)
    targets = _lora_targets(family)
    # ours -> PEFT
    model = llama.from_pretrained(path)
    stats = lora.inject(model, targets=targets, r=4, alpha=8, dropout=0.0)
    assert len(stats.names) == len(targets) * model.config.num_hidden_layers
    hf_fixtures_randomize(model)
    lora.save_adapter(model, tmp_path / "ours", base_model_name_or_path=str(path))
    pm = _peft_strict(path, family, tmp_path / "ours")
    with torch.no_grad():
        got, want = model.eval()(IDS), pm(input_ids=IDS).logits
        with lora.disable_adapter(model):
            assert (model(IDS) - want).abs().max() > 1e-2  # the adapter matters
    assert (got - want).abs().max().item() <= FP32_TOL
    # PEFT -> ours
    pm = get_peft_model(hf_model(path, family), LoraConfig(r=8, lora_alpha=4, target_modules=targets,
                                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in pm.named_parameters() if ".lora_" in n):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    ours = lora.load_adapter(llama.from_pretrained(path), tmp_path / "peft")
    with torch.no_grad():
        err = (ours.eval()(IDS) - pm.eval()(input_ids=IDS).logits).abs().max().item()
    assert err <= FP32_TOL


def hf_fixtures_randomize(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sorted(lora.lora_modules(model).items()):
            for p in (m.lora_A.weight, m.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_export_loads_in_transformers(family, family_dir, tmp_path):
    """QLoRA (4-bit base) -> merged 16/32-bit HF directory; Mixtral with LoRA on its experts too."""
    path = family_dir(family)
    model = llama.from_pretrained(path, linear_hook=quant.nf4(compute_dtype=torch.float32))
    lora.inject(model, targets=_lora_targets(family, experts=family == "mixtral"), r=4, alpha=8, dropout=0.0)
    hf_fixtures_randomize(model)
    with torch.no_grad():
        want = model.eval()(IDS)
    out = lora.merge_and_export(model, tmp_path / "merged", path, dtype=torch.float32, max_shard_size="100KB")
    merged = hf_model(out, family)
    original = hf_model(path, family)
    assert set(merged.state_dict()) == set(original.state_dict())
    with torch.no_grad():
        err = (merged(input_ids=IDS).logits - want).abs().max().item()
    assert err <= FP32_TOL, err
    assert json.loads((out / "config.json").read_text())["architectures"] == \
        json.loads((path / "config.json").read_text())["architectures"]


def test_lora_on_mixtral_experts_when_targeted(family_dir):
    model = llama.from_pretrained(family_dir("mixtral"))
    attn_only = lora.inject(model, r=2, alpha=4)
    assert all(".self_attn." in n for n in attn_only.names)
    model = llama.from_pretrained(family_dir("mixtral"))
    stats = lora.inject(model, targets=_lora_targets("mixtral", experts=True), r=2, alpha=4)
    experts = [n for n in stats.names if ".experts." in n]
    assert len(experts) == 3 * 5 * 2 and "model.layers.0.block_sparse_moe.experts.4.w2" in experts
    assert not any(n.endswith(".gate") for n in lora.match_targets(model, "all-linear"))


# ---------------------------------------------------------------------- Mixtral specifics
@pytest.mark.parametrize("padded", [False, True])
def test_router_load_balancing_loss_equals_transformers(padded, family_dir):
    path = family_dir("mixtral")
    ours, ref = llama.from_pretrained(path), hf_model(path, "mixtral")
    ids, mask = _left_padded(IDS) if padded else (IDS, None)
    with torch.no_grad():
        ours(ids, attention_mask=mask)
        want = ref(ids, attention_mask=mask, output_router_logits=True).aux_loss
    got = ours.router_aux_loss(mask)
    assert abs(got.item() - want.item()) <= 1e-5 and got.item() > 2.0  # top-2: balanced would be 2
    # It trains: its gradient reaches the router.
    ours.train()
    ours(ids, attention_mask=mask)
    ours.router_aux_loss(mask).backward()
    assert ours.model.layers[0].block_sparse_moe.gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no mixture-of-experts"):
        llama.from_pretrained(family_dir("mistral")).router_aux_loss()


def test_missing_expert_shard_names_the_missing_tensors(tmp_path):
    path = hf_fixtures.make_family_checkpoint(tmp_path / "ckpt", "mixtral", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = index["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    lost = sorted(n for n, f in index.items() if f == shard)
    (path / shard).unlink()
    with pytest.raises(LoadError) as err:
        llama.from_pretrained(path)
    msg = str(err.value)
    assert "\n" not in msg and shard in msg and f"{len(lost)} tensor(s) are missing" in msg, msg
    assert "model.layers.1.block_sparse_moe.experts." in msg
    # The same when the index itself has lost the expert entries: the summary lists every one.
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for n, f in index.items() if f != shard}}))
    with pytest.raises(LoadError) as err:
        llama.from_pretrained(path)
    msg = str(err.value)
    assert "\n" not in msg and f"lacks {len(lost)} tensor(s)" in msg
    assert "block_sparse_moe.experts.3.w2.weight" in msg or "experts.[" in msg, msg


def test_mixtral_8x7b_nf4_memory_on_the_meta_device():
    """The real Mixtral-8x7B shape, no weights: what NF4 + double quant stores (see the README)."""
    raw = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
           "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
           "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
           "rope_theta": 1e6, "sliding_window": None, "torch_dtype": "bfloat16"}
    with torch.device("meta"):
        model = llama.Llama(LlamaConfig.from_hf(raw)).to(torch.bfloat16)
        stats = lora.inject(model, r=16, alpha=32)  # the seed recipe: q/k/v/o, rank 16
    est = quant.estimate_memory(model, quant.QuantConfig())
    assert est.quantized_params == 32 * (8 * 3 * 4096 * 14336 + 2 * 4096 * 4096 + 2 * 4096 * 1024)
    assert est.trainable_params == stats.trainable == 32 * 16 * (4096 + 4096 + 2 * (4096 + 1024) + 8192)
    total_params = est.quantized_params + est.dense_params
    assert abs(total_params - 46.7e9) < 0.05e9  # Mixtral-8x7B's published size: 46.7B parameters
    print(f"Mixtral-8x7B NF4 + LoRA r16 q/k/v/o: {est}")
    assert 24.0e9 < est.total_bytes < 25.0e9  # ~24 GB, the figure
    with torch.device("meta"):  # LoRA on the experts too (configs/mixtral.yaml's comment)
        wide = lora.inject(llama.Llama(LlamaConfig.from_hf(raw)), _lora_targets("mixtral", True), r=16)
    assert wide.trainable == stats.trainable + 32 * 8 * 3 * 16 * (4096 + 14336) == 240_123_904


def test_estimate_memory_equals_the_report_of_a_quantised_model(family_dir):
    path = family_dir("mixtral")
    model4 = llama.from_pretrained(path, linear_hook=quant.nf4(compute_dtype=torch.float32))
    with torch.device("meta"):
        skeleton = llama.Llama(LlamaConfig.from_hf(path))
    qc = quant.QuantConfig(compute_dtype=torch.float32)
    assert quant.estimate_memory(skeleton, qc) == quant.memory_report(model4)
    for m in (model4, skeleton):
        with torch.device("meta" if m is skeleton else "cpu"):
            lora.inject(m, targets=_lora_targets("mixtral", experts=True), r=4, alpha=8)
    report = quant.memory_report(model4)
    assert report.trainable_params > 0 and quant.estimate_memory(skeleton, qc) == report


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers4_and_5_config_shapes_agree(family, tmp_path):
    extra = dict(use_sliding_window=True, sliding_window=6, max_window_layers=1) if family == "qwen2" else {}
    new = hf_fixtures.make_family_checkpoint(tmp_path / "new", family, **extra)
    old = hf_fixtures.make_family_checkpoint(tmp_path / "old", family, legacy_config=True, **extra)
    raw_new, raw_old = (json.loads((p / "config.json").read_text()) for p in (new, old))
    assert "rope_parameters" in raw_new and "rope_parameters" not in raw_old and "torch_dtype" in raw_old
    a, b = LlamaConfig.from_hf(new), LlamaConfig.from_hf(old)
    assert a == b and a.model_type == family


def test_family_fields_from_published_style_configs():
    base = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4}
    phi = LlamaConfig.from_hf({**base, "architectures": ["PhiForCausalLM"], "partial_rotary_factor": 0.5,
                               "hidden_act": "gelu_new", "qk_layernorm": False, "resid_pdrop": 0.1})
    assert (phi.rotary_dim, phi.norm_type, phi.out_proj_name) == (8, "layer", "dense")
    assert phi.attention_bias and phi.mlp_bias
    assert phi.parallel_block and phi.lm_head_bias and phi.resid_pdrop == 0.1
    gemma = LlamaConfig.from_hf({**base, "architectures": ["GemmaForCausalLM"], "head_dim": 256,
                                 "hidden_act": "gelu", "hidden_activation": None})
    assert gemma.hidden_act == "gelu_pytorch_tanh" and gemma.tie_word_embeddings and gemma.head_dim == 256
    assert gemma.embed_scale == 8.0 and gemma.norm_offset
    qwen = LlamaConfig.from_hf({**base, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False,
                                "sliding_window": 131072, "max_window_layers": 28})
    assert qwen.qkv_bias and not qwen.attention_bias and qwen.sliding_window is None
    mistral = LlamaConfig.from_hf({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 4096})
    assert mistral.is_sliding(0) and mistral.is_sliding(1) and mistral.sliding_window == 4096
    mixtral = LlamaConfig.from_hf({**base, "architectures": ["MixtralForCausalLM"]})
    assert (mixtral.num_local_experts, mixtral.num_experts_per_tok) == (8, 2)


@pytest.mark.parametrize("arch, change, words", [
    ("PhiForCausalLM", dict(qk_layernorm=True), ["qk_layernorm=True", "not implemented"]),
    ("GemmaForCausalLM", dict(use_bidirectional_attention=True), ["use_bidirectional_attention"]),
    ("MixtralForCausalLM", dict(router_jitter_noise=0.1), ["router_jitter_noise=0.1"]),
    ("LlamaForCausalLM", dict(use_qk_norm=True), ["use_qk_norm=True"]),
    ("GemmaForCausalLM", dict(attn_logit_softcapping=50.0), ["attn_logit_softcapping"]),
    ("LlamaForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                               "partial_rotary_factor": 0.5}), ["partial_rotary_factor"]),
    ("MixtralForCausalLM", dict(num_local_experts=2, num_experts_per_tok=3), ["num_experts_per_tok=3"]),
    ("Qwen2ForCausalLM", dict(layer_types=["full_attention", "chunked_attention"]), ["chunked_attention"]),
    ("PhiForCausalLM", dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), ["'yarn'", "not supported"]),
    ("Gemma2ForCausalLM", {}, ["Gemma2ForCausalLM", "not supported", "MixtralForCausalLM"]),
    ("Qwen2MoeForCausalLM", {}, ["Qwen2MoeForCausalLM", "supported: LlamaForCausalLM"]),
])
def test_maths_changing_configs_are_refused_in_one_line(arch, change, words):
    raw = {"architectures": [arch], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, **change}
    with pytest.raises(LoadError) as err:
        LlamaConfig.from_hf(raw)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


# ---------------------------------------------------------------------- the CLIs, as for Llama
@pytest.mark.parametrize("family", ["mistral", "mixtral", "gemma"])  # the ones shipping tokenizer.model
def test_train_and_eval_clis_run_a_family_checkpoint(family, tmp_path, capsys):
    """train.py (QLoRA: real NF4 base, LoRA on the family's targets) then eval.py, as for a Llama."""
    import sys

    import yaml

    sys.path.insert(0, str(Path(__file__).parents[1] / "finetune"))
    from train_testlib import run_config, write_csv

    import eval as eval_cli
    import train as train_cli

    model_dir = hf_fixtures.make_family_checkpoint(tmp_path / "model", family, max_shard_size="60KB")
    hf_fixtures.write_tokenizer_files(model_dir)
    run = tmp_path / "run"
    cfg = run_config(model_dir, write_csv(tmp_path / "d.csv"), run, quant={"enabled": True},
                     lora={"targets": _lora_targets(family, experts=family == "mixtral")},
                     train={"max_steps": 2, "eval_steps": 2, "save_steps": 2},
                     eval={"max_new_tokens": 6, "batch_size": 4, "limit": 4})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert train_cli.main([str(cfg_path), "--no-progress"]) == 0, capsys.readouterr().err
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(_lora_targets(family, experts=family == "mixtral"))
    assert eval_cli.main([str(cfg_path), "--no-progress"]) == 0, capsys.readouterr().err
    scored = json.loads((run / "eval" / "metrics.json").read_text())
    assert scored["adapter"] == str(run / "final") and math.isfinite(scored["loss"]["eval_loss"])


@pytest.mark.parametrize("family", FAMILIES)
def test_family_recipe_configs_load(family):
    """configs/<family>.yaml is the seed recipe with the family's path and PEFT-named LoRA targets."""
    from finetune.config import load_config

    root = Path(__file__).parents[2] / "configs"
    cfg, seed = (load_config(root / f"{name}.yaml", check_paths=False) for name in (family, "llama2"))
    assert cfg.lora.targets == TARGETS[family]
    same = ("train.lr", "lora.r", "lora.alpha", "data.max_length", "data.template", "quant.quant_type")
    for key in same:
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == getattr(getattr(seed, section), field), key
    assert cfg.model.path != seed.model.path and str(cfg.train.output_dir).endswith(f"runs/{family}")


@pytest.mark.slow  # ~17 s of inductor compilation on 2 cores (Gemma and Phi measured fine too, 12/8 s)
@pytest.mark.parametrize("family", ["mistral"])
def test_family_forward_compiles_in_one_graph(family, tmp_path, compiler):
    """The sliding-window mask adds no graph break (fullgraph) and the compiled logits equal eager's."""
    extra = dict(sliding_window=4) if family == "mistral" else {}
    model = llama.from_pretrained(hf_fixtures.make_family_checkpoint(tmp_path, family, num_hidden_layers=1,
                                                                     **extra))
    ids, mask = _left_padded(IDS[:, :9])
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask), model(ids, mask), rtol=0, atol=1e-5)
