"""Resume equivalence with real process deaths: `python train.py` SIGKILLed, SIGTERMed, SIGINTed.

The reference is an uninterrupted 6-step run (cosine schedule with warmup, LoRA dropout 0.1 so the
RNG matters, an epoch boundary at step 4, checkpoints every 3 steps). A run killed after step 4 and
resumed from step-3 must end with bit-identical adapter weights and logged losses.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_testlib import (  # noqa: E402
    REPO,
    adapter,
    cli_env,
    error_line,
    metrics,
    run_config,
    run_train,
    train_losses,
    write_csv,
    write_yaml,
)

from finetune.run import checkpoint as ckpt  # noqa: E402


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    data = write_csv(root / "data.csv")
    config = write_yaml(root / "run.yaml", run_config(tiny_model_dir, data, root / "run"))
    proc = run_train(config)
    assert proc.returncode == 0, proc.stderr
    return root / "run", data


def assert_same_run(ref: Path, run: Path) -> None:
    a, b = adapter(ref / "final"), adapter(run / "final")
    assert a.keys() == b.keys() and len(a) == 16
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise
    assert train_losses(run) == train_losses(ref)  # exact floats, steps 1..6 once each
    assert [s for s, _ in train_losses(run)] == [1, 2, 3, 4, 5, 6]
    evals = [(r["step"], r["eval_loss"]) for r in metrics(ref) if "eval_loss" in r]
    assert evals == [(r["step"], r["eval_loss"]) for r in metrics(run) if "eval_loss" in r]


def test_sigkill_then_resume_is_bitwise_identical(straight, tiny_model_dir, tmp_path):
    ref, data = straight
    config = write_yaml(tmp_path / "run.yaml", run_config(tiny_model_dir, data, tmp_path / "run"))
    proc = run_train(config, FINETUNE_FAULT="step:4")  # SIGKILL right after optimizer step 4
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert [s for s, _ in train_losses(run)] == [1, 2, 3, 4]  # step 4 was logged, then lost
    assert not (run / "final").exists() and ckpt.latest_checkpoint(run).step == 3

    proc = run_train(config, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {run / 'checkpoints' / 'step-3'}" in proc.stdout
    assert_same_run(ref, run)


def test_sigkill_during_save_resumes_from_previous_checkpoint(straight, tiny_model_dir, tmp_path):
    ref, data = straight
    config = write_yaml(tmp_path / "run.yaml", run_config(tiny_model_dir, data, tmp_path / "run",
                                                          train={"save_steps": 2}))
    proc = run_train(config, FINETUNE_FAULT="save:4")  # killed with step-4 half written
    assert proc.returncode == -signal.SIGKILL
    root = tmp_path / "run" / "checkpoints"
    partial = [p for p in root.iterdir() if p.name.startswith(".tmp-step-4.")]
    assert len(partial) == 1 and (partial[0] / "adapter_model.safetensors").is_file()
    assert not (partial[0] / ckpt.INFO_FILE).exists()
    assert ckpt.latest_checkpoint(tmp_path / "run").step == 2

    proc = run_train(config, "--set", "train.resume=auto")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "step-2 (step 2 of 6)" in proc.stdout
    assert "interrupted save" in proc.stdout and not partial[0].exists()
    assert_same_run(ref, tmp_path / "run")  # save_steps does not change the trajectory


def test_killed_before_its_first_checkpoint_restarts_without_flags(straight, tiny_model_dir, tmp_path):
    """A run that dies before its first checkpoint (SIGKILL, OOM, divergence) is not stuck: the same
    command starts it over from step 0, and the result equals an uninterrupted run bit for bit."""
    ref, data = straight
    config = write_yaml(tmp_path / "run.yaml", run_config(tiny_model_dir, data, tmp_path / "run"))
    proc = run_train(config, FINETUNE_FAULT="step:2")  # SIGKILL after step 2; the first save is at 3
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert (run / "metrics.jsonl").is_file() and ckpt.latest_checkpoint(run) is None

    proc = run_train(config, "--resume")  # nothing to resume: says so, and what to do
    assert proc.returncode == 2
    assert "stopped before its first checkpoint); drop --resume to start the run there from step 0" in \
        error_line(proc.stderr)

    proc = run_train(config)  # the same command again
    assert proc.returncode == 0, proc.stderr
    assert "over from step 0: the run there stopped before its first checkpoint" in proc.stdout
    assert_same_run(ref, run)


def test_ctrl_c_saves_and_exits_130(tiny_model_dir, tmp_path):
    """SIGINT in the middle of a long run (SIGTERM takes the same path: see the next test; exit 143)."""
    sig, code = signal.SIGINT, 130
    data = write_csv(tmp_path / "data.csv")
    config = write_yaml(tmp_path / "run.yaml", run_config(tiny_model_dir, data, tmp_path / "run", train={
        "max_steps": 100000, "save_steps": 100000, "eval_steps": 100000}))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), str(config), "--no-progress"], cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (log.is_file() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "saving a checkpoint" in err and "stopping on a signal" in out
    last = ckpt.latest_checkpoint(tmp_path / "run")
    logged = [s for s, _ in train_losses(tmp_path / "run")]
    assert last is not None and last.step == logged[-1] >= 2
    state = ckpt.load_trainer_state(last.path / ckpt.STATE_FILE)
    assert state["step"] == last.step and state["epoch"] * 4 + state["position"] == last.step
    assert not (tmp_path / "run" / "final").exists()


def test_stop_signal_flag_and_second_signal_aborts():
    """In-process: the first signal only sets the flag; a second one gets the previous behaviour back
    (Ctrl-C twice = Python's KeyboardInterrupt, a way out of a stuck save)."""
    import os

    from finetune.run.loop import StopSignal

    # A shell's background job starts with SIGINT ignored; give this test Python's usual handler.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        term, intr = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        with StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is term and signal.getsignal(signal.SIGINT) is intr
    finally:
        signal.signal(signal.SIGINT, outer)
