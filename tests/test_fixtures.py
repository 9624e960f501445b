"""The fixtures themselves are real HF artefacts: transformers and sentencepiece load them."""

import json

import hf_fixtures
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM


def test_fixture_checkpoint_loads_in_transformers(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (tiny_model_dir / "model.safetensors").exists()
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, hf_fixtures.TINY_CONFIG["vocab_size"])


def test_sharded_fixture_has_index_and_loads(tiny_sharded_model_dir):
    index = json.loads((tiny_sharded_model_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all((tiny_sharded_model_dir / s).exists() for s in shards)
    model = AutoModelForCausalLM.from_pretrained(tiny_sharded_model_dir)
    assert model.config.num_hidden_layers == hf_fixtures.TINY_CONFIG["num_hidden_layers"]


def test_legacy_config_shape_loads_in_transformers(make_checkpoint):
    path = make_checkpoint(legacy_config=True)
    cfg = json.loads((path / "config.json").read_text())
    assert "rope_theta" in cfg and "rope_parameters" not in cfg and "torch_dtype" in cfg
    AutoModelForCausalLM.from_pretrained(path)


def test_tokenizer_fixture_is_llama_style(tokenizer_dir):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert sp.get_piece_size() == hf_fixtures.TINY_CONFIG["vocab_size"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    text = "Perché la città è già lì? Scriva a mario.rossi@example.it, tel. 02 1234"
    assert sp.decode(sp.encode(text)) == text  # byte fallback: nothing is lost
