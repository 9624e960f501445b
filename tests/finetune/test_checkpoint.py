"""finetune.run.checkpoint: atomic saves, the latest complete checkpoint, rotation, trainer state, run
dirs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.errors import UserError
from finetune.run import checkpoint as ckpt


def _write(files: dict[str, bytes]):
    def write(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        ckpt.save_trainer_state(tmp / ckpt.STATE_FILE, {"step": 0})
    return write


def test_save_is_atomic_and_latest_points_to_it(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 5, _write({"a.bin": b"x" * 10}),
                                info={"eval_loss": 1.5, "loss": 2.0})
    assert path == tmp_path / "checkpoints" / "step-5" and (path / "a.bin").read_bytes() == b"x" * 10
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-5"
    info = ckpt.latest_checkpoint(tmp_path)
    assert (info.step, info.eval_loss, info.loss) == (5, 1.5, 2.0)

    def failing(tmp: Path) -> None:  # an exception (or a crash) while writing step 10
        (tmp / "a.bin").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(ckpt.SaveFailed, match=r"step-10: disk full; free space or fix the disk \(the partial "
                       r"files were removed, checkpoints/latest is unchanged\); the last complete checkpoint "
                       r"is .*step-5; then continue with --resume"):
        ckpt.save_checkpoint(tmp_path, 10, failing)
    assert not (tmp_path / "checkpoints" / "step-10").exists()
    assert ckpt.latest_checkpoint(tmp_path).step == 5
    assert ckpt.clean_temp(tmp_path) == []  # the failed save removed its temporary dir itself
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-5"]


def test_sigkill_inside_save_leaves_previous_checkpoint(tmp_path):
    """A real SIGKILL at the fault point (files half written, before the rename)."""
    ckpt.save_checkpoint(tmp_path, 1, _write({"w": b"old"}))
    code = ("import sys; from pathlib import Path; from finetune.run import checkpoint as c; "
            "c.save_checkpoint(Path(sys.argv[1]), 2, lambda t: (t / 'w').write_bytes(b'new' * 1000))")
    env = dict(os.environ, FINETUNE_FAULT="save:2", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[0].startswith(".tmp-step-2.") and names[1:] == ["latest", "step-1"]
    assert ckpt.latest_checkpoint(tmp_path).step == 1
    assert (tmp_path / "checkpoints" / "step-1" / "w").read_bytes() == b"old"


def test_latest_pointer_lagging_or_broken_falls_back_to_newest_complete(tmp_path):
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, step, _write({}))
    pointer = tmp_path / "checkpoints" / "latest"
    pointer.write_text("step-2\n")  # as if killed between the rename of step-4 and the pointer update
    assert ckpt.latest_checkpoint(tmp_path).step == 4
    pointer.write_text("step-99\n")
    assert ckpt.latest_checkpoint(tmp_path).step == 4
    (tmp_path / "checkpoints" / "step-6").mkdir()  # not complete (no info / state file): ignored
    assert ckpt.latest_checkpoint(tmp_path).step == 4


def test_rotation_keeps_last_k_and_best(tmp_path):
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: 2.5}
    for step, loss in losses.items():
        ckpt.save_checkpoint(tmp_path, step, _write({}), info={"eval_loss": loss})
        ckpt.rotate(tmp_path, keep_last=2)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [2, 4, 5]
    assert ckpt.best_checkpoint(tmp_path).step == 2
    assert ckpt.rotate(tmp_path, keep_last=None) == []


def test_resaving_a_step_replaces_it(tmp_path):
    ckpt.save_checkpoint(tmp_path, 3, _write({"w": b"a"}))
    ckpt.save_checkpoint(tmp_path, 3, _write({"w": b"b"}))
    assert (tmp_path / "checkpoints" / "step-3" / "w").read_bytes() == b"b"
    assert ckpt.clean_temp(tmp_path) == []


def test_trainer_state_round_trip_restores_every_rng(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    state = {"step": 7, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": [ckpt.rng_state()], "metrics": [{"step": 1, "loss": 2.5}], "elapsed": 1.25}
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    ckpt.save_trainer_state(tmp_path / "s.pt", state)
    loaded = ckpt.load_trainer_state(tmp_path / "s.pt")  # weights_only=True
    ckpt.set_rng_state(loaded["rng"][0])
    assert random.random() == expected[0] and float(np.random.rand()) == expected[1]
    assert torch.equal(torch.rand(3), expected[2])
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert loaded["metrics"] == state["metrics"] and loaded["step"] == 7


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_trainer_state_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "trainer_state.pt"
    torch.save({"step": 1, "x": _Evil()}, path)  # a full pickle would run os.system on load
    with pytest.raises(UserError, match="cannot read the trainer state"):
        ckpt.load_trainer_state(path)


def test_plan_run_dir_never_clobbers(tmp_path):
    run = tmp_path / "run"
    assert ckpt.plan_run_dir(run, False) is None  # nothing there: fresh
    run.mkdir()
    assert ckpt.plan_run_dir(run, False) is None  # empty: fresh
    assert ckpt.plan_run_dir(run, "auto") is None
    with pytest.raises(UserError, match="no complete checkpoint"):
        ckpt.plan_run_dir(run, True)
    ckpt.save_checkpoint(run, 4, _write({}))
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        ckpt.plan_run_dir(run, False)
    assert ckpt.plan_run_dir(run, True).step == 4
    assert ckpt.plan_run_dir(run, "auto").step == 4
    other = tmp_path / "done"
    (other / "final").mkdir(parents=True)
    with pytest.raises(UserError, match="finished run"):
        ckpt.plan_run_dir(other, "auto")


def test_failed_first_save_says_to_run_again_not_to_resume(tmp_path):
    def failing(tmp: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(ckpt.SaveFailed, match=r"the disk is full .*there is no complete checkpoint yet; then "
                       r"run the same command again \(the run restarts from step 0\)"):
        ckpt.save_checkpoint(tmp_path, 1, failing)
    assert list((tmp_path / "checkpoints").iterdir()) == []
