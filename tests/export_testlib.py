"""Shared pieces of the export / generate tests: tiny models of each family with a trained-looking adapter,
a run config for them, and the CLI runner with its one-line error check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hf_fixtures
import json_tokenizers
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
# 64-wide so that every 2-D weight splits into whole 32-value blocks (q8_0 / q4_0 are really used)
WIDE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = ("llama-spm", "llama3-bpe", "mistral", "qwen2")


def make_model(root: Path, family: str) -> Path:
    """A tiny checkpoint of ``family`` with its tokenizer files (SentencePiece or byte-level BPE)."""
    out = root / family
    if family == "llama-spm":
        return hf_fixtures.make_hf_checkpoint(out, tokenizer=True)
    if family == "llama3-bpe":
        hf_fixtures.make_hf_checkpoint(out, vocab_size=600)
        json_tokenizers.write_byte_level(out)
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(bos_token_id=0, eos_token_id=4)  # <|begin_of_text|>, <|eot_id|>
        (out / "config.json").write_text(json.dumps(cfg))
        return out
    if family == "mistral":  # window longer than the test prompts: transformers' GGUF reader ignores it
        hf_fixtures.make_family_checkpoint(out, "mistral", **WIDE, sliding_window=64)
        hf_fixtures.write_tokenizer_files(out)
        return out
    if family == "qwen2":
        hf_fixtures.make_family_checkpoint(out, "qwen2", **WIDE, vocab_size=600)
        json_tokenizers.write_qwen2_like(out)
        return out
    if family in ("phi", "gemma"):
        hf_fixtures.make_family_checkpoint(out, family)
        hf_fixtures.write_tokenizer_files(out)
        return out
    raise ValueError(family)


def save_adapter(model_dir: Path, out: Path, seed: int = 1, scale: float = 0.06,
                 targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")) -> Path:
    """An adapter as training leaves it (non-zero A and B), written by lora.save_adapter."""
    import llama
    import lora

    model = llama.from_pretrained(str(model_dir))
    lora.inject(model, targets=list(targets), r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sorted(lora.lora_modules(model).items()):
            for p in (m.lora_A.weight, m.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    lora.save_adapter(model, out, base_model_name_or_path=str(model_dir))
    return out


def write_config(path: Path, model_dir: Path, run_dir: Path, quant: bool = True, **data) -> Path:
    data_file = path.parent / "rows.csv"
    data_file.write_text("input_text,output_text\n\"Gentile Mario Rossi, a Milano.\",\"Mario Rossi: PER\"\n",
                         encoding="utf-8")
    cfg = {
        "model": {"path": str(model_dir), "device": "cpu", "dtype": "float32"},
        "quant": {"enabled": quant},
        "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        "data": {"path": str(data_file), "template": "Testo: {input}\nEntità:\n{output}", "max_length": 96,
                 "train_size": None, "test_size": None, **data},
        "train": {"output_dir": str(run_dir)},
        "eval": {"max_new_tokens": 8, "batch_size": 4},
    }
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def run_cli(script: str, *args: object, stdin: str | None = None, timeout: float = 180,
            preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout, input=stdin, preexec_fn=preexec)


def error_line(stderr: str) -> str:
    """The single ``error:`` line of a CLI failure, and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
