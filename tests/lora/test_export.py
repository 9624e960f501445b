"""merge_and_export: the merged HF directory loads in transformers (and our llama) with the same logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from lora_testlib import have_our_llama, hf_llama, hf_logits, quantize_linears, randomize_lora
from safetensors import safe_open

import lora
from lora import LoRAError

IDS = torch.randint(3, 512, (2, 13), generator=torch.Generator().manual_seed(1))
TOKENIZER = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def _exported_tensor(out: Path, key: str) -> torch.Tensor:
    index = out / "model.safetensors.index.json"
    fname = json.loads(index.read_text())["weight_map"][key] if index.exists() else "model.safetensors"
    with safe_open(str(out / fname), framework="pt") as f:
        return f.get_tensor(key)


def test_fp32_export_is_sharded_and_matches(tiny_model_dir, tmp_path):
    model = hf_llama(tiny_model_dir)
    lora.inject(model, targets="all-linear", r=4, alpha=8, use_rslora=True)
    randomize_lora(model)
    want = hf_logits(model, IDS)
    out = lora.merge_and_export(model, tmp_path / "merged", tiny_model_dir, max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert all(".lora_" not in k and ".base." not in k for k in index["weight_map"])
    assert all((out / f).read_bytes() == (tiny_model_dir / f).read_bytes() for f in TOKENIZER)
    merged = hf_llama(out)
    # Same keys as the original checkpoint, nothing missing or extra.
    assert set(index["weight_map"]) == set(hf_llama(tiny_model_dir).state_dict())
    err = (hf_logits(merged, IDS) - want).abs().max().item()
    assert err <= 1e-5, err
    if have_our_llama():
        import llama

        ours = llama.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            assert (ours(IDS) - want).abs().max().item() <= 1e-4


def test_export_of_a_merged_model_adds_the_update_once(tiny_model_dir, tmp_path):
    model = hf_llama(tiny_model_dir)
    lora.inject(model, r=4, alpha=8)
    randomize_lora(model)
    lora.merge_and_export(model, tmp_path / "a", tiny_model_dir)
    lora.merge(model)
    lora.merge_and_export(model, tmp_path / "b", tiny_model_dir)
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(_exported_tensor(tmp_path / "a", key), _exported_tensor(tmp_path / "b", key),
                               rtol=0, atol=1e-6)


def test_bf16_base_export(tmp_path, make_checkpoint):
    base_dir = make_checkpoint(dtype=torch.bfloat16)
    model = hf_llama(base_dir, dtype=torch.bfloat16)
    lora.inject(model, r=4, alpha=8)  # fp32 adapter over the bf16 base
    randomize_lora(model)
    want = hf_logits(model, IDS).float()
    q = lora.lora_modules(model)["model.layers.1.self_attn.q_proj"]
    exact = (q.base.weight.float() + q.delta_weight()).to(torch.bfloat16)
    out = lora.merge_and_export(model, tmp_path / "merged", base_dir)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # Merged in fp32, rounded once to bf16.
    assert torch.equal(_exported_tensor(out, "model.layers.1.self_attn.q_proj.weight"), exact)
    got = hf_logits(hf_llama(out, dtype=torch.bfloat16), IDS).float()
    # bf16 both ways (the unmerged path rounds x@W and the branch separately): bf16-level agreement.
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 0.03 * scale
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.999


def test_4bit_base_export_dequantises_and_matches(tiny_model_dir, tmp_path):
    # A base config that says it was quantised: the export must drop that.
    base_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base_dir)
    cfg = json.loads((base_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base_dir / "config.json").write_text(json.dumps(cfg))

    model = hf_llama(tiny_model_dir)
    quantize_linears(model)  # all 14 decoder linears NF4; only q/k/v/o get LoRA
    lora.inject(model, r=4, alpha=8)
    randomize_lora(model)
    want = hf_logits(model, IDS)
    out = lora.merge_and_export(model, tmp_path / "merged", base_dir, max_shard_size="200KB")
    cfg_out = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg_out
    with safe_open(str(out / sorted(out.glob("model-*.safetensors"))[0].name), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())  # noqa: SIM118
    got = hf_logits(hf_llama(out), IDS)
    err = (got - want).abs().max().item()
    assert err <= 1e-4, err
    if have_our_llama():
        import llama

        with torch.no_grad():
            ours = llama.from_pretrained(out, dtype=torch.float32).eval()(IDS)
        assert (ours - want).abs().max().item() <= 1e-4


def test_tied_embeddings(tmp_path, make_checkpoint):
    base_dir = make_checkpoint(tie_word_embeddings=True)
    model = hf_llama(base_dir)
    lora.inject(model, r=2, alpha=4)
    randomize_lora(model)
    out = lora.merge_and_export(model, tmp_path / "merged", base_dir)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # written once, as HF does
    torch.testing.assert_close(hf_logits(hf_llama(out), IDS), hf_logits(model, IDS), rtol=0, atol=1e-5)
    tied = hf_llama(base_dir)
    lora.inject(tied, targets=["lm_head"], r=2, alpha=4)
    randomize_lora(tied)
    with pytest.raises(LoRAError, match="lm_head shares its weight"):
        lora.merge_and_export(tied, tmp_path / "tied", base_dir)


def test_export_refuses_bad_dirs(tiny_model_dir, tmp_path):
    model = hf_llama(tiny_model_dir)
    lora.inject(model, r=2, alpha=4)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(LoRAError, match="not empty"):
        lora.merge_and_export(model, tmp_path / "full", tiny_model_dir)
    with pytest.raises(LoRAError, match="no config.json"):
        lora.merge_and_export(model, tmp_path / "new", tmp_path / "full")
