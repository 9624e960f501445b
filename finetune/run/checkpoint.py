"""Crash-safe checkpoints of a run: write atomically, find the latest complete one, rotate old ones.

Layout under ``<output_dir>/checkpoints/``::

    step-N/                       one complete checkpoint (a PEFT adapter or model.safetensors,
                                  trainer_state.pt, checkpoint.json)
    latest                        text file naming the newest complete checkpoint ("step-N")
    .tmp-step-N.<pid>.<rand>/     a checkpoint being written (never read; removed on the next start,
                                  which holds the run lock: see finetune.run.lock)

Atomicity: everything is written into a temporary directory next to its final place, every file and
the directory are fsync'ed, and only then is the directory renamed to ``step-N`` (``os.rename`` of a
directory within one filesystem is atomic on POSIX). A process killed at any moment therefore leaves
either no ``step-N`` or a complete one. ``latest`` is a hint written the same way (temp file + fsync +
``os.replace``); if it names a missing directory, the highest complete ``step-N`` wins.

Trainer state (optimizer, scheduler, scaler, RNG states, data position, metrics history) is stored
with ``torch.save`` and read with ``torch.load(weights_only=True)``: the file only holds tensors and
plain Python containers, so the restricted unpickler suffices and a tampered file cannot run code
(on torch >= 2.6: older versions' restricted loader can be bypassed, CVE-2025-32434, so they are
refused). Model weights never travel through pickle at all: they are safetensors.

A failed save (disk full, I/O error) removes its temporary directory and raises ``SaveFailed``; the
complete checkpoints and ``latest`` are untouched. A resume takes the newest checkpoint that
*verifies* (``choose_checkpoint``: trainer state readable, adapter files whole, typed and finite) and
names each one it skips.

Also here: the run-directory policy (``plan_run_dir``: never clobber a run unless resuming) and the
weights a checkpoint holds (``save_weights``/``load_weights``: a PEFT adapter, or ``model.safetensors``
for full training; ``write_final``: ``<output_dir>/final``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

import lora
from finetune import files
from finetune.config import LoraConfig
from finetune.errors import UserError
from finetune.files import fsync_path

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"
INFO_FILE = "checkpoint.json"
_STEP_DIR = re.compile(r"step-(\d+)")
_TMP_PREFIX = files.TMP_PREFIX  # one prefix for every temporary name a run makes

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


def _replace_dir(tmp: Path, final: Path, old: Path) -> None:
    """Rename the complete ``tmp`` to ``final``. rename cannot replace a non-empty directory, so an
    existing ``final`` is moved aside to ``old`` first and removed once the new one is in place."""
    if final.exists():
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory (so their entries are durable too)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


class SaveFailed(UserError):
    """Writing a checkpoint (or ``final/``) failed: disk full, I/O error. Nothing complete was touched."""


def last_good_text(output_dir: str | os.PathLike) -> str:
    """"the last complete checkpoint is X" (or that there is none) and how to continue from there."""
    good = latest_checkpoint(output_dir)
    if good is None:
        return ("there is no complete checkpoint yet; then run the same command again (the run restarts "
                "from step 0)")
    return f"the last complete checkpoint is {good.path}; then continue with --resume"


def save_checkpoint(output_dir: str | os.PathLike, step: int, write: Callable[[Path], None], *,
                    info: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step-<step>`` atomically; ``write(tmp_dir)`` puts the files in.

    Returns the final directory. An existing ``step-<step>`` (e.g. re-saving the same step after a
    resume) is replaced only once the new one is complete. A failed write (``OSError``: disk full,
    I/O error; or torch's ``RuntimeError`` wrapping one) removes the temporary directory and raises
    ``SaveFailed`` naming the last complete checkpoint, which, like ``latest``, is left as it was.
    """
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step}"
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = files.make_temp_dir(root, f"step-{step}")
        write(tmp)
        fault_point("save", step)  # the test hook: killed here, the temp dir is half written
        files.write_text_atomic(tmp / INFO_FILE, json.dumps({"step": step, **(info or {})}, indent=2) + "\n",
                                durable=False)
        _fsync_tree(tmp)
        _replace_dir(tmp, final, root / f"{_TMP_PREFIX}old-step-{step}.{os.getpid()}")
        tmp = None
        fsync_path(root)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _is_io_error(e):
            raise
        if tmp is not None:
            files.remove_path(tmp)
        raise SaveFailed(f"could not save checkpoint {final}: {_io_reason(e)}; free space or fix the disk "
                         f"(the partial files were removed, checkpoints/latest is unchanged); "
                         f"{last_good_text(output_dir)}") from e
    try:
        files.write_text_atomic(root / LATEST, f"{final.name}\n")
    except OSError:
        pass  # `latest` is a hint: the newest complete step-N wins anyway (latest_checkpoint)
    return final


def _is_io_error(e: BaseException) -> bool:
    """torch.save reports a failed write as RuntimeError('... file write failed'), not OSError."""
    text = str(e).lower()
    return any(word in text for word in ("write failed", "no space", "i/o error", "errno"))


def _io_reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return files.describe_os_error(e)
    return "the write failed (" + " ".join(str(e).split())[:200] + ")"


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
    except (OSError, ValueError):  # missing, unreadable or not text: the newest step-N wins anyway
        name = ""
    by_name = {c.path.name: c for c in found}
    # `latest` is written after the rename, so it can only lag behind (never lead) the newest step.
    newest = found[-1]
    chosen = by_name.get(name)
    return newest if chosen is None or chosen.step < newest.step else chosen


def clean_temp(output_dir: str | os.PathLike) -> list[Path]:
    """Remove leftovers of interrupted saves (``.tmp-*`` in the run dir and its checkpoints/); returns
    what was removed. Only safe under the run lock: another live run's temp dirs look the same."""
    removed = []
    for root in (checkpoints_dir(output_dir), Path(output_dir)):
        if not root.is_dir():
            continue
        for path in root.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                files.remove_path(path)  # a symlink is unlinked, never followed
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
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` into memory, then our exclusive-temp-file writer: a full disk is a plain OSError
    (torch's own file writer reports it as an opaque RuntimeError) and nothing half-written remains."""
    buf = io.BytesIO()
    torch.save(state, buf)
    files.write_bytes_atomic(path, buf.getvalue(), durable=False)  # the checkpoint dir is fsync'ed whole


# weights_only=True is a real sandbox only from torch 2.6 on (CVE-2025-32434 bypasses it before).
MIN_SAFE_TORCH = (2, 6)


def _torch_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Read ``trainer_state.pt`` with the restricted unpickler (tensors and plain containers only).

    Refuses to unpickle at all on torch < 2.6, whose ``weights_only`` loader can be made to run code.
    """
    if _torch_version() < MIN_SAFE_TORCH:
        raise UserError(f"torch {torch.__version__} cannot read {path} safely: its weights_only loader "
                        f"can be bypassed (CVE-2025-32434); upgrade to torch >= 2.6")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text goes on to suggest weights_only=False: never repeat that for a file we read
        raise UserError(f"cannot read the trainer state {path}: it holds objects other than tensors and "
                        f"plain containers, so this tool did not write it (or it was tampered with); "
                        f"it is never unpickled in full") from None
    except Exception as e:  # noqa: BLE001 -- any other failure means the file is truncated or corrupt
        # torch's load errors may advise weights_only=False; that advice is never passed on
        first = "" if "weights_only" in str(e) else (str(e).splitlines() or [""])[0][:160]
        raise UserError(f"cannot read the trainer state {path}: it is truncated or corrupt "
                        f"({type(e).__name__}: {first})") from None


STATE_KEYS = ("step", "optimizer", "scheduler", "rng", "metrics", "elapsed")


def verify_checkpoint(c: CheckpointInfo, lora_cfg: LoraConfig) -> dict[str, Any]:
    """Read everything a resume needs from checkpoint ``c`` without touching a model; its trainer state.

    Raises ``UserError`` naming the file when a file is missing, truncated, corrupt or of the wrong
    kind (a checkpoint that does not verify is skipped by ``choose_checkpoint``).
    """
    state = load_trainer_state(c.path / STATE_FILE)
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"the trainer state {c.path / STATE_FILE} lacks {', '.join(missing)}")
    if state["step"] != c.step:
        raise UserError(f"the trainer state {c.path / STATE_FILE} is for step {state['step']}, not {c.step}")
    if lora_cfg.enabled:
        lora.read_adapter(c.path)  # config types, tensor dtypes, truncation, NaN/inf
    else:
        read_safetensors(c.path / "model.safetensors")
    return state


def choose_checkpoint(output_dir: str | os.PathLike, lora_cfg: LoraConfig, *,
                      warn: Callable[[str], None]) -> tuple[CheckpointInfo, dict[str, Any]]:
    """The newest checkpoint that verifies, and its trainer state; skipped ones are named via ``warn``.

    ``latest`` is tried first (it may only lag behind the newest step-N), then every other complete
    checkpoint from the newest down. None verifying is a ``UserError`` listing why.
    """
    found = list_checkpoints(output_dir)
    root = checkpoints_dir(output_dir)
    known = {c.path.name for c in found}
    for path in sorted(root.iterdir()) if root.is_dir() else []:  # our rename never leaves these
        if _STEP_DIR.fullmatch(path.name) and path.name not in known:
            warn(f"skipping checkpoint {path}: it is incomplete or its {INFO_FILE} is unreadable")
    first = latest_checkpoint(output_dir)
    order = ([first] if first else []) + [c for c in reversed(found) if first is None or c.step != first.step]
    problems = []
    for c in order:
        try:
            state = verify_checkpoint(c, lora_cfg)
        except (UserError, ValueError) as e:
            problems.append(f"{c.path.name}: {e}")
            warn(f"skipping checkpoint {c.path}: it does not verify ({e})")
            continue
        return c, state
    raise UserError(f"no checkpoint in {checkpoints_dir(output_dir)} verifies ({'; '.join(problems)}); "
                    "start a new train.output_dir (the files there are left as they are)")


def check_resume_config(c: CheckpointInfo, lora_cfg: LoraConfig, output_dir: str | os.PathLike) -> None:
    """The LoRA shape settings of ``lora_cfg`` must be the checkpoint's (read from its adapter_config.json,
    before any model is loaded): a changed ``lora.r`` cannot continue a run, it starts another one.
    ``output_dir`` is the run's folder, named in the message (its config.yaml has the original settings)."""
    if not lora_cfg.enabled:
        return
    saved = lora.read_adapter_config(c.path)
    pairs = {"lora.r": (saved["r"], lora_cfg.r), "lora.alpha": (saved["lora_alpha"], lora_cfg.alpha),
             "lora.use_rslora": (bool(saved.get("use_rslora", False)), lora_cfg.use_rslora)}
    changed = [f"{key} {now} (the checkpoint has {was})" for key, (was, now) in pairs.items()
               if float(was) != float(now)]
    if changed:
        started = Path(output_dir) / "config.yaml"
        raise UserError(f"cannot resume from {c.path}: this config sets {', '.join(changed)}; resume with "
                        f"the settings the run was started with ({started}) or choose a new train.output_dir")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or one ``UserError`` line (missing, truncated, not safetensors)."""
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not a dict
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error type for a damaged file
        raise UserError(f"{path} is truncated or not a safetensors file ({' '.join(str(e).split())[:160]})"
                        ) from None


# ---------------------------------------------------------------------------------------------------
# run directories and the weights inside checkpoints


# What a run writes before its first checkpoint: a folder holding only these never saved anything that
# a restart could lose (its metrics.jsonl is the log of steps no checkpoint kept). eval.py's folders
# may sit beside them (a --baseline score); a restart never touches those.
RUN_LEFTOVERS = {"config.yaml", "metrics.jsonl", "plots", "tensorboard", ".lock", CHECKPOINTS, "eval",
                 "eval-baseline"}


def is_restartable(output_dir: Path) -> bool:
    """True when ``output_dir`` holds only the leftovers of a run that died before its first checkpoint."""
    if list_checkpoints(output_dir) or (output_dir / "final").exists():
        return False
    entries = {p.name for p in output_dir.iterdir()}
    if not all(n in RUN_LEFTOVERS or n.startswith(_TMP_PREFIX) for n in entries):
        return False
    root = checkpoints_dir(output_dir)
    return not root.is_dir() or all(p.name == LATEST or p.name.startswith(_TMP_PREFIX) or
                                    (_STEP_DIR.fullmatch(p.name) and p.is_dir() and not any(p.iterdir()))
                                    for p in root.iterdir())


def plan_run_dir(output_dir: Path, resume: bool | str) -> CheckpointInfo | None:
    """The checkpoint to resume from (None = start at step 0); refuse to clobber an existing run.

    A folder left by a run that died before its first checkpoint (divergence, OOM, SIGKILL, a second
    Ctrl-C) restarts without any flag: it holds nothing a restart could lose. ``--resume`` there says
    that there is nothing to resume.
    """
    latest = latest_checkpoint(output_dir)
    if resume is False:
        if output_dir.is_dir() and any(output_dir.iterdir()) and not is_restartable(output_dir):
            raise UserError(f"train.output_dir {output_dir} already holds a run; pass --resume (or set "
                            "train.resume: auto) to continue it, or choose a new train.output_dir")
        return None
    if latest is not None:
        return latest
    if resume is True:
        started = output_dir.is_dir() and any(output_dir.iterdir())
        why = " (the run there stopped before its first checkpoint)" if started else ""
        raise UserError(f"--resume: no complete checkpoint in {output_dir / CHECKPOINTS}{why}; drop --resume "
                        "to start the run there from step 0")
    if (output_dir / "final").exists():  # resume: auto, a finished run without checkpoints
        raise UserError(f"train.output_dir {output_dir} holds a finished run (final/) and no checkpoint to "
                        "resume; choose a new train.output_dir")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not is_restartable(output_dir):
        raise UserError(f"train.output_dir {output_dir} holds files that are not a run's; choose a new "
                        "train.output_dir")
    return None


def _state_dict_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full-training weights with HF keys; a tied head is stored once (as HF does)."""
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state_dict.pop("lm_head.weight", None)
    return state_dict


def save_weights(model: nn.Module, out_dir: Path, *, lora_cfg: LoraConfig, model_path: str) -> None:
    """The trainable weights: a PEFT adapter (LoRA, naming ``model_path`` as its base) or
    model.safetensors (full training)."""
    if lora_cfg.enabled:
        lora.save_adapter(model, out_dir, base_model_name_or_path=model_path)
    else:
        # bytes, not a file: our writer reports ENOSPC
        data = safetensors_bytes(_state_dict_to_save(model), metadata={"format": "pt"})
        files.write_bytes_atomic(out_dir / "model.safetensors", data, durable=False)


def load_weights(model: nn.Module, ckpt_dir: Path, lora_cfg: LoraConfig) -> None:
    """A checkpoint's trainable weights into ``model``: its adapter, or its whole model.safetensors."""
    if lora_cfg.enabled:
        lora.load_adapter(model, ckpt_dir)
        return
    state_dict = read_safetensors(ckpt_dir / "model.safetensors")
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt_dir} does not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); resume with the config the run was started with")


def write_final(model: nn.Module, out: Path, *, lora_cfg: LoraConfig, model_path: str) -> Path:
    """``<output_dir>/final``: the adapter (or, for full training, a loadable HF model directory).

    Written into an exclusive temporary folder and renamed; a failed write removes that folder and
    raises ``SaveFailed`` (the checkpoints, including the one just saved, are untouched).
    """
    final = out / "final"
    tmp: Path | None = None
    try:
        tmp = files.make_temp_dir(out, "final")
        save_weights(model, tmp, lora_cfg=lora_cfg, model_path=model_path)
        if not lora_cfg.enabled:  # make final/ a model dir: config + tokenizer next to the weights
            src = Path(model_path)
            for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                         "special_tokens_map.json", "tokenizer.json"):
                if (src / name).is_file():
                    files.write_bytes_atomic(tmp / name, (src / name).read_bytes(), durable=False)
        _fsync_tree(tmp)
        _replace_dir(tmp, final, out / f"{_TMP_PREFIX}final-old.{os.getpid()}")
        tmp = None
    except OSError as e:
        if tmp is not None:
            files.remove_path(tmp)
        raise SaveFailed(f"could not write {final}: {files.describe_os_error(e)}; free space (the partial "
                         f"folder was removed); {last_good_text(out)} to write final/ from it") from e
    return final
