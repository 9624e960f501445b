"""train.py's contract: user mistakes -> one `error:` line on stderr and exit 2, never a traceback, never a
clobbered run directory; success -> exit 0."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import hf_fixtures
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_testlib import run_config, run_train, write_csv, write_yaml  # noqa: E402

import train as train_cli  # noqa: E402


def call(capsys, config: Path, *args: str) -> tuple[int, str]:
    capsys.readouterr()  # drop what the set-up printed
    code = train_cli.main([str(config), "--no-progress", *args])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _missing_model(cfg, tmp):
    cfg["model"]["path"] = str(tmp / "nope")


def _typo(cfg, tmp):
    cfg["train"]["lerning_rate"] = 1e-4


def _no_weights(cfg, tmp):  # llama.LoadError from the loader
    d = tmp / "noweights"
    hf_fixtures.make_hf_checkpoint(d, tokenizer=True)
    (d / "model.safetensors").unlink()
    cfg["model"]["path"] = str(d)


def _no_tokenizer(cfg, tmp):  # llama.TokenizerError
    cfg["model"]["path"] = str(hf_fixtures.make_hf_checkpoint(tmp / "notok"))


def _bad_target(cfg, tmp):  # lora.LoRAError
    cfg["lora"]["targets"] = ["qq_proj"]


def _columns(cfg, tmp):
    (tmp / "cols.csv").write_text("text_in,text_out\na,b\n")
    cfg["data"]["path"] = str(tmp / "cols.csv")


def _too_few(cfg, tmp):
    cfg["train"]["gradient_accumulation_steps"] = 64


def _cuda(cfg, tmp):
    cfg["model"]["device"] = "cuda"


def _adam8bit(cfg, tmp):
    cfg["train"]["optimizer"] = "adamw8bit"


CASES = {
    "missing model dir": (_missing_model, "model.path .* does not exist"),
    "unknown key": (_typo, "unknown key 'train.lerning_rate'"),
    "no weights": (_no_weights, "safetensors"),
    "no tokenizer": (_no_tokenizer, "tokenizer.model"),
    "bad lora target": (_bad_target, "qq_proj"),
    "missing columns": (_columns, "text_in"),
    "too few examples": (_too_few, "fewer than one optimizer step needs"),
    "cuda without gpu": (_cuda, "no CUDA device"),
    "8-bit adam on cpu": (_adam8bit, "needs a CUDA device"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_exit_2_with_one_line(case, tiny_model_dir, tmp_path, capsys):
    if case == "cuda without gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    edit, pattern = CASES[case]
    cfg = run_config(tiny_model_dir, write_csv(tmp_path / "data.csv"), tmp_path / "run")
    edit(cfg, tmp_path)
    code, err = call(capsys, write_yaml(tmp_path / "run.yaml", cfg))
    assert code == 2
    assert re.search(pattern, one_error_line(err)), err
    assert not (tmp_path / "run").exists()  # a failed start leaves no run dir that would block a retry


def test_bad_override_and_missing_config(tiny_model_dir, tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", run_config(tiny_model_dir, write_csv(tmp_path / "d.csv"),
                                                          tmp_path / "run"))
    code, err = call(capsys, config, "--set", "train.lr=-1")
    assert code == 2 and "train.lr must be > 0" in one_error_line(err)
    code, err = call(capsys, tmp_path / "missing.yaml")
    assert code == 2 and "config file not found" in one_error_line(err)


def test_never_clobbers_a_run_and_resume_needs_a_checkpoint(tiny_model_dir, tmp_path, capsys):
    cfg = run_config(tiny_model_dir, write_csv(tmp_path / "data.csv"), tmp_path / "run",
                     train={"max_steps": 2, "save_steps": 2, "eval_steps": 2})
    config = write_yaml(tmp_path / "run.yaml", cfg)
    code, err = call(capsys, config, "--resume")  # nothing to resume yet
    assert code == 2 and "no complete checkpoint" in one_error_line(err)
    assert call(capsys, config)[0] == 0
    final = tmp_path / "run" / "final" / "adapter_model.safetensors"
    before = (final.read_bytes(), final.stat().st_mtime_ns)
    code, err = call(capsys, config)
    assert code == 2 and "already holds a run; pass --resume" in one_error_line(err)
    assert (final.read_bytes(), final.stat().st_mtime_ns) == before
    # resuming a finished run is a no-op that rewrites nothing but final/ (same weights)
    assert call(capsys, config, "--resume")[0] == 0
    assert final.read_bytes() == before[0]


def test_real_process_prints_one_line_and_exits_2(tiny_model_dir, tmp_path):
    """The whole CLI in a child process: a ValueError subclass from lora/ (not a UserError) is caught."""
    cfg = run_config(tiny_model_dir, write_csv(tmp_path / "data.csv"), tmp_path / "run")
    cfg["lora"]["targets"] = ["nonexistent_proj"]
    proc = run_train(write_yaml(tmp_path / "run.yaml", cfg))
    assert proc.returncode == 2
    assert "nonexistent_proj" in one_error_line(proc.stderr)
