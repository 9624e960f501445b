"""A benchmark run cut short keeps what it measured (issue 29: the first GPU run must count).

The runbook's scripts run here with `--preset cpu-tiny` and the runbook's own flags, and are stopped
midway the way `timeout` stops them: SIGTERM (what `timeout` sends first) or SIGKILL (what `timeout -k`
sends when that does not end it), sent right after the first `target` line, while configurations are
still to come. Whatever was printed must be in the output and the --json file must hold those rows
and that target, marked incomplete. The last test runs benchmarks/gpu_check.sh itself (the gpu tests,
skipped here, then the runbook) with a training stage timeout far shorter than the stage (compiling on
a CPU takes minutes), so the real `timeout` fires somewhere in the middle; every line it left must
agree with the JSON it left, and the summary must say what happened. Speeds printed on a
CPU mean nothing and are not checked.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
# gpu_runbook.sh's flags for each script (the runbook adds --preset and --checkpoint-dir the same way)
TRAIN = ["bench_train.py", "--compare-hf", "--shapes", "1x128,4x512,1x2048", "--grad-ckpt", "on",
         "--compile", "off,on", "--warmup", "2", "--steps", "3"]
GENERATE = ["bench_generate.py", "--compare-hf", "--batch-sizes", "1,16", "--prompt-len", "128",
            "--new-tokens", "128", "--no-ragged", "--variants", "4bit,dense+compile", "--warmup", "1",
            "--repeats", "2"]


def start(script: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-u", str(ROOT / "benchmarks" / script[0]), "--preset", "cpu-tiny",
           "--checkpoint-dir", str(tmp_path / "ck"), "--json", str(out), *script[1:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            cwd=tmp_path)
    return proc, out


def run_until_first_target(proc: subprocess.Popen, sig: int,
                           limit: float = 240) -> tuple[list[str], list[str]]:
    """Read the output until the first `target` line, send `sig`; (lines before it, lines after)."""
    before: list[str] = []
    deadline = time.monotonic() + limit
    assert proc.stdout is not None
    for line in proc.stdout:
        before.append(line.rstrip("\n"))
        if line.startswith("target "):
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, "no target line in time:\n" + "\n".join(before[-20:])
    else:
        raise AssertionError("the script ended without a target line:\n" + "\n".join(before[-30:]))
    after = [line.rstrip("\n") for line in proc.stdout]
    proc.wait(timeout=60)
    return before, after


def ratio_of(line: str) -> float:
    return float(re.search(r": ([0-9.]+)x \(", line).group(1))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_training_cut_short_keeps_printed_targets_and_json(tmp_path: Path, sig: int) -> None:
    proc, out = start(TRAIN, tmp_path)
    before, after = run_until_first_target(proc, sig)
    target = before[-1]
    assert target.startswith("target 1x128 ckpt=on tokens/s >= 5.0x hf: ") and "(ours)" in target
    # HF ran first, so the first row of ours completed a pair; the other shapes and compiling never ran
    assert any(line.startswith("parity ") for line in before)
    assert not any(line.startswith("ours+compile ") for line in before + after)
    data = json.loads(out.read_text())
    assert data["complete"] is False
    rows = [(r["impl"], r["batch"], r["seq_len"]) for r in data["results"]]
    assert rows[:4] == [("hf", 1, 128), ("hf", 4, 512), ("hf", 1, 2048), ("ours", 1, 128)], rows
    assert abs(data["targets"]["speed_1x128"]["ratio"] - ratio_of(target)) < 0.01
    assert abs(data["parity_loss"]["ours"] - data["parity_loss"]["hf"]) < 1e-4
    assert len(rows) in (4, 5)  # the 4x512 row of ours may have finished before the signal landed
    if sig == signal.SIGTERM:  # the handler ends it cleanly: a summary of what ran, stored as stopped
        assert proc.returncode == 143, "\n".join(after[-20:])
        assert any(line.startswith("== summary (stopped early: SIGTERM") for line in after), after
        assert target in after and data["stopped"].startswith("SIGTERM")
    else:  # killed outright, no handler: the JSON is the one written just before the target line
        assert proc.returncode == -signal.SIGKILL and "stopped" not in data


def test_generation_cut_short_keeps_printed_targets_and_json(tmp_path: Path) -> None:
    proc, out = start(GENERATE, tmp_path)
    before, after = run_until_first_target(proc, signal.SIGTERM)
    target = before[-1]
    assert target.startswith("target batch 1 new tokens/s >= 20x hf: ") and "(ours)" in target
    assert proc.returncode == 143, "\n".join(after[-20:])
    assert not any(line.startswith("ours+dense") for line in before + after)  # never got that far
    data = json.loads(out.read_text())
    assert data["complete"] is False and data["stopped"].startswith("SIGTERM")
    rows = [(r["impl"], r["prompts"]) for r in data["results"]]
    assert rows[:3] == [("hf", 1), ("hf", 16), ("ours", 1)], rows
    assert abs(data["targets"]["speed_batch_1"]["ratio"] - ratio_of(target)) < 0.01
    assert data["agreement"]["ours batch 1"]["rows_identical"] == 1  # fp32: the same greedy tokens


def test_a_missing_package_is_named_before_any_work(tmp_path: Path) -> None:
    # peft made unimportable in the child (a None entry in sys.modules is how Python marks that)
    code = ("import runpy, sys; sys.modules['peft'] = None; "
            f"sys.argv = [{str(ROOT / 'benchmarks' / 'bench_train.py')!r}, '--preset', 'cpu-tiny', "
            "'--compare-hf']; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'peft'" in errors[0] and "--compare-hf" in errors[0], proc.stdout
    assert "model:" not in proc.stdout and not list(tmp_path.iterdir())  # nothing loaded, nothing written


@pytest.mark.slow  # the whole gpu_check.sh on CPU: pytest -m gpu (all skipped), then the runbook, ~1.5 min
def test_gpu_check_with_training_stopped_by_its_timeout_keeps_every_line(tmp_path: Path) -> None:
    out, log_file = tmp_path / "out", tmp_path / "check.log"
    log_file.write_text("an earlier run\n")
    # training: HF and ours eager take seconds, compiling on a CPU minutes, so 40 s stops it midway
    env = dict(ENV, PY=sys.executable, PRESET="cpu-tiny", CK=str(tmp_path / "ck"), OUT=str(out),
               LOG=str(log_file), TRAIN_S="40", GEN_VARIANTS="4bit,dense")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    log = proc.stdout
    assert proc.returncode == 1, log[-3000:] + proc.stderr[-2000:]
    assert log_file.read_text() == "an earlier run\n" + log  # everything printed is appended to the log
    summary = log[log.index("== gpu_check summary"):]
    assert "gpu tests: ok: " in summary and "skipped" in summary, summary
    assert "gpu tests: skipped here: no CUDA device" in summary
    assert "training: STOPPED by its timeout" in summary and "generation: complete" in summary, summary
    train_log = (out / "train.log").read_text().splitlines()
    data = json.loads((out / "train.json").read_text())
    assert data["complete"] is False and data["stopped"].startswith("SIGTERM")
    # every row and the latest line of every target the stopped stage printed are in its JSON
    printed_rows = [line for line in train_log if re.match(r"(hf|ours\S*) +\d+x\d+ ckpt=", line)]
    assert printed_rows and len(printed_rows) == len(data["results"]), (printed_rows, data["results"])
    for line, row in zip(printed_rows, data["results"]):
        assert line.split()[:2] == [row["impl"], f"{row['batch']}x{row['seq_len']}"]
    latest = {line.split()[1]: ratio_of(line) for line in train_log
              if line.startswith("target ") and "tokens/s" in line}
    assert latest, train_log
    for shape, ratio in latest.items():
        assert abs(data["targets"][f"speed_{shape}"]["ratio"] - ratio) < 0.01
    # the summary repeats the latest line per target, from both stages
    for head in ("target 1x128 ckpt=on", "target batch 1 new tokens/s", "target batch 16 new tokens/s"):
        assert head in summary, summary
    assert json.loads((out / "generate.json").read_text())["complete"] is True
