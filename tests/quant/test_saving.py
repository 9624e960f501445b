"""Pre-quantised save/reload: identical outputs, bitsandbytes' serialisation, refusal of mismatches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open
from torch import nn

import llama
import quant
from quant.saving import CONFIG_FILE, WEIGHTS_FILE

FP32 = torch.float32
QC = quant.QuantConfig(compute_dtype=FP32)


def _ids(vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(1))


def _skeleton(model: llama.Llama) -> llama.Llama:
    with torch.device("meta"):
        return llama.Llama(model.config)


@pytest.fixture(scope="module")
def saved(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[llama.Llama, Path]:
    model = llama.from_pretrained(tiny_model_dir, linear_hook=quant.make_hook(QC))
    out = quant.save_quantized(model, tmp_path_factory.mktemp("prequant") / "nf4", QC)
    return model, out


def test_reload_gives_identical_logits_and_quant_states(saved: tuple[llama.Llama, Path]) -> None:
    model, out = saved
    reloaded = quant.load_quantized(_skeleton(model), out, QC, device="cpu")
    assert not reloaded.training
    assert not any(t.is_meta for t in [*reloaded.parameters(), *reloaded.buffers()])
    q4 = {n: m for n, m in reloaded.named_modules() if isinstance(m, quant.Linear4bit)}
    assert q4.keys() == {n for n, m in model.named_modules() if isinstance(m, quant.Linear4bit)}
    for name, m in q4.items():
        original = model.get_submodule(name).weight
        assert torch.equal(m.weight.data, original.data) and m.weight.quant_state == original.quant_state
        assert not m.weight.requires_grad
    ids, mask = _ids(), torch.ones(2, 20, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask), model(ids, attention_mask=mask))
    assert str(quant.memory_report(reloaded)) == str(quant.memory_report(model))


def test_file_holds_bitsandbytes_serialisation(saved: tuple[llama.Llama, Path]) -> None:
    model, out = saved
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert (meta["quant_type"], meta["double_quant"], meta["blocksize"]) == ("nf4", True, 64)
    name = "model.layers.0.self_attn.q_proj"
    assert name in meta["quantized"] and "lm_head" not in meta["quantized"]
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
        prefix = f"{name}.weight."
        stats = {k.removeprefix(prefix): f.get_tensor(k) for k in keys if k.startswith(prefix)}
        packed = f.get_tensor(f"{name}.weight")
    # bitsandbytes itself can rebuild the parameter from what we wrote.
    w = bnb.nn.Params4bit.from_prequantized(packed, stats, device="cpu")
    assert w.quant_state == model.get_submodule(name).weight.quant_state
    assert f"{name}.weight.quant_state.bitsandbytes__nf4" in keys
    assert "lm_head.weight" in keys and "model.rotary_emb.inv_freq" in keys


def test_tied_embeddings_and_biases_round_trip(make_checkpoint, tmp_path: Path) -> None:
    path = make_checkpoint(tie_word_embeddings=True, attention_bias=True)
    model = llama.from_pretrained(path, linear_hook=quant.make_hook(QC))
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    out = quant.save_quantized(model, tmp_path / "q", QC)
    reloaded = quant.load_quantized(_skeleton(model), out, QC)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()), model(_ids()))


def test_generic_module_with_tied_weights_and_nonpersistent_buffer(tmp_path: Path) -> None:
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(50, 64)
            self.model.layers = nn.ModuleList([nn.Linear(64, 64) for _ in range(2)])
            self.lm_head = nn.Linear(64, 50, bias=False)
            self.lm_head.weight = self.model.embed_tokens.weight
            self.register_buffer("scale", torch.full((64,), 0.5), persistent=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.model.embed_tokens(ids) * self.scale
            for layer in self.model.layers:
                x = torch.relu(layer(x))
            return self.lm_head(x)

    torch.manual_seed(0)
    model = quant.quantize_model(Toy(), QC)
    out = quant.save_quantized(model, tmp_path / "toy", QC)
    with torch.device("meta"):
        skeleton = Toy()
    reloaded = quant.load_quantized(skeleton, out, QC)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))


@pytest.mark.parametrize("kwargs,match", [
    (dict(quant_type="fp4"), "quant_type='nf4' \\(config: 'fp4'\\)"),
    (dict(blocksize=128), "blocksize=64 \\(config: 128\\)"),
    (dict(double_quant=False), "double_quant=True \\(config: False\\)"),
    (dict(skip=("embed_tokens",), targets=".*"), "4-bit layers differ"),
    (dict(skip=("lm_head", "embed_tokens", "o_proj")), "4-bit layers differ"),
])
def test_mismatched_settings_are_refused(saved: tuple[llama.Llama, Path], kwargs: dict, match: str) -> None:
    model, out = saved
    with pytest.raises(quant.QuantError, match=match):
        quant.load_quantized(_skeleton(model), out, quant.QuantConfig(compute_dtype=FP32, **kwargs))


def test_edited_config_file_is_caught_by_the_stored_quant_state(saved: tuple[llama.Llama, Path],
                                                                 tmp_path: Path) -> None:
    model, out = saved
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / WEIGHTS_FILE).symlink_to(out / WEIGHTS_FILE)
    meta = json.loads((out / CONFIG_FILE).read_text())
    (fake / CONFIG_FILE).write_text(json.dumps({**meta, "blocksize": 128}))
    with pytest.raises(quant.QuantError, match="blocksize=64 \\(config: 128\\)"):
        quant.load_quantized(_skeleton(model), fake, quant.QuantConfig(compute_dtype=FP32, blocksize=128))


def test_wrong_skeleton_missing_dir_and_bad_save_are_refused(saved: tuple[llama.Llama, Path],
                                                             tmp_path: Path) -> None:
    model, out = saved
    with torch.device("meta"):
        bigger = llama.Llama(dataclasses.replace(model.config, num_hidden_layers=3))
    with pytest.raises(quant.QuantError, match="4-bit layers differ"):
        quant.load_quantized(bigger, out, QC)
    with pytest.raises(quant.QuantError, match="not a pre-quantised model directory"):
        quant.load_quantized(_skeleton(model), tmp_path, QC)
    with pytest.raises(quant.QuantError, match="quantised with quant_type='nf4' \\(config: 'fp4'\\)"):
        quant.save_quantized(model, tmp_path / "x", quant.QuantConfig(quant_type="fp4", compute_dtype=FP32))

