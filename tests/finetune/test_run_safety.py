"""A run folder has one owner, a resume checks everything before it writes, bad checkpoints are skipped,
and the mistakes that used to surface late (or never) end with one `error:` line and exit 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import hf_fixtures
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_testlib import REPO, cli_env, run_config, write_csv, write_yaml  # noqa: E402

import train as train_cli  # noqa: E402
from finetune.run import checkpoint as ckpt  # noqa: E402
from finetune.run.lock import RunLock, lock_owner  # noqa: E402


def call(capsys, config: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = train_cli.main([str(config), "--no-progress", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def short_run(model_dir: Path, tmp: Path, **train) -> Path:
    cfg = run_config(model_dir, write_csv(tmp / "data.csv"), tmp / "run",
                     train={"max_steps": 2, "save_steps": 2, "eval_steps": 2, **train})
    return write_yaml(tmp / "run.yaml", cfg)


# ---------------------------------------------------------------------------------------------------
# one owner per run folder


def test_a_second_run_into_a_live_run_folder_is_refused(tiny_model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv")
    config = write_yaml(tmp_path / "run.yaml", run_config(tiny_model_dir, data, tmp_path / "run", train={
        "max_steps": 100000, "save_steps": 100000, "eval_steps": 100000}))
    live = subprocess.Popen([sys.executable, str(REPO / "train.py"), str(config), "--no-progress"], cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 60
        while not (log.is_file() and log.read_text().count("\n") >= 1):
            assert live.poll() is None and time.monotonic() < deadline, live.communicate()
            time.sleep(0.05)
        assert lock_owner(tmp_path / "run")["pid"] == live.pid
        before = (tmp_path / "run" / "config.yaml").read_bytes()
        for args in ((), ("--resume",), ("--set", "train.resume=auto")):
            code, _, err = call(capsys, config, *args)
            assert code == 2
            line = one_error_line(err)
            assert f"is in use by another run (pid {live.pid} on host" in line, line
            assert "wait for it to finish or stop it, or choose another train.output_dir" in line
        assert (tmp_path / "run" / "config.yaml").read_bytes() == before
        assert live.poll() is None  # untouched, still training
    finally:
        live.kill()
        live.communicate()
    # the holder died by SIGKILL: its lock is stale and the next run simply takes it
    code, out, err = call(capsys, config, "--set", "train.max_steps=2")
    assert code == 0, err
    assert f"took over the lock of a run that is no longer running (pid {live.pid}" in out
    assert lock_owner(tmp_path / "run") is None


def test_lock_in_process_and_failed_start_leaves_no_folder(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        assert lock_owner(run)["pid"] == os.getpid()
        with pytest.raises(Exception, match="is in use by another run"):
            RunLock(run).acquire()  # a second open file description conflicts, as another process would
    assert lock_owner(run) is None
    fresh = tmp_path / "fresh"
    RunLock(fresh).acquire().release()
    assert not fresh.exists()  # created by the lock, nothing written: removed again


def test_output_dir_that_is_a_file_fails_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    config = short_run(tiny_model_dir, tmp_path)
    (tmp_path / "run").write_text("not a folder")
    code, out, err = call(capsys, config)
    assert code == 2 and "exists and is not a directory" in one_error_line(err)
    assert "memory:" not in out and (tmp_path / "run").read_text() == "not a folder"


# ---------------------------------------------------------------------------------------------------
# resume: verify first, write after


def test_failed_resume_rewrites_nothing(tiny_model_dir, tmp_path, capsys):
    config = short_run(tiny_model_dir, tmp_path)
    assert call(capsys, config)[0] == 0
    run = tmp_path / "run"
    files = ["config.yaml", "metrics.jsonl", "checkpoints/latest", "final/adapter_model.safetensors"]
    before = {name: (run / name).read_bytes() for name in files}
    code, out, err = call(capsys, config, "--resume", "--set", "lora.r=8", "train.max_steps=4")
    assert code == 2
    line = one_error_line(err)
    assert f"cannot resume from {run / 'checkpoints' / 'step-2'}: this config sets lora.r 8 (the " \
        "checkpoint has 4); resume with the settings the run was started with" in line, line
    assert "memory:" not in out  # refused before the model loads
    assert {name: (run / name).read_bytes() for name in files} == before  # config.yaml still says r: 4


def test_resume_skips_checkpoints_that_do_not_verify(tiny_model_dir, tmp_path, capsys):
    config = short_run(tiny_model_dir, tmp_path, max_steps=6, save_steps=2, save_total_limit=None)
    assert call(capsys, config)[0] == 0
    root = tmp_path / "run" / "checkpoints"
    weights = root / "step-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated (a copy cut short, a full disk)
    (root / "step-4" / ckpt.STATE_FILE).write_bytes(b"PK\x03\x04 garbage")  # a corrupt trainer state
    shutil.copytree(root / "step-2", root / "step-9")
    (root / "step-9" / ckpt.INFO_FILE).write_bytes(b"\xff\xfe not json")  # an unreadable info file
    (root / "latest").write_bytes(b"\xff\xfe")  # and a pointer that is not even text
    code, out, err = call(capsys, config, "--resume")
    assert code == 0, err
    assert f"skipping checkpoint {root / 'step-9'}: it is incomplete or its checkpoint.json is " \
        "unreadable" in out
    assert f"skipping checkpoint {root / 'step-6'}: it does not verify" in out and "truncated" in out
    assert f"skipping checkpoint {root / 'step-4'}: it does not verify" in out
    assert "truncated or corrupt" in out and "weights_only=False" not in out + err
    assert f"resumed from {root / 'step-2'} (step 2 of 6)" in out

    (root / "step-2" / ckpt.STATE_FILE).write_bytes(b"")
    code, _, err = call(capsys, config, "--resume")  # step-4 and step-6 were re-saved by that resume
    assert code == 0, err
    for step in (2, 4, 6):
        (root / f"step-{step}" / "adapter_model.safetensors").write_bytes(b"\x00" * 8)
    code, _, err = call(capsys, config, "--resume")
    assert code == 2
    line = one_error_line(err)
    assert "no checkpoint in" in line and "verifies (step-6:" in line and "step-2:" in line, line


def test_second_ctrl_c_aborts_with_a_true_message_and_the_run_restarts(tiny_model_dir, tmp_path, capsys,
                                                                       monkeypatch):
    """Ctrl-C twice during step 1 (before any checkpoint): exit 130, no "before training started"
    message, and the same command then starts over. The signals are real, sent at a chosen point."""
    config = short_run(tiny_model_dir, tmp_path, max_steps=3, save_steps=3)
    real = ckpt.fault_point

    def twice(point: str, step: int) -> None:
        if (point, step) == ("step", 1):
            os.kill(os.getpid(), signal.SIGINT)  # the loop's handler: finish the step, save, exit...
            os.kill(os.getpid(), signal.SIGINT)  # ...and the second one aborts right away
        real(point, step)

    monkeypatch.setattr(ckpt, "fault_point", twice)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, _, err = call(capsys, config)
    finally:
        signal.signal(signal.SIGINT, outer)
    assert code == 130
    assert "interrupted before the first checkpoint; nothing saved: run the same command again" in err
    assert "before training started" not in err and "Traceback" not in err
    monkeypatch.setattr(ckpt, "fault_point", real)
    code, out, err = call(capsys, config)
    assert code == 0, err
    assert "over from step 0" in out


def test_trainer_state_is_refused_on_torch_older_than_2_6(tmp_path, monkeypatch):
    import torch

    ckpt.save_trainer_state(tmp_path / "s.pt", {"step": 1})
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(Exception, match=r"weights_only loader can be bypassed \(CVE-2025-32434\); upgrade "
                       r"to torch >= 2.6"):
        ckpt.load_trainer_state(tmp_path / "s.pt")


def test_restartable_folder_rules(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step-3.123.ab").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", ".lock"):
        (run / name).write_text("x")
    assert ckpt.plan_run_dir(run, False) is None  # leftovers of a run without a checkpoint
    (run / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="already holds a run"):
        ckpt.plan_run_dir(run, False)  # something that is not a run's: never clobbered


# ---------------------------------------------------------------------------------------------------
# data and model mismatches caught before training


def _edit_and_run(capsys, tiny_model_dir, tmp_path, edit) -> tuple[int, str, str]:
    cfg = run_config(tiny_model_dir, write_csv(tmp_path / "data.csv"), tmp_path / "run")
    edit(cfg, tmp_path)
    return call(capsys, write_yaml(tmp_path / "run.yaml", cfg))


def _small_vocab(cfg, tmp):  # the tokenizer of a 512-piece model next to weights with 100 rows
    import shutil

    small = hf_fixtures.make_hf_checkpoint(tmp / "small_vocab", vocab_size=100)
    big = Path(cfg["model"]["path"])
    for name in big.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(name, small / name.name)
    cfg["model"]["path"] = str(small)


def _long_rows(cfg, tmp):
    cfg["data"]["max_length"] = 300  # the tiny model has 256 positions


def _huge_rank(cfg, tmp):
    cfg["lora"]["r"] = 1_000_000


def _slow_regex(cfg, tmp):
    cfg["lora"]["targets"] = r"(\w*\.?\w*)*X"


def _nan_cell(cfg, tmp):
    rows = [{"input_text": "Gentile Mario Rossi, ordine.", "output_text": "Mario Rossi: PER"}] * 20
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"input_text": "Ciao", "output_text": NaN}\n'
    (tmp / "nan.jsonl").write_text(text)
    cfg["data"]["path"] = str(tmp / "nan.jsonl")


def _own_model(cfg, tmp, edit) -> None:
    model = hf_fixtures.make_hf_checkpoint(tmp / "own_model", tokenizer=True)
    edit(model)
    cfg["model"]["path"] = str(model)


def _size_as_text(cfg, tmp):
    def edit(m: Path) -> None:
        raw = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**raw, "hidden_size": "64"}))
    _own_model(cfg, tmp, edit)


def _int_weight(cfg, tmp):
    def edit(m: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        sd = load_file(str(m / "model.safetensors"))
        key = "model.layers.0.self_attn.q_proj.weight"
        sd[key] = sd[key].to(torch.int32)
        save_file(sd, str(m / "model.safetensors"), metadata={"format": "pt"})
    _own_model(cfg, tmp, edit)


CASES = {
    "config.json size as text": (_size_as_text, r"config.json: hidden_size must be a positive integer, "
                                 r"got '64'"),
    "int32 base weight": (_int_weight, r"model.safetensors: tensor model.layers.0.self_attn.q_proj.weight "
                          r"has dtype I32; a model's weights are floating point"),
    # caught when the tokenizer loads (it names both sizes), before any row is tokenised
    "tokenizer larger than the vocabulary": (_small_vocab, r"tokenizer.model has 512 tokens but the model's "
                                             r"config.json says vocab_size 100"),
    "max_length beyond the context": (_long_rows, "data.max_length 300 is longer than the model's context "
                                      "of 256 tokens"),
    "rank beyond the layer": (_huge_rank, r"LoRA rank r=1000000 is larger than the smaller side of "
                              r"model\.layers\.0\.self_attn\.q_proj .*use r <= "),
    "backtracking targets regex": (_slow_regex, r"run.yaml: lora.targets regex .* which can take "
                                   r"exponential time to match"),
    "backtracking quant.skip regex": (lambda cfg, tmp: cfg["quant"].update(skip=[r"(a+)+b"]),
                                      r"run.yaml: quant.skip regex '\(a\+\)\+b' repeats a group"),
    "JSON NaN cell": (_nan_cell, r"nan.jsonl: line 21: column 'output_text' holds nan \(a JSON NaN"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mismatches_are_one_line_before_training(case, tiny_model_dir, tmp_path, capsys):
    edit, pattern = CASES[case]
    start = time.perf_counter()
    code, _, err = _edit_and_run(capsys, tiny_model_dir, tmp_path, edit)
    assert code == 2
    import re

    assert re.search(pattern, one_error_line(err)), err
    assert time.perf_counter() - start < 30  # the regex case used to hang
    assert not (tmp_path / "run").exists()  # nothing left that would block a retry


def test_csv_cell_longer_than_csv_default_limit_is_read(tmp_path):
    from finetune.config import DataConfig
    from finetune.data.rows import load_rows

    long_email = "Gentile cliente, " + "la fattura è allegata. " * 8000  # ~184k characters
    path = tmp_path / "long.csv"
    path.write_text(f'input_text,output_text\n"{long_email}",x: PER\nbreve,y: ORG\n', encoding="utf-8")
    rows = load_rows(DataConfig(path=str(path), train_size=None, test_size=None))
    assert [len(r.input) for r in rows] == [len(long_email), 5]
    import csv

    assert csv.field_size_limit() == 131072  # the process-wide default is restored


def test_read_only_output_folder_fails_before_the_model_loads(tiny_model_dir, tmp_path, read_only_dir,
                                                             capsys):
    mnt = read_only_dir
    cfg = run_config(tiny_model_dir, write_csv(tmp_path / "data.csv"), mnt / "run")
    code, out, err = call(capsys, write_yaml(tmp_path / "run.yaml", cfg))
    assert code == 2
    line = one_error_line(err)
    assert f"cannot create train.output_dir {mnt / 'run'}: Read-only file system" in line, line
    assert "data:" not in out and "memory:" not in out  # before the data, before the model


def test_planted_symlinks_in_a_shared_run_folder_are_never_followed(tiny_model_dir, tmp_path, capsys):
    config = short_run(tiny_model_dir, tmp_path)
    assert call(capsys, config)[0] == 0
    run = tmp_path / "run"
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    planted = ["config.yaml.tmp", "metrics.jsonl.tmp", f".tmp-config.yaml.{os.getpid()}",
               "checkpoints/latest.tmp", "final/adapter_config.json.tmp",
               "final/adapter_model.safetensors.tmp"]
    for name in planted:
        (run / name).symlink_to(outside)
    code, _, err = call(capsys, config, "--resume", "--set", "train.max_steps=4")
    assert code == 0, err
    assert outside.read_text() == "precious"
    assert not (run / "config.yaml").is_symlink() and "max_steps: 4" in (run / "config.yaml").read_text()
