"""eval.py on damaged adapters and unusable output folders: one `error:` line, exit 2, and all of it
before the base model is loaded (minutes on 7B) or a single answer generated."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_cli import run_cli, save_random_adapter, write_config, write_csv  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("eval_bad")
    data = write_csv(root / "entities.csv")
    adapter = save_random_adapter(tiny_model_dir, root / "adapter")
    cfg = write_config(root / "cfg.yaml", tiny_model_dir, data, root / "run")
    return {"root": root, "adapter": adapter, "cfg": cfg}


def _config_edit(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return edit


def _truncate(d: Path) -> None:
    w = d / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _not_utf8(d: Path) -> None:
    text = (d / "adapter_config.json").read_text().replace('"LORA"', '"LORA", "note": "caf\u00e9"')
    (d / "adapter_config.json").write_bytes(text.encode("latin-1"))


def _tensor_edit(change):
    def edit(d: Path) -> None:
        sd = load_file(str(d / "adapter_model.safetensors"))
        key = sorted(sd)[0]
        sd[key] = change(sd[key])
        save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return edit


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = float("nan")
    return t


CASES = {
    "truncated weights": (_truncate, "is truncated or not a safetensors file"),
    "r as a word": (_config_edit(r="sixteen"), r"r must be a positive integer \(the adapter rank\), got "
                    r"'sixteen'"),
    "alpha as a string": (_config_edit(lora_alpha="32"), "lora_alpha must be a positive number, got '32'"),
    "non-UTF-8 config": (_not_utf8, r"adapter_config.json is not UTF-8 text \(invalid"),
    "int32 tensor": (_tensor_edit(lambda t: t.to(torch.int32)), "has dtype int32; LoRA weights are "
                     "floating point"),
    "NaN weights": (_tensor_edit(_nan), "holds NaN or inf values"),
    "backtracking target regex": (_config_edit(target_modules=r"(\w*\.?\w*)*X"),
                                  "which can take exponential time to match"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_adapter_is_one_line_before_the_model_loads(case, good, tmp_path, capsys):
    import re

    edit, pattern = CASES[case]
    bad = tmp_path / "adapter"
    shutil.copytree(good["adapter"], bad)
    edit(bad)
    rc, out, err = run_cli([good["cfg"], "--adapter", bad, "--output", tmp_path / "out"], capsys)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot use adapter {bad}: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert "memory:" not in out  # refused before load_model printed its memory report


def test_output_path_that_is_a_file_fails_before_generation(good, tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("mine")
    rc, out, err = run_cli([good["cfg"], "--adapter", good["adapter"], "--output", target], capsys)
    assert rc == 2 and "exists and is not a directory" in err and err.count("\n") == 1, err
    assert "memory:" not in out and target.read_text() == "mine"


def test_read_only_output_folder_fails_before_generation(good, read_only_dir, capsys):
    rc, out, err = run_cli([good["cfg"], "--adapter", good["adapter"], "--output", read_only_dir / "eval"],
                           capsys)
    assert rc == 2 and "Read-only file system" in err and err.count("\n") == 1, err
    assert "memory:" not in out


def test_planted_symlinks_in_a_shared_output_folder_are_never_followed(good, tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    out = tmp_path / "shared-eval"
    out.mkdir()
    for name in ("metrics.json.tmp", "predictions.jsonl.tmp", "report.md"):  # old temp names and a target
        (out / name).symlink_to(outside)
    rc, _, err = run_cli([good["cfg"], "--adapter", good["adapter"], "--output", out, "--limit", "2"], capsys)
    assert rc == 0, err
    assert outside.read_text() == "precious"
    assert not (out / "report.md").is_symlink() and (out / "report.md").read_text().startswith("# Evaluation")


def test_adapter_for_another_model_size_fails_before_the_model_loads(good, tmp_path, capsys):
    import hf_fixtures

    wide = hf_fixtures.make_hf_checkpoint(tmp_path / "wide", hidden_size=96, num_attention_heads=4)
    adapter = save_random_adapter(wide, tmp_path / "wide_adapter")
    rc, out, err = run_cli([good["cfg"], "--adapter", adapter, "--output", tmp_path / "out"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "has shape [4, 96] but the model needs [4, 64] (from its config.json)" in err
    assert "memory:" not in out


def test_disk_full_after_generation_keeps_the_scores_in_the_message(good, tmp_path, capsys, monkeypatch):
    import errno
    import os

    from finetune import files

    real = files.write_bytes_atomic

    def full(path, data, durable=True):  # the writer hitting a full disk at the first output file
        if Path(path).name == "predictions.jsonl":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data, durable)

    monkeypatch.setattr(files, "write_bytes_atomic", full)
    args = [good["cfg"], "--adapter", good["adapter"], "--output", tmp_path / "o", "--limit", "2"]
    rc, _, err = run_cli(args, capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"could not write the evaluation files to {tmp_path / 'o'}: the disk is full" in err
    assert "scores of this run: micro F1" in err
    assert [p.name for p in (tmp_path / "o").iterdir()] == []  # no temp file left behind
