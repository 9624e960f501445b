"""Crash-safe checkpoints of a run: write atomically, find the latest complete one, rotate old ones.

Layout under ``<output_dir>/checkpoints/``::

    step-N/                       one complete checkpoint (a PEFT adapter or model.safetensors,
                                  trainer_state.pt, checkpoint.json)
    latest                        text file naming the newest complete checkpoint ("step-N")
    .tmp-step-N.<pid>/            a checkpoint being written (never read; removed on the next start)

Atomicity: everything is written into a temporary directory next to its final place, every file and
the directory are fsync'ed, and only then is the directory renamed to ``step-N`` (``os.rename`` of a
directory within one filesystem is atomic on POSIX). A process killed at any moment therefore leaves
either no ``step-N`` or a complete one. ``latest`` is a hint written the same way (temp file + fsync +
``os.replace``); if it names a missing directory, the highest complete ``step-N`` wins.

Trainer state (optimizer, scheduler, scaler, RNG states, data position, metrics history) is stored
with ``torch.save`` and read with ``torch.load(weights_only=True)``: the file only holds tensors and
plain Python containers, so the restricted unpickler suffices and a tampered file cannot run code.
(Model weights never travel through pickle at all: they are safetensors.)

Also here: the run-directory policy (``plan_run_dir``: never clobber a run unless resuming) and the
weights a checkpoint holds (``save_weights``/``load_weights``: a PEFT adapter, or ``model.safetensors``
for full training; ``write_final``: ``<output_dir>/final``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from finetune.config import RunConfig

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"
INFO_FILE = "checkpoint.json"
_STEP_DIR = re.compile(r"step-(\d+)")
_TMP_PREFIX = ".tmp-"

# Test hook (documented, deterministic): FINETUNE_FAULT="<point>:<step>" SIGKILLs this process when
# `fault_point(point, step)` is reached, e.g. "save:4" halfway through writing checkpoint step-4, or
# "step:5" right after optimizer step 5. Real crashes are what the resume tests must survive; killing
# at a chosen point makes them reproducible.
FAULT_ENV = "FINETUNE_FAULT"


def fault_point(point: str, step: int) -> None:
    """SIGKILL ourselves if ``$FINETUNE_FAULT == f"{point}:{step}"`` (test hook; no-op otherwise)."""
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class CheckpointInfo:
    """What ``checkpoint.json`` says about one checkpoint (read without unpickling anything)."""

    step: int
    path: Path
    eval_loss: float | None = None
    loss: float | None = None


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory (so their entries are durable too)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file in the same directory + fsync + ``os.replace``: readers see the old or the new text."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def save_checkpoint(output_dir: str | os.PathLike, step: int, write: Callable[[Path], None],
                    info: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step-<step>`` atomically; ``write(tmp_dir)`` puts the files in.

    Returns the final directory. An existing ``step-<step>`` (e.g. re-saving the same step after a
    resume) is replaced only once the new one is complete.
    """
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f"{_TMP_PREFIX}step-{step}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    fault_point("save", step)  # the test hook: killed here, the temp dir is half written
    (tmp / INFO_FILE).write_text(json.dumps({"step": step, **(info or {})}, indent=2) + "\n")
    _fsync_tree(tmp)
    if final.exists():  # rename cannot replace a non-empty directory: move the old one aside first
        old = root / f"{_TMP_PREFIX}old-step-{step}.{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_path(root)
    write_text_atomic(root / LATEST, f"{final.name}\n")
    return final


def is_complete(path: Path) -> bool:
    """A ``step-N`` dir with its info file and trainer state (the rename makes this true or absent)."""
    return (path / INFO_FILE).is_file() and (path / STATE_FILE).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first. Temp dirs and anything unreadable are ignored."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.fullmatch(path.name)
        if not m or not path.is_dir() or not is_complete(path):
            continue
        try:
            meta = json.loads((path / INFO_FILE).read_text())
        except (OSError, ValueError):
            continue
        found.append(CheckpointInfo(step=int(m.group(1)), path=path, eval_loss=meta.get("eval_loss"),
                                    loss=meta.get("loss")))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(output_dir: str | os.PathLike) -> CheckpointInfo | None:
    """The checkpoint ``latest`` names if it is complete, else the highest complete step, else None."""
    found = list_checkpoints(output_dir)
    if not found:
        return None
    pointer = checkpoints_dir(output_dir) / LATEST
    try:
        name = pointer.read_text().strip()
    except OSError:
        name = ""
    by_name = {c.path.name: c for c in found}
    # `latest` is written after the rename, so it can only lag behind (never lead) the newest step.
    newest = found[-1]
    chosen = by_name.get(name)
    return newest if chosen is None or chosen.step < newest.step else chosen


def clean_temp(output_dir: str | os.PathLike) -> list[Path]:
    """Remove leftovers of interrupted saves (``.tmp-*``); returns what was removed."""
    root = checkpoints_dir(output_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def rotate(output_dir: str | os.PathLike, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and the best one by eval loss.

    ``keep_last=None`` keeps everything. Returns the deleted directories.
    """
    found = list_checkpoints(output_dir)
    if keep_last is None or len(found) <= keep_last:
        return []
    keep = {c.step for c in found[-keep_last:]}
    scored = [c for c in found if isinstance(c.eval_loss, (int, float))]
    if scored:
        keep.add(min(scored, key=lambda c: (c.eval_loss, -c.step)).step)
    deleted = []
    for c in found:
        if c.step not in keep:
            # rename first so that a crash mid-delete never leaves a half-deleted "complete" checkpoint
            doomed = c.path.with_name(f"{_TMP_PREFIX}del-{c.path.name}.{os.getpid()}")
            os.rename(c.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            deleted.append(c.path)
    return deleted


def best_checkpoint(output_dir: str | os.PathLike) -> CheckpointInfo | None:
    scored = [c for c in list_checkpoints(output_dir) if isinstance(c.eval_loss, (int, float))]
    return min(scored, key=lambda c: (c.eval_loss, -c.step)) if scored else None


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout: torch; python/numpy for completeness).

    numpy's key array becomes a tensor so that the state loads with ``weights_only=True``.
    """
    import random

    import numpy as np

    kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Read ``trainer_state.pt`` with the restricted unpickler (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any failure here means the file is not a state we wrote
        raise UserError(f"cannot read the trainer state {path}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}; resume from another checkpoint "
                        f"or start a new train.output_dir") from None


# ---------------------------------------------------------------------------------------------------
# run directories and the weights inside checkpoints


def plan_run_dir(output_dir: Path, resume: bool | str) -> CheckpointInfo | None:
    """The checkpoint to resume from (None = fresh start); refuse to clobber an existing run."""
    latest = latest_checkpoint(output_dir)
    if resume is False:
        if output_dir.is_dir() and any(output_dir.iterdir()):
            raise UserError(f"train.output_dir {output_dir} already holds a run; pass --resume (or set "
                            "train.resume: auto) to continue it, or choose a new train.output_dir")
        return None
    if latest is not None:
        return latest
    if resume is True:
        raise UserError(f"--resume: no complete checkpoint in {output_dir / CHECKPOINTS}; drop --resume "
                        "to start a new run there")
    if (output_dir / "final").exists():  # resume: auto, a finished run without checkpoints
        raise UserError(f"train.output_dir {output_dir} holds a finished run (final/) and no checkpoint to "
                        "resume; choose a new train.output_dir")
    return None


def _state_dict_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full-training weights with HF keys; a tied head is stored once (as HF does)."""
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def save_weights(model: nn.Module, out_dir: Path, cfg: RunConfig) -> None:
    """The trainable weights: a PEFT adapter (LoRA) or model.safetensors (full training)."""
    if cfg.lora.enabled:
        import lora

        lora.save_adapter(model, out_dir, base_model_name_or_path=cfg.model.path)
    else:
        from safetensors.torch import save_file

        save_file(_state_dict_to_save(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def load_weights(model: nn.Module, ckpt_dir: Path, cfg: RunConfig) -> None:
    if cfg.lora.enabled:
        import lora

        lora.load_adapter(model, ckpt_dir)
        return
    from safetensors.torch import load_file

    sd = load_file(str(ckpt_dir / "model.safetensors"))
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt_dir} does not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); resume with the config the run was started with")


def write_final(model: nn.Module, out: Path, cfg: RunConfig) -> Path:
    """``<output_dir>/final``: the adapter (or, for full training, a loadable HF model directory)."""
    import shutil

    final = out / "final"
    tmp = out / f".tmp-final.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(model, tmp, cfg)
    if not cfg.lora.enabled:  # make final/ a model dir: config + tokenizer next to the weights
        src = Path(cfg.model.path)
        for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                     "special_tokens_map.json", "tokenizer.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    _fsync_tree(tmp)
    if final.exists():
        old = out / f".tmp-final-old.{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    return final
