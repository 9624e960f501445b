"""DistributedDataParallel on CPU: `torchrun --nproc_per_node 2 train.py` (gloo) == one process with the
same global batch (2 ranks x accumulation 1 vs 1 rank x accumulation 2, micro-batch 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_testlib import (  # noqa: E402
    REPO,
    adapter,
    cli_env,
    metrics,
    run_config,
    train_losses,
    write_csv,
    write_yaml,
)

from finetune.config import config_from_dict  # noqa: E402
from finetune.run import checkpoint as ckpt  # noqa: E402
from finetune.run.loop import train  # noqa: E402


def test_two_gloo_ranks_match_one_process(tiny_model_dir, tmp_path):
    data = write_csv(tmp_path / "data.csv")
    # dropout 0: with dropout the two set-ups would draw different masks (by design: one RNG per rank)
    two = write_yaml(tmp_path / "two.yaml", run_config(tiny_model_dir, data, tmp_path / "two", lora={
        "dropout": 0.0}, train={"gradient_accumulation_steps": 1}))
    one = config_from_dict(run_config(tiny_model_dir, data, tmp_path / "one", lora={"dropout": 0.0},
                                      train={"gradient_accumulation_steps": 2}))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*launcher, str(REPO / "train.py"), str(two), "--no-progress"],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plan: 6 optimizer steps of 4 examples (2 rank(s) x 2 x 1 accumulation)" in proc.stdout
    assert proc.stdout.count("saved ") == 2  # rank 0 alone saves (steps 3 and 6) and logs
    train(one, progress=False)  # in this process: WORLD_SIZE unset, no process group

    a, b = adapter(tmp_path / "one" / "final"), adapter(tmp_path / "two" / "final")
    assert a.keys() == b.keys()
    for key in a:
        err = ((a[key] - b[key]).abs().max() / a[key].abs().max()).item()
        assert err <= 1e-5, (key, err)
    assert any(not torch.equal(a[k], adapter(tmp_path / "one" / "checkpoints" / "step-3")[k]) for k in a)
    pairs = zip(train_losses(tmp_path / "one"), train_losses(tmp_path / "two"), strict=True)
    for (s1, l1), (s2, l2) in pairs:
        assert s1 == s2 and abs(l1 - l2) <= 1e-5 * abs(l1)
    ev1 = [r["eval_loss"] for r in metrics(tmp_path / "one") if "eval_loss" in r]
    ev2 = [r["eval_loss"] for r in metrics(tmp_path / "two") if "eval_loss" in r]
    assert len(ev1) == len(ev2) == 2 and all(abs(x - y) <= 1e-5 * x for x, y in zip(ev1, ev2))
    # rank 0's checkpoint holds both ranks' RNG states (so a 2-rank resume restores each one)
    state = ckpt.load_trainer_state(tmp_path / "two" / "checkpoints" / "step-6" / ckpt.STATE_FILE)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
