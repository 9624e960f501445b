"""The README's main command, shortened: configs/demo.yaml trains a few steps and eval.py scores it.

Runs the real CLIs in child processes on the real demo model (SmolLM2-135M-Instruct, fetched and
converted by scripts/fetch_smollm2.py) and the shipped data, exactly as scripts/demo does, with only
the step count, the eval size and the output dir overridden — so the demo cannot silently rot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_config_trains_and_scores_end_to_end(tmp_path, smollm2_dir):
    assert smollm2_dir == ROOT / "models" / "SmolLM2-135M-Instruct"  # where configs/demo.yaml points
    out = tmp_path / "run"
    short = ["--set", f"train.output_dir={out}", "train.max_steps=3", "train.eval_steps=3",
             "train.save_steps=3", "train.logging_steps=1", "train.eval_max_batches=1"]
    r = _run("train.py", "configs/demo.yaml", "--no-progress", *short)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4-bit" in r.stdout and "trainable parameters" in r.stdout  # the memory report was printed
    assert "(grouped by length)" in r.stdout
    assert (out / "final/adapter_model.safetensors").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 3

    scored = ["--set", f"train.output_dir={out}", "eval.max_new_tokens=16", "--limit", "4", "--no-progress"]
    for extra in (["--baseline"], []):
        r = _run("eval.py", "configs/demo.yaml", *extra, *scored)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "micro F1" in r.stdout
    for name in ("eval", "eval-baseline"):
        m = json.loads((out / name / "metrics.json").read_text())
        assert m["n_examples"] == 4
        assert (out / name / "predictions.jsonl").exists() and (out / name / "report.md").exists()
    assert json.loads((out / "eval-baseline/metrics.json").read_text())["adapter"] is None

    r = _run("-m", "finetune.evaluate.compare", str(out / "eval-baseline/metrics.json"),
             str(out / "eval/metrics.json"))
    assert r.returncode == 0 and "entity micro F1" in r.stdout
