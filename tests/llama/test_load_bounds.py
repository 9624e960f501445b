"""Issue 28, checkpoints: config.json's layer counts are checked against the safetensors headers before
the model skeleton is built (any number fails at once), and a shard index is an object of file names
that stay inside the model folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from bad_inputs_lib import one_error_line, run_cli, write_run

import llama
from llama import LoadError

INDEX = "model.safetensors.index.json"


def _edit_json(path: Path, **change) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(change)
    path.write_text(json.dumps(cfg))


def _load_error(path: Path, *words: str) -> str:
    start = time.perf_counter()
    with pytest.raises(LoadError) as info:
        llama.from_pretrained(path)
    seconds = time.perf_counter() - start
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    print(f"\n[issue 28] from_pretrained {seconds:.3f} s: {msg}")
    return msg


def test_a_huge_layer_count_fails_from_the_headers_in_train_py(tiny_model_dir, tmp_path):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    _edit_json(model / "config.json", num_hidden_layers=100000)
    config = write_run(tmp_path, model)
    proc, seconds = run_cli(["train.py", str(config), "--no-progress"])
    one_error_line(proc, seconds, "num_hidden_layers: 100000", "lacks 899982 tensor(s)",
                   "every model.layers.2.* to model.layers.99999.*", "num_hidden_layers=100000",
                   "the weights hold 2 layer(s)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("digits", [10, 19, 4300])  # 4300: the most json.loads reads
def test_any_layer_count_fails_at_once(tiny_model_dir, tmp_path, digits):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    layers = int("9" * digits)
    _edit_json(model / "config.json", num_hidden_layers=layers)
    shown = str(layers) if digits < 20 else "over 10^19"
    _load_error(model, f"num_hidden_layers={shown}", "the weights hold 2 layer(s)")


def test_layers_with_a_gap_name_the_ones_present(tiny_sharded_model_dir, tmp_path):
    model = Path(shutil.copytree(tiny_sharded_model_dir, tmp_path / "model"))
    index = json.loads((model / INDEX).read_text())
    kept = {n: f for n, f in index["weight_map"].items() if not n.startswith("model.layers.0.")}
    index["weight_map"] = kept
    (model / INDEX).write_text(json.dumps(index))
    _edit_json(model / "config.json", num_hidden_layers=5000)
    _load_error(model, "num_hidden_layers=5000, the weights hold 1 layer(s)", "model.layers.[1] present")


def test_a_huge_expert_count_fails_from_the_headers(tmp_path):
    import hf_fixtures

    model = hf_fixtures.make_family_checkpoint(tmp_path / "mixtral", "mixtral")
    experts = json.loads((model / "config.json").read_text())["num_local_experts"]
    _edit_json(model / "config.json", num_local_experts=10**7)
    _load_error(model, "num_local_experts=10000000", f"the weights hold {experts} expert(s)",
                f"experts.[0-{experts - 1}] present")


@pytest.mark.parametrize("weight_map, words", [
    (["model-00001-of-00002.safetensors"], ["'weight_map' must be an object", "an array (JSON)"]),
    ("x", ["'weight_map' must be an object", "a string (JSON)"]),
    ({"model.norm.weight": 7}, ["maps model.norm.weight to a number (JSON)"]),
    ({"model.norm.weight": "../../../../etc/passwd"}, ["'../../../../etc/passwd'", "not a file name inside",
                                                        "never absolute or through '..'"]),
    ({"model.norm.weight": "/etc/passwd"}, ["'/etc/passwd'", "not a file name inside"]),
    ({"model.norm.weight": "a\nb.safetensors"}, ["'a\\nb.safetensors'"]),
])
def test_bad_shard_indexes_are_refused(tiny_sharded_model_dir, tmp_path, weight_map, words):
    model = Path(shutil.copytree(tiny_sharded_model_dir, tmp_path / "model"))
    index = json.loads((model / INDEX).read_text())
    if isinstance(weight_map, dict):
        weight_map = {**index["weight_map"], **weight_map}
    index["weight_map"] = weight_map
    (model / INDEX).write_text(json.dumps(index))
    _load_error(model, f"{model / INDEX}", *words)


def test_a_list_weight_map_is_one_line_from_train_py(tiny_sharded_model_dir, tmp_path):
    model = Path(shutil.copytree(tiny_sharded_model_dir, tmp_path / "model"))
    _edit_json(model / INDEX, weight_map=["model-00001-of-00002.safetensors"])
    proc, seconds = run_cli(["train.py", str(write_run(tmp_path, model)), "--no-progress"])
    one_error_line(proc, seconds, "weight_map is a list", "'weight_map' must be an object")
    assert not (tmp_path / "run").exists()
    model2 = Path(shutil.copytree(tiny_sharded_model_dir, tmp_path / "model2"))
    index = json.loads((model2 / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = "../../../../etc/passwd"
    (model2 / INDEX).write_text(json.dumps(index))
    proc, seconds = run_cli(["train.py", str(write_run(tmp_path, model2, name="run2.yaml")), "--no-progress"])
    one_error_line(proc, seconds, "shard index naming ../../../../etc/passwd", "not a file name inside")
    assert not (tmp_path / "run").exists()


def test_shards_that_are_symlinks_still_load(tiny_sharded_model_dir, tmp_path):
    """The HF hub cache keeps a snapshot's files as links into its blobs/ folder: names are checked,
    not where the links point."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in tiny_sharded_model_dir.iterdir():
        shutil.copy(f, blobs / f.name)
        os.symlink(os.path.relpath(blobs / f.name, snapshot), snapshot / f.name)
    model = llama.from_pretrained(snapshot)
    reference = llama.from_pretrained(tiny_sharded_model_dir)
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=0)
