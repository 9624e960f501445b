"""What a run logs: one step's outcome, the sums since the last log line, and where entries go.

``StepOutcome`` is what one optimizer step reports (one host copy), ``LogWindow`` adds outcomes up
between log lines (time spent evaluating and saving excluded), ``MetricsSink`` writes each entry to
the history kept in checkpoints, to metrics.jsonl and, when installed, to TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune import files
from finetune.errors import UserError
from finetune.run import checkpoint as ckpt
from finetune.run.processes import peak_memory_bytes

METRICS_FILE = "metrics.jsonl"


class MetricsSink:
    """Where logged entries go: ``history`` (saved in every checkpoint), metrics.jsonl, TensorBoard.

    On rank 0 metrics.jsonl is first rewritten to the history being continued (lines logged after
    the checkpoint a run resumes from are dropped), and TensorBoard purges the steps after it.
    Other ranks keep the history only.
    """

    def __init__(self, out: Path, *, main: bool, history: list[dict[str, Any]], step: int) -> None:
        self.path, self.main, self.history, self.writer = out / METRICS_FILE, main, history, None
        if not main:
            return
        files.guarded(lambda: files.write_text_atomic(self.path, "".join(map(_json_line, history))),
                      f"write {self.path}", "free space or fix the folder's permissions")
        try:
            # lazy: tensorboard is optional, and importing it costs seconds that a run without it saves
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=step or None)
        except ImportError:
            pass

    def record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        if not self.main:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(_json_line(entry))
        except OSError as e:
            raise UserError(f"could not append to {self.path}: {files.describe_os_error(e)}; free space; "
                            f"{ckpt.last_good_text(self.path.parent)}") from None
        if self.writer is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, entry["step"])

    def __enter__(self) -> MetricsSink:
        return self

    def __exit__(self, *exc: object) -> None:  # also on a crash: TensorBoard keeps what was logged
        if self.writer is not None:
            self.writer.close()


@dataclass
class StepOutcome:
    """What one optimizer step reports to the host (read in its single device-to-host copy)."""

    loss_sum: float      # summed CE over the window's target tokens, all ranks
    target_tokens: int
    tokens: int          # real (unpadded) tokens of the window, all ranks
    grad_norm: float     # before clipping
    lr: float            # the lr the step used
    stopping: bool       # a rank got SIGINT/SIGTERM: every rank saves and stops after this step

    @property
    def loss(self) -> float:
        """This step's token-weighted loss."""
        return self.loss_sum / max(self.target_tokens, 1)


@dataclass
class LogWindow:
    """Sums over the steps since the last log line; time spent evaluating and saving is not counted."""

    loss_sum: float = 0.0
    targets: int = 0
    tokens: int = 0
    norms: list[float] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    pause: float = 0.0

    def add(self, outcome: StepOutcome) -> None:
        self.loss_sum += outcome.loss_sum
        self.targets += outcome.target_tokens
        self.tokens += outcome.tokens
        self.norms.append(outcome.grad_norm)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.pause += time.perf_counter() - start

    def entry(self, step: int, *, lr: float, device: torch.device, steps_per_epoch: int,
              elapsed: float) -> dict[str, Any]:
        """The log line of the steps since the window opened; waits for the device so the time is true."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = max(time.perf_counter() - self.t0 - self.pause, 1e-9)
        return {"step": step, "epoch": round(step / steps_per_epoch, 4),
                "loss": self.loss_sum / max(self.targets, 1), "lr": lr,
                "grad_norm": sum(self.norms) / len(self.norms), "tokens_per_s": self.tokens / seconds,
                "target_tokens": self.targets, "peak_mem_bytes": peak_memory_bytes(device),
                "elapsed": round(elapsed, 3)}


def _json_line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, allow_nan=True) + "\n"
