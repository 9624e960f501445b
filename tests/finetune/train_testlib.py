"""Helpers shared by the training-loop tests: tiny data files, run configs, running train.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = "Estrai: {input}\n### Response:\n{output}"  # short: the tiny tokenizer spells English badly

_ROWS = [
    ("Gentile Mario Rossi, ordine per Acme a Milano.", "Mario Rossi: PER\nAcme: ORG\nMilano: LOC"),
    ("Ciao Luca Ferrari, ci vediamo a Roma lunedì.", "Luca Ferrari: PER\nRoma: LOC"),
    ("La fattura di Banca Intesa.", "Banca Intesa: ORG"),
    ("Spedizione per Torino partita ieri sera con il corriere.", "Torino: LOC"),
    ("Grazie mille!", ""),
    ("Caro Matteo Marino, la riunione a Bologna è spostata.", "Matteo Marino: PER\nBologna: LOC"),
]


def write_csv(path: Path, n: int = 24) -> Path:
    """A small repetitive entity dataset with inputs and outputs of different lengths."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["input_text", "output_text"])
        for i in range(n):
            w.writerow(_ROWS[i % len(_ROWS)])
    return path


def run_config(model_dir: Path, data: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A CPU/fp32 LoRA run config as a nested dict; ``sections`` update it (e.g. train={...})."""
    cfg: dict[str, Any] = {
        "model": {"path": str(model_dir), "device": "cpu", "dtype": "float32"},
        "quant": {"enabled": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"path": str(data), "template": TEMPLATE, "max_length": 96, "train_size": 16, "test_size": 4},
        "train": {"output_dir": str(out), "micro_batch_size": 2, "gradient_accumulation_steps": 2,
                  "max_steps": 6, "lr": 3e-3, "scheduler": "cosine", "warmup_steps": 1, "logging_steps": 1,
                  "eval_steps": 3, "save_steps": 3, "save_total_limit": 2, "seed": 7},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """The test process's environment for child processes: one thread (deterministic, 2-core CI)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                "TOKENIZERS_PARALLELISM": "false"})
    env.pop("FINETUNE_FAULT", None)
    env.update(extra)
    return env


def run_train(config: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """``python train.py CONFIG ARGS`` in a child process (so it can be SIGKILLed for real)."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), str(config), "--no-progress", *args],
                          cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(run_dir) if "loss" in r]


def adapter(path: Path) -> dict[str, Any]:
    return load_file(str(path / "adapter_model.safetensors"))


def run_train_patched(prelude: str, config: Path, *args: str, timeout: float = 120,
                      **env: str) -> subprocess.CompletedProcess:
    """``train.main`` in a child process after running ``prelude`` there (e.g. a writer that fails with
    ENOSPC at a chosen file): the real CLI, exit code and stderr, with one fault injected."""
    code = prelude + "\nimport sys\nimport train\nsys.exit(train.main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, str(config), "--no-progress", *args], cwd=REPO,
                          env=cli_env(**env), capture_output=True, text=True, timeout=timeout)


def error_line(stderr: str) -> str:
    """The single ``error:`` line of a CLI failure (and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning")]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]
