"""Helpers for the issue-28 tests: run train.py / eval.py on a bad input in a child process and check
that it ends in exactly one ``error:`` line, exit code 2, no traceback (times are printed, not asserted).

Self-contained on purpose (a run config written here, a tiny CSV), so these tests do not depend on the
training tests' helpers.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent

ROWS = [("Gentile Mario Rossi, ordine per Acme a Milano.", "Mario Rossi: PER\nAcme: ORG\nMilano: LOC"),
        ("La fattura di Banca Intesa.", "Banca Intesa: ORG"),
        ("Ciao Luca Ferrari, ci vediamo a Roma.", "Luca Ferrari: PER\nRoma: LOC")]


def write_csv(path: Path, n: int = 12) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["input_text", "output_text"])
        for i in range(n):
            w.writerow(ROWS[i % len(ROWS)])
    return path


def run_config(model_dir: Path, data: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A CPU/fp32 LoRA run of two steps on the tiny model; ``sections`` update it."""
    cfg: dict[str, Any] = {
        "model": {"path": str(model_dir), "device": "cpu", "dtype": "float32"},
        "quant": {"enabled": False},
        "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        "data": {"path": str(data), "template": "Estrai: {input}\n### Response:\n{output}", "max_length": 96,
                 "train_size": 8, "test_size": 2},
        "train": {"output_dir": str(out), "micro_batch_size": 2, "gradient_accumulation_steps": 1,
                  "max_steps": 2, "logging_steps": 1, "eval_steps": 2, "save_steps": 2, "seed": 1},
        "eval": {"max_new_tokens": 8, "batch_size": 2},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_run(tmp: Path, model_dir: Path, name: str = "run.yaml", **sections: dict[str, Any]) -> Path:
    data = write_csv(tmp / "data.csv")
    path = tmp / name
    path.write_text(yaml.safe_dump(run_config(model_dir, data, tmp / "run", **sections), sort_keys=False),
                    encoding="utf-8")
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                "TOKENIZERS_PARALLELISM": "false"})
    return env


def run_cli(argv: list[str], timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """``python ARGV`` from the repo root; returns the process and its wall time in seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.perf_counter() - start


def one_error_line(proc: subprocess.CompletedProcess, seconds: float, case: str, *fragments: str) -> str:
    """Exit code 2, stderr exactly one ``error:`` line holding every fragment, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert all(f in lines[0] for f in fragments), lines[0]
    print(f"\n[issue 28] {case}: exit {proc.returncode} in {seconds:.2f} s: {lines[0]}")
    return lines[0]
