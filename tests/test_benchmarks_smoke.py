"""The benchmark scripts run end to end with their tiny CPU preset and measure what they claim to.

The speeds printed on a CPU mean nothing for the GPU targets; what these tests pin down is that the
numbers are computed from real work: every configuration runs, the token counts are the batch's real
tokens, and the HF baseline (transformers + peft + bitsandbytes) runs the *same* 4-bit model as ours
(equal loss before training, equal greedy tokens), so a ratio on a GPU compares like with like.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--preset", "cpu-tiny",
                           "--tmp-dir", str(tmp_path), "--json", str(out), *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_train_cpu_tiny(tmp_path: Path) -> None:
    data, stdout = run_script("bench_train.py", "--compare-hf", "--pad-frac", "0.5", "--shapes", "1x64,2x128",
                              tmp_path=tmp_path)
    assert data["complete"] is True and "stopped" not in data
    steps = int(data["args"]["steps"])
    rows = {(r["impl"], r["batch"], r["seq_len"], r["grad_ckpt"]): r for r in data["results"]}
    configs = [(b, t, ck) for b, t in ((1, 64), (2, 128)) for ck in (True, False)]
    assert set(rows) == {(impl, *c) for impl in ("ours", "hf") for c in configs}
    for (impl, b, t, ck), r in rows.items():
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["peak_bytes"] > 2**20
        assert math.isfinite(r["loss"])
        # non-padding tokens only: row 0 is full length, the others lose up to half to padding
        if b == 1:
            assert r["tokens"] == t * steps
        else:
            assert t * steps < r["tokens"] < b * t * steps
        assert r["tokens"] == rows[("hf" if impl == "ours" else "ours", b, t, ck)]["tokens"]  # same batch
        assert math.isclose(r["tokens_per_s"], r["tokens"] / (r["ms_per_step"] * steps / 1e3), rel_tol=1e-6)
    # Same NF4 weights through both production loaders: the base-model losses agree (fp32 on CPU), and a
    # random init gives ~ln(vocab), so neither side is running on garbage or zeros.
    parity = data["parity_loss"]
    assert abs(parity["ours"] - parity["hf"]) < 1e-4, parity
    assert abs(parity["ours"] - math.log(data["model"]["vocab_size"])) < 0.1, parity
    assert set(data["ratios"]) == {f"ours {b}x{t} ckpt={'on' if ck else 'off'}" for b, t, ck in configs}
    ours, hf = rows[("ours", 2, 128, True)], rows[("hf", 2, 128, True)]
    assert math.isclose(data["ratios"]["ours 2x128 ckpt=on"], ours["tokens_per_s"] / hf["tokens_per_s"])
    assert "speed ratio ours" in stdout and "parity" in stdout


def test_bench_generate_cpu_tiny(tmp_path: Path) -> None:
    data, stdout = run_script("bench_generate.py", "--compare-hf", "--batch-sizes", "1,4", tmp_path=tmp_path)
    assert data["complete"] is True
    new = int(data["args"]["new_tokens"])
    by = {(r["impl"], r["prompts"]): r for r in data["results"]}
    # compile is off in the CPU preset; the dense merged copy runs after the 4-bit model
    assert set(by) == {(impl, b) for impl in ("ours", "ours+dense", "hf") for b in (1, 4)}
    for (_, b), r in by.items():
        assert r["status"] == "ok", r
        assert r["generated"] == b * new  # EOS disabled on both sides: every row yields new_tokens
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 2**20
        assert math.isclose(r["tokens_per_s"], r["generated"] / (r["ms_per_call"] / 1e3), rel_tol=1e-6)
        assert math.isclose(r["examples_per_s"], b / (r["ms_per_call"] / 1e3), rel_tol=1e-6)
    # ragged prompts, left padding, fp32 on CPU: 4-bit and dense merged decode the same model as HF
    for impl in ("ours", "ours+dense"):
        for b in (1, 4):
            agree = data["agreement"][f"{impl} batch {b}"]
            assert agree["rows"] == b and agree["first_token_equal"] == b
            assert agree["rows_identical"] >= b - 1, agree
    assert math.isclose(data["ratios"]["ours batch 4"],
                        by[("ours", 4)]["tokens_per_s"] / by[("hf", 4)]["tokens_per_s"])
    # the batch-1 target gets its PASS/FAIL line (the batch-16 one is not measured here)
    assert "target batch 1 new tokens/s >= 20x hf" in stdout
    assert data["targets"]["speed_batch_1"]["want"] == 20


def test_random_checkpoint_is_written_once_and_reused(tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train as bt
    import torch

    cfg = bt.model_config("tiny", 1, torch.float32)
    folder = bt.checkpoint_once(cfg, tmp_path / "ck", torch.device("cpu"), torch.float32)
    index = folder / "model.safetensors.index.json"
    first = index.stat().st_mtime_ns
    assert "wrote random weights" in capsys.readouterr().out
    assert bt.checkpoint_once(cfg, folder, torch.device("cpu"), torch.float32) == folder
    assert "reusing the random checkpoint" in capsys.readouterr().out and index.stat().st_mtime_ns == first
    import llama

    assert llama.from_pretrained(folder).config.num_hidden_layers == 1  # a loadable HF checkpoint
    other = bt.model_config("tiny", 2, torch.float32)
    try:
        bt.checkpoint_once(other, folder, torch.device("cpu"), torch.float32)
    except SystemExit as e:
        assert "holds another model" in str(e) and "num_hidden_layers" in str(e)
    else:
        raise AssertionError("a folder with another shape was reused")
