"""LlamaConfig reads both config.json shapes; RoPE tables equal transformers' for every rope type."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from llama import LlamaConfig, LoadError
from llama.model import RotaryEmbedding, rope_inv_freq


def llama3_rope(**change) -> dict:
    """A fresh dict each time: transformers' LlamaConfig adds rope_theta to the dict it is given."""
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, **change}


def test_transformers5_and_legacy_shapes_give_the_same_config(make_checkpoint):
    new = make_checkpoint(rope_scaling=llama3_rope(), rope_theta=500000.0)
    old = make_checkpoint(rope_scaling=llama3_rope(), rope_theta=500000.0, legacy_config=True)
    raw_new, raw_old = (json.loads((p / "config.json").read_text()) for p in (new, old))
    assert "rope_parameters" in raw_new and "dtype" in raw_new
    assert "rope_parameters" not in raw_old and "head_dim" not in raw_old and "torch_dtype" in raw_old
    a, b = LlamaConfig.from_hf(new), LlamaConfig.from_hf(old / "config.json")
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_type == "llama3" and a.head_dim == 16
    assert a.num_key_value_heads == 2 and a.torch_dtype == "float32"
    assert a.rope_scaling == llama3_rope()


def test_llama2_7b_style_legacy_dict():
    # The fields of meta-llama/Llama-2-7b-hf's config.json that matter (no head_dim, no kv heads).
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_scaling": None,
           "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 32000,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "pretraining_tp": 1}
    cfg = LlamaConfig.from_hf(raw)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta) == (128, 32, 10000.0)
    assert cfg.rope_type == "default"
    assert cfg.torch_dtype == "float16" and cfg.eos_token_ids == [2] and cfg.pad_token_id == 0


def test_old_type_key_and_eos_list():
    raw = _tiny(rope_scaling={"type": "linear", "factor": 2.0}, eos_token_id=[2, 7])
    cfg = LlamaConfig.from_hf(raw)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.eos_token_ids == [2, 7]


def test_mistral_without_sliding_window_is_accepted():
    cfg = LlamaConfig.from_hf(_tiny(architectures=["MistralForCausalLM"], model_type="mistral",
                                    sliding_window=None))
    assert cfg.hidden_size == 64 and cfg.model_type == "mistral" and not cfg.is_sliding(0)


@pytest.mark.parametrize("change, words", [
    (dict(architectures=["Gemma2ForCausalLM"]), ["Gemma2ForCausalLM", "not supported", "PhiForCausalLM"]),
    (dict(architectures=[], model_type="gpt2"), ["gpt2", "not supported"]),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["'yarn'", "not supported", "llama3"]),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["llama3", "low_freq_factor"]),
    (dict(hidden_act="relu2"), ["relu2", "silu"]),
    (dict(num_key_value_heads=3), ["num_key_value_heads=3"]),
])
def test_bad_configs_raise_one_clear_line(change, words):
    with pytest.raises(LoadError) as err:
        LlamaConfig.from_hf(_tiny(**change))
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_missing_keys_and_bad_json(tmp_path):
    raw = _tiny()
    del raw["hidden_size"]
    with pytest.raises(LoadError, match="lacks hidden_size"):
        LlamaConfig.from_hf(raw)
    with pytest.raises(LoadError, match="config.json not found"):
        LlamaConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        LlamaConfig.from_hf(tmp_path)


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    llama3_rope(),
    llama3_rope(original_max_position_embeddings=8192, factor=32.0),
])
@pytest.mark.parametrize("seq_len", [100, 600])  # 600 > max_position_embeddings: dynamic NTK rescales
def test_rope_tables_equal_transformers(scaling, seq_len):
    raw = _tiny(rope_scaling=scaling, rope_theta=500000.0, head_dim=128, hidden_size=512)
    cfg = LlamaConfig.from_hf(json.loads(json.dumps(raw)))
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in json.loads(json.dumps(raw)).items()
                                         if k != "architectures"})
    positions = torch.arange(seq_len)[None].expand(2, seq_len)
    cos, sin = RotaryEmbedding(cfg)(positions, torch.float32)
    ref_cos, ref_sin = LlamaRotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32), positions)
    # positions up to 600 times frequencies: fp32 rounding of the angle, same in both
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=2e-5)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=2e-5)
    if scaling is not None and scaling["rope_type"] != "dynamic":
        assert not torch.allclose(cos, RotaryEmbedding(LlamaConfig.from_hf(_tiny(
            rope_theta=500000.0, head_dim=128, hidden_size=512)))(positions, torch.float32)[0])


def test_rope_table_stays_fp32_through_casts():
    from llama import Llama

    model = Llama(LlamaConfig.from_hf(_tiny(rope_theta=500000.0))).to(torch.bfloat16)
    inv = model.model.rotary_emb.inv_freq
    assert inv.dtype == torch.float32
    torch.testing.assert_close(inv, rope_inv_freq(model.config), rtol=0, atol=0)
    assert not any("inv_freq" in k for k in model.state_dict())


def _tiny(**change) -> dict:
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "rope_scaling": None, "torch_dtype": "float32"}
    raw.update(change)
    return raw
