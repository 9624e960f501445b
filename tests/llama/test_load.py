"""The loader: single-file and sharded checkpoints, dtype conversion, the linear hook, bad inputs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import llama
from llama import LoadError


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint dir, read with safetensors itself (the oracle)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_single_file_and_sharded_load_the_checkpoint_tensors(tiny_model_dir, tiny_sharded_model_dir):
    index = json.loads((tiny_sharded_model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for path in (tiny_model_dir, tiny_sharded_model_dir):
        model = llama.from_pretrained(path)
        assert not model.training
        state, stored = model.state_dict(), checkpoint_tensors(path)
        assert set(state) == set(stored)
        for name, t in stored.items():
            assert torch.equal(state[name], t), name
        assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())


def test_dtype_is_converted_on_the_way(make_checkpoint):
    path = make_checkpoint(dtype=torch.float16)
    stored = checkpoint_tensors(path)
    assert {t.dtype for t in stored.values()} == {torch.float16}
    for dtype, want in ((torch.float32, torch.float32), ("bfloat16", torch.bfloat16), (None, torch.float16)):
        model = llama.from_pretrained(path, dtype=dtype, device="auto")
        state = model.state_dict()
        assert {t.dtype for t in state.values()} == {want}
        assert all(torch.equal(state[n], t.to(want)) for n, t in stored.items())
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_hook_sees_each_linear_once_fully_loaded_and_replaces_it(make_checkpoint):
    # 1KB shards: every tensor in its own shard, so a linear's weight and bias arrive separately.
    path = make_checkpoint(max_shard_size="1KB", attention_bias=True)
    stored = checkpoint_tensors(path)
    calls: list[str] = []

    class Marker(nn.Module):
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base = base

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x)

    def hook(name: str, linear: nn.Linear) -> nn.Module:
        calls.append(name)
        assert type(linear) is nn.Linear and linear.weight.dtype == torch.bfloat16
        assert not linear.weight.is_meta
        assert torch.equal(linear.weight, stored[f"{name}.weight"].to(torch.bfloat16))
        if f"{name}.bias" in stored:
            assert torch.equal(linear.bias, stored[f"{name}.bias"].to(torch.bfloat16))
        else:
            assert linear.bias is None
        return Marker(linear) if name.endswith("q_proj") else linear

    model = llama.from_pretrained(path, dtype=torch.bfloat16, linear_hook=hook)
    linears = {n.removesuffix(".weight") for n in stored if n.endswith("proj.weight")} | {"lm_head"}
    assert sorted(calls) == sorted(linears) and len(calls) == 2 * 7 + 1
    assert isinstance(model.model.layers[1].self_attn.q_proj, Marker)
    assert type(model.model.layers[1].self_attn.k_proj) is nn.Linear
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_hook_on_tied_head_and_bad_hook_return(make_checkpoint):
    path = make_checkpoint(tie_word_embeddings=True)
    seen = {}

    def hook(name, linear):
        seen[name] = linear.weight.detach().clone()
        return linear

    model = llama.from_pretrained(path, linear_hook=hook)
    assert torch.equal(seen["lm_head"], model.model.embed_tokens.weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(TypeError, match="must return an nn.Module"):
        llama.from_pretrained(path, linear_hook=lambda name, linear: None)


def test_legacy_inv_freq_and_tied_lm_head_tensors_are_ignored(make_checkpoint):
    # transformers < 4.31 stored `rotary_emb.inv_freq` (Llama-2-7b-hf carries them); some tied
    # checkpoints also carry lm_head.weight. Both load; the RoPE table is recomputed.
    path = make_checkpoint(tie_word_embeddings=True)
    reference = llama.from_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.full((8,), 123.0)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model = llama.from_pretrained(path)
    ids = torch.tensor([[1, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=0)


# ---- every bad input gives one clear line -------------------------------------------------------

def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path: Path, **change) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))


def _truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _only_pickle(path: Path) -> None:
    (path / "model.safetensors").unlink()
    marker = path / "UNPICKLED"

    class Trap:  # unpickling this would create `marker`
        def __reduce__(self):
            return (Path.touch, (marker,))

    (path / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))


def _shard(path: Path, which: int) -> str:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))[which]


def _drop_shard(path: Path) -> None:
    (path / _shard(path, 1)).unlink()


def _misindex(path: Path) -> None:
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = next(n for n, f in index["weight_map"].items() if f == _shard(path, 1))
    index["weight_map"][name] = _shard(path, 0)
    index_file.write_text(json.dumps(index))


def _drop(name: str):
    return lambda p: _rewrite(p, lambda t: t.pop(name))


def _add(name: str):
    return lambda p: _rewrite(p, lambda t: t.update({name: torch.zeros(3)}))


def _unlink(name: str):
    return lambda p: (p / name).unlink()


BAD = {
    "missing-config": (_unlink("config.json"), ["config.json not found", "save_pretrained"]),
    "only-pickle": (_only_pickle, ["pytorch_model", "never unpickle", "safe_serialization=True"]),
    "no-weights": (_unlink("model.safetensors"), ["no model.safetensors", "found: config.json"]),
    "missing-tensor": (_drop("model.layers.1.mlp.up_proj.weight"),
                       ["lacks 1 tensor", "model.layers.1.mlp.up_proj.weight"]),
    "unexpected-tensor": (_add("model.layers.0.extra.weight"),
                          ["1 tensor(s) a llama model does not use", "model.layers.0.extra.weight"]),
    "wrong-shape": (lambda p: _edit_config(p, intermediate_size=96),
                    ["mlp.down_proj.weight", "[64, 128]", "expected [64, 96]", "model.safetensors"]),
    "too-few-layers-in-weights": (lambda p: _edit_config(p, num_hidden_layers=3),
                                  ["lacks 9 tensor", "model.layers.2."]),
    "truncated": (_truncate, ["model.safetensors", "truncated or corrupt"]),
    "garbage": (lambda p: (p / "model.safetensors").write_bytes(b"\x10" * 64), ["truncated or corrupt"]),
    "architecture": (lambda p: _edit_config(p, architectures=["GPTNeoXForCausalLM"]),
                     ["GPTNeoXForCausalLM", "not supported"]),
    "rope-type": (lambda p: _edit_config(p, rope_parameters={"rope_type": "yarn", "factor": 2.0}),
                  ["'yarn'", "not supported"]),
}
SHARDED_BAD = {
    "absent-shard": (_drop_shard, ["index.json names shard", "is absent", "model-00002-of-"]),
    "index-maps-wrong-shard": (_misindex, ["which does not hold it", "index"]),
    "index-not-json": (lambda p: (p / "model.safetensors.index.json").write_text("{"),
                       ["not a valid safetensors index"]),
}


def _expect_one_line(path: Path, words: list[str], **kwargs) -> None:
    with pytest.raises(LoadError) as err:
        llama.from_pretrained(path, **kwargs)
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize("layout, case", [("tiny_model_dir", c) for c in BAD]
                         + [("tiny_sharded_model_dir", c) for c in SHARDED_BAD])
def test_bad_checkpoint(layout, case, request, tmp_path):
    """Single-file (BAD) and sharded (SHARDED_BAD) checkpoints corrupted one way each: one line, no pickle."""
    path = Path(shutil.copytree(request.getfixturevalue(layout), tmp_path / "ckpt"))
    corrupt, words = (BAD if layout == "tiny_model_dir" else SHARDED_BAD)[case]
    corrupt(path)
    _expect_one_line(path, words)
    assert not (path / "UNPICKLED").exists()


def test_missing_dir_and_bad_dtype(tmp_path, tiny_model_dir):
    _expect_one_line(tmp_path / "nope", ["no such model directory", "nope"])
    _expect_one_line(tiny_model_dir, ["'int8'", "floating"], dtype="int8")
