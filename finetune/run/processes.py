"""The processes of a run and what belongs to each: rank and world, seeds, stop signals, RNG, memory.

Nothing here knows the loop: ``finetune.run.loop`` asks who it is (``init_distributed``), seeds
(``seed_all``), listens for SIGINT/SIGTERM (``StopSignal``), collects every rank's RNG state for a
checkpoint (``gather_rng``) and reports peak memory (``peak_memory_bytes``).
"""

from __future__ import annotations

import os
import random
import resource
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from finetune.run import checkpoint as ckpt


@dataclass
class DistInfo:
    """Which process this is among the run's ranks (one rank, world 1, without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_spec != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        initialized_here = True
    return DistInfo(rank=rank, world=world, local_rank=local_rank, initialized_here=initialized_here)


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (LoRA's initialisation and dropout come from torch)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes the current step, saves, and exits (130/143).

    A second signal restores the previous handler and re-delivers itself (a way out of a stuck save).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step, saving a checkpoint, then "
              "exiting (send it again to abort without saving)", file=sys.stderr, flush=True)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated by tensors; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def gather_rng(dist_info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG state, on rank 0 (others get an empty list)."""
    mine = ckpt.rng_state()
    if dist_info.world == 1:
        return [mine]
    gathered: list[Any] = [None] * dist_info.world if dist_info.main else []
    dist.gather_object(mine, gathered if dist_info.main else None, dst=0)
    return gathered if dist_info.main else []
