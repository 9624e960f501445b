"""A full disk (or any I/O error) while saving: one `error:` line naming the last good checkpoint, exit 2,
no temporary folder left, the complete checkpoints and `latest` untouched, and `--resume` continues.

Two ways: the writer raising OSError(ENOSPC) at a chosen file (always runs), and a real full disk on a
small tmpfs mounted for the test (skipped where mounting is not allowed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_testlib import error_line, run_config, run_train, run_train_patched, write_csv, write_yaml  # noqa: E402

from finetune.run import checkpoint as ckpt  # noqa: E402


def _config(model_dir: Path, tmp: Path, out: Path) -> Path:
    cfg = run_config(model_dir, write_csv(tmp / "data.csv"), out,
                     train={"save_steps": 2, "eval_steps": 2, "save_total_limit": None})
    return write_yaml(tmp / "run.yaml", cfg)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _no_temp_left(run: Path) -> None:
    leftovers = [p for p in run.rglob(".tmp-*")]
    assert leftovers == [], leftovers


ENOSPC_AT_STEP_4_STATE = """
import errno, os
import finetune.files as files
_real = files.write_bytes_atomic
def failing(path, data, durable=True):
    if path.name == "trainer_state.pt" and path.parent.name.startswith(".tmp-step-4."):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return _real(path, data, durable)
files.write_bytes_atomic = failing
"""

ENOSPC_IN_FINAL = """
import errno, os
import lora.adapter as adapter
_real = adapter._atomic_write
def failing(path, data):
    if path.parent.name.startswith(".tmp-final."):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return _real(path, data)
adapter._atomic_write = failing
"""


def _fails_with_enospc(patch: str, model_dir: Path, tmp: Path) -> tuple[Path, Path, str]:
    """Train with `patch` applied into ``tmp/run``: exit 2 is required; (run dir, config, the error line)."""
    run = tmp / "run"
    config = _config(model_dir, tmp, run)
    proc = run_train_patched(patch, config)
    assert proc.returncode == 2, proc.stderr
    return run, config, error_line(proc.stderr)


def test_enospc_during_a_checkpoint_keeps_the_last_one_and_resumes(tiny_model_dir, tmp_path):
    run, config, line = _fails_with_enospc(ENOSPC_AT_STEP_4_STATE, tiny_model_dir, tmp_path)
    step2 = run / "checkpoints" / "step-2"
    assert f"could not save checkpoint {run / 'checkpoints' / 'step-4'}: the disk is full" in line, line
    assert "(the partial files were removed, checkpoints/latest is unchanged)" in line
    assert f"the last complete checkpoint is {step2}; then continue with --resume" in line
    _no_temp_left(run)
    assert not (run / "checkpoints" / "step-4").exists() and not (run / "final").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-2"
    before = _snapshot(step2)

    proc = run_train(config, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {step2} (step 2 of 6)" in proc.stdout
    assert _snapshot(step2) == before and (run / "final" / "adapter_model.safetensors").is_file()


def test_enospc_while_writing_final_removes_the_partial_folder(tiny_model_dir, tmp_path):
    run, config, line = _fails_with_enospc(ENOSPC_IN_FINAL, tiny_model_dir, tmp_path)
    assert f"could not write {run / 'final'}: the disk is full" in line, line
    assert f"the last complete checkpoint is {run / 'checkpoints' / 'step-6'}; then continue with " \
        "--resume to write final/ from it" in line
    _no_temp_left(run)
    assert not (run / "final").exists()
    proc = run_train(config, "--resume")  # nothing left to train: writes final/ from step-6
    assert proc.returncode == 0, proc.stderr
    assert (run / "final" / "adapter_model.safetensors").is_file()


FILL_DISK_AFTER_STEP_2 = """
import os, sys
import finetune.run.checkpoint as ckpt
_real = ckpt.fault_point
def fill(point, step):
    if (point, step) == ("step", 2):
        with open(os.environ["FILLER"], "wb") as f:
            try:
                while True:
                    f.write(b"\\0" * 65536)
                    f.flush()
            except OSError:
                pass
        try:  # the last partial chunk may still sit in the buffer: drop it rather than fail at close
            f.close()
        except OSError:
            pass
    _real(point, step)
ckpt.fault_point = fill
"""


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or proc.returncode}): the real "
                    "disk-full case is covered by the simulated ENOSPC tests")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_disk_on_a_small_tmpfs(tiny_model_dir, tmp_path, small_disk):
    run = small_disk / "run"
    config = _config(tiny_model_dir, tmp_path, run)
    filler = small_disk / "filler.bin"
    proc = run_train_patched(FILL_DISK_AFTER_STEP_2, config, FILLER=str(filler))
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    step2 = run / "checkpoints" / "step-2"
    assert "the disk is full" in line and str(step2) in line, line
    _no_temp_left(run)
    assert ckpt.latest_checkpoint(run).path == step2
    assert not (run / "final").exists()

    filler.unlink()  # free space, then continue
    proc = run_train(config, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {step2}" in proc.stdout
    shutil.rmtree(run)
