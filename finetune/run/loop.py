"""The training loop: set a run up, take optimizer steps, log, evaluate, save, resume, stop cleanly.

One optimizer step (``step`` counts completed steps)::

    micro-batches of the window (finetune.data.plan) ─► forward + chunked CE + backward, token-weighted
    (finetune.run.loss.window_backward) ─► clip (report the pre-clip norm) ─► one host sync ─► AdamW
    ─► LR schedule (finetune.run.optim) ─► log / eval / save

``_train`` reads as that story: ``_setup`` (data, plan, model, optimizer, precision, DDP), ``_restore``
(a checkpoint's weights, optimizer, schedule, RNG), ``_open_run_dir``, then the loop over
``_optimizer_step`` with a ``LogWindow`` for the averages, a ``MetricsSink`` for metrics.jsonl and
TensorBoard, ``_save`` for checkpoints and ``_finish`` for ``final/`` and the loss plot.

Determinism (resume equivalence): the data order is a function of (train.seed, epoch) and the step
only, and the RNG states (dropout) are saved per rank in every checkpoint and restored, so a resumed
run continues bit-identically on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import resource
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from finetune import files, preflight
from finetune.config import RunConfig, save_config
from finetune.data.plan import DataPlan, make_plan
from finetune.data.rows import PreparedData, collate, padding_id, prepare
from finetune.errors import UserError
from finetune.run import checkpoint as ckpt
from finetune.run.lock import RunLock
from finetune.run.loss import eval_loss, window_backward
from finetune.run.optim import Precision, lr_factor, make_optimizer, make_precision

METRICS_FILE = "metrics.jsonl"
Say = Callable[[str], None]


class Interrupted(KeyboardInterrupt):
    """SIGINT outside the save-and-exit path; ``str()`` says what was kept and how to continue."""


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN/inf; the run stopped without applying that update."""


# ---------------------------------------------------------------------------------------------------
# processes, signals, results


@dataclass
class DistInfo:
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
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_spec != "cpu"
    if cuda:
        torch.cuda.set_device(local)
    here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        here = True
    return DistInfo(rank, world, local, here)


def seed_all(seed: int) -> None:
    import random

    import numpy as np

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


@dataclass
class TrainResult:
    step: int
    total_steps: int
    output_dir: Path
    final_dir: Path | None = None
    interrupted: int | None = None  # the signal number when stopped by SIGINT/SIGTERM
    last_loss: float | None = None
    eval_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# what a run holds, and how it is set up


@dataclass
class _Run:
    """Everything the steps of one run use; built by ``_setup`` before step 0 (or the resumed step)."""

    cfg: RunConfig
    di: DistInfo
    out: Path
    say: Say
    data: PreparedData
    pad_id: int
    plan: DataPlan
    model: nn.Module
    device: torch.device
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    prec: Precision
    forward: Callable[..., torch.Tensor]  # the model, or its DDP wrapper
    ddp: Any = None


def _prepare_data(cfg: RunConfig, di: DistInfo, say: Say) -> tuple[PreparedData, int, DataPlan]:
    """Tokenizer, examples and the data plan: a bad file or a too-small split fails in seconds, not
    after loading 7B weights."""
    import llama

    preflight.check_max_length(cfg.data.max_length, cfg.model.path)
    preflight.check_model_weights(cfg.model.path)
    tok = llama.Tokenizer.from_pretrained(cfg.model.path)
    data = prepare(cfg.data, tok)
    say(data.stats.summary())
    preflight.check_token_ids(data.train + data.test, cfg.model.path, cfg.data.path)
    tc = cfg.train
    plan = make_plan(tc, len(data.train), di.world, [len(e.input_ids) for e in data.train])
    say(f"plan: {plan.total_steps} optimizer steps of {plan.global_batch} examples ({di.world} rank(s) x "
        f"{plan.micro_batch_size} x {plan.accumulation} accumulation); {plan.steps_per_epoch} steps per "
        f"epoch of {plan.n_examples} examples; {plan.padding_fraction():.1%} of batch tokens are padding"
        + (" (grouped by length)" if tc.group_by_length else ""))
    return data, padding_id(tok), plan


def _setup(cfg: RunConfig, di: DistInfo, out: Path, say: Say, data: PreparedData, pad_id: int,
           plan: DataPlan) -> _Run:
    """The model (seeded, so LoRA's initialisation is the seed's), optimizer, schedule, precision, DDP."""
    from finetune.modeling import load_model

    tc = cfg.train
    run_cfg = cfg
    if di.world > 1 and torch.cuda.is_available() and cfg.model.device != "cpu":
        run_cfg = copy.deepcopy(cfg)
        run_cfg.model.device = f"cuda:{di.local_rank}"
    seed_all(tc.seed)
    model = load_model(run_cfg, for_training=True, log=say)
    device = next(model.parameters()).device
    if tc.compile:
        from finetune.compiling import compile_decoder_layers

        if compile_decoder_layers(model, device):
            say("compile: each decoder layer is compiled with torch.compile (the first steps compile)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tc, device)
    total = plan.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, tc.warmup_steps, tc.scheduler))
    prec = make_precision(tc, cfg.model.dtype, device)
    say(f"precision: {prec.label}; optimizer {tc.optimizer}; schedule {tc.scheduler} (warmup "
        f"{tc.warmup_steps}); peak lr {tc.lr:g}")
    forward, ddp = _wrap_ddp(model, di, device, tc.seed)
    return _Run(cfg, di, out, say, data, pad_id, plan, model, device, params, optimizer, scheduler, prec,
                forward, ddp)


def _wrap_ddp(model: nn.Module, di: DistInfo, device: torch.device, seed: int) -> tuple[Callable, Any]:
    """(forward, ddp): the model itself on one rank; a DDP wrapper over the trainable parameters only."""
    if di.world == 1:
        return model, None
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]  # RoPE tables: computed identically on every rank
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)  # frozen base: no broadcast/sync
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              find_unused_parameters=False)
    torch.manual_seed(seed + di.rank)  # different dropout masks per rank
    return ddp, ddp


@dataclass
class _Resumed:
    """Where a run continues: step 0 with nothing behind it, or a checkpoint's step, log and time."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0


def _restore(run: _Run, checkpoint: ckpt.CheckpointInfo, state: dict[str, Any]) -> _Resumed:
    """Load a verified checkpoint into the run: weights, optimizer, schedule, scaler, RNG states."""
    try:
        ckpt.load_weights(run.model, checkpoint.path, run.cfg)
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.prec.scaler.is_enabled() and state.get("scaler"):
            run.prec.scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, RuntimeError) as e:  # nothing has been written yet
        raise UserError(f"cannot resume from {checkpoint.path} with this config: "
                        f"{' '.join(str(e).split())[:300]}; resume with the settings the run was "
                        f"started with ({run.out / 'config.yaml'}) or choose a new train.output_dir"
                        ) from None
    resumed = _Resumed(int(state["step"]), list(state["metrics"]), float(state["elapsed"]))
    di, rngs = run.di, state["rng"]
    if len(rngs) == di.world:
        ckpt.set_rng_state(rngs[di.rank])
    else:
        warnings.warn(f"the checkpoint was written by {len(rngs)} rank(s), this run has {di.world}: "
                      "dropout RNG is re-seeded, data order continues", stacklevel=2)
        torch.manual_seed(run.cfg.train.seed + di.rank + resumed.step)
    if state.get("global_batch") != run.plan.global_batch:
        warnings.warn(f"the global batch changed ({state.get('global_batch')} -> {run.plan.global_batch}): "
                      "the data order after resuming differs from the original run", stacklevel=2)
    run.say(f"resumed from {checkpoint.path} (step {resumed.step} of {run.plan.total_steps})")
    return resumed


def _open_run_dir(run: _Run, resuming: bool, restarting: bool) -> None:
    """Rank 0 touches the run folder only now: a failed start leaves nothing that blocks a retry."""
    out, cfg, say = run.out, run.cfg, run.say
    out.mkdir(parents=True, exist_ok=True)
    for path in ckpt.clean_temp(out):
        say(f"removed the leftovers of an interrupted save: {path.name}")
    if resuming:
        _warn_config_changes(out / "config.yaml", cfg)
    elif restarting:
        say(f"starting {out} over from step 0: the run there stopped before its first checkpoint")
    files.guarded(lambda: save_config(cfg, out / "config.yaml"), f"write {out / 'config.yaml'}",
                  "free space or fix the folder's permissions")


# ---------------------------------------------------------------------------------------------------
# logging


class MetricsSink:
    """Where logged entries go: ``history`` (saved in every checkpoint), metrics.jsonl, TensorBoard.

    On rank 0 metrics.jsonl is first rewritten to the history being continued (lines logged after
    the checkpoint a run resumes from are dropped), and TensorBoard purges the steps after it.
    Other ranks keep the history only.
    """

    def __init__(self, out: Path, main: bool, history: list[dict[str, Any]], step: int) -> None:
        self.path, self.main, self.history, self.writer = out / METRICS_FILE, main, history, None
        if not main:
            return
        files.guarded(lambda: files.write_text_atomic(self.path, "".join(map(_json_line, history))),
                      f"write {self.path}", "free space or fix the folder's permissions")
        try:
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

    def add(self, s: StepOutcome) -> None:
        self.loss_sum += s.loss_sum
        self.targets += s.target_tokens
        self.tokens += s.tokens
        self.norms.append(s.grad_norm)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.pause += time.perf_counter() - start

    def entry(self, step: int, lr: float, run: _Run, elapsed: float) -> dict[str, Any]:
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        seconds = max(time.perf_counter() - self.t0 - self.pause, 1e-9)
        return {"step": step, "epoch": round(step / run.plan.steps_per_epoch, 4),
                "loss": self.loss_sum / max(self.targets, 1), "lr": lr,
                "grad_norm": sum(self.norms) / len(self.norms), "tokens_per_s": self.tokens / seconds,
                "target_tokens": self.targets, "peak_mem_bytes": peak_memory_bytes(run.device),
                "elapsed": round(elapsed, 3)}


# ---------------------------------------------------------------------------------------------------
# the loop


def train(cfg: RunConfig, progress: bool = True) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module docstring for one step.

    Raises ``UserError`` for problems the user can fix (including ``TrainingDiverged``). Returns when
    done or after saving on SIGINT/SIGTERM (``result.interrupted`` holds the signal).
    """
    di = init_distributed(cfg.model.device)
    try:
        # rank 0 owns the run folder for the whole run: a second run into it is refused (exit 2)
        lock = RunLock(cfg.train.output_dir) if di.main else None
        with lock if lock is not None else contextlib.nullcontext():
            if lock is not None and lock.took_over:
                dead = lock.took_over
                print(f"took over the lock of a run that is no longer running (pid {dead.get('pid')} on "
                      f"{dead.get('host')})", flush=True)  # stdout: stderr is for the error line
            return _train(cfg, di, progress)
    except KeyboardInterrupt:  # Ctrl-C while loading, or a second Ctrl-C that aborts a step or a save
        good = ckpt.latest_checkpoint(cfg.train.output_dir)
        raise Interrupted(f"interrupted without saving; the last complete checkpoint is {good.path}: "
                          "continue with --resume" if good else "interrupted before the first checkpoint; "
                          "nothing saved: run the same command again to start over") from None
    finally:
        if di.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: RunConfig, di: DistInfo, progress: bool) -> TrainResult:
    from tqdm import tqdm

    tc, out = cfg.train, Path(cfg.train.output_dir)
    say: Say = (lambda msg: tqdm.write(msg)) if di.main else (lambda _msg: None)
    if not di.main:
        warnings.filterwarnings("ignore", category=UserWarning)  # rank 0 reports data/config warnings
    resume_from = ckpt.plan_run_dir(out, tc.resume)
    restarting = resume_from is None and out.is_dir() and (out / METRICS_FILE).exists()
    if di.world > 1:
        dist.barrier()  # every rank decided before rank 0 touches the directory
    data, pad_id, plan = _prepare_data(cfg, di, say)
    if resume_from is not None:  # verify the checkpoint's files before minutes of model loading
        resume_from, state = ckpt.choose_checkpoint(out, cfg, warn=say)
        ckpt.check_resume_config(resume_from, cfg)
    run = _setup(cfg, di, out, say, data, pad_id, plan)
    resumed = _Resumed() if resume_from is None else _restore(run, resume_from, state)
    if di.main:
        _open_run_dir(run, resuming=resume_from is not None, restarting=restarting)
    sink = MetricsSink(out, di.main, resumed.history, resumed.step)
    result = TrainResult(resumed.step, plan.total_steps, out, history=sink.history)
    run_start = time.perf_counter()

    def elapsed() -> float:
        return resumed.elapsed + time.perf_counter() - run_start

    window, evaluated_at = LogWindow(), -1
    bar = tqdm(total=plan.total_steps, initial=result.step, disable=not (progress and di.main), desc="train",
               unit="step", dynamic_ncols=True, file=sys.stderr)
    run.model.train()
    with StopSignal() as stop, bar, sink:
        while result.step < plan.total_steps:
            s = _optimizer_step(run, result.step, stop)
            step = result.step = result.step + 1
            result.last_loss = s.loss
            window.add(s)
            bar.update(1)
            last = step == plan.total_steps
            if step % tc.logging_steps == 0 or last:
                entry = window.entry(step, s.lr, run, elapsed())
                sink.record(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{s.lr:.2e}",
                                tok_s=f"{entry['tokens_per_s']:.0f}", refresh=False)
                window = LogWindow()
            with window.paused():
                if (step % tc.eval_steps == 0 or last) and data.test:
                    result.eval_loss, evaluated_at = _evaluate(run, step, sink, elapsed()), step
                if step % tc.save_steps == 0 or last or s.stopping:
                    info = {"eval_loss": result.eval_loss if evaluated_at == step else None,
                            "loss": result.last_loss}
                    _save(run, step, sink.history, elapsed(), info,
                          " (stopping on a signal)" if s.stopping else "")
            ckpt.fault_point("step", step)
            if s.stopping:
                result.interrupted = int(stop.signum) if stop.signum is not None else int(signal.SIGTERM)
                break
    if result.interrupted is None and di.main:
        result.final_dir = _finish(run, sink.history)
    if di.world > 1:
        dist.barrier()
    return result


def _optimizer_step(run: _Run, step: int, stop: StopSignal) -> StepOutcome:
    """Optimizer step ``step + 1``: the window's backward, clipping, one host sync, the update.

    Nothing is applied when the loss or (without loss scaling) the gradient norm is not finite.
    """
    tc, di, prec, device = run.cfg.train, run.di, run.prec, run.device
    train = run.data.train
    batches = [collate([train[i] for i in idx], run.pad_id) for idx in run.plan.window(step, di.rank)]
    ws = window_backward(run.forward, run.model.lm_head, batches, tc.ce_chunk_size, device, prec.autocast,
                         prec.scaler, run.ddp, di.world)
    prec.scaler.unscale_(run.optimizer)  # a no-op unless fp16 loss scaling is on
    max_norm = tc.max_grad_norm if tc.max_grad_norm is not None else math.inf
    norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm)
    # one collective for the logged sums and the stop decision (all ranks stop at the same step)
    sums = torch.tensor([0.0, float(ws.tokens), float(stop.signum is not None)], device=device,
                        dtype=torch.float64)
    sums[0] += ws.loss_sum.double()
    if di.world > 1:
        dist.all_reduce(sums)
    # the step's single host sync: loss sum, tokens, stop flag and grad norm in one copy
    loss_sum, tokens, stopping, grad_norm = torch.cat([sums, norm.detach().double().reshape(1).to(device)]
                                                      ).cpu().tolist()
    s = StepOutcome(loss_sum, ws.target_tokens, int(tokens), grad_norm, run.optimizer.param_groups[0]["lr"],
                    stopping > 0)
    if not math.isfinite(s.loss) or (not math.isfinite(grad_norm) and not prec.scaler.is_enabled()):
        good = ckpt.latest_checkpoint(run.out)
        raise TrainingDiverged(
            f"training diverged at step {step + 1}: loss {s.loss}, grad norm {grad_norm} (lr {s.lr:.3g}); "
            f"the update was not applied; last good checkpoint: {good.path if good else 'none'}; lower "
            "train.lr, raise train.warmup_steps, or use train.amp bf16/fp32")
    prec.scaler.step(run.optimizer)  # optimizer.step(), or skipped by the scaler on an fp16 overflow
    prec.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return s


def _evaluate(run: _Run, step: int, sink: MetricsSink, elapsed: float) -> float:
    tc = run.cfg.train
    loss, n = eval_loss(run.model, run.data.test, run.pad_id, tc.micro_batch_size, tc.ce_chunk_size,
                        run.device, run.prec.autocast, tc.eval_max_batches, run.di.rank, run.di.world)
    sink.record({"step": step, "eval_loss": loss, "eval_tokens": n, "elapsed": round(elapsed, 3)})
    run.say(f"step {step}: eval loss {loss:.4f} over {n} tokens")
    return loss


def _save(run: _Run, at: int, history: list[dict[str, Any]], elapsed: float, info: dict[str, Any],
          reason: str = "") -> None:
    """Checkpoint ``step-<at>``: every rank hands its RNG state to rank 0, which writes and rotates."""
    rngs = _gather_rng(run.di)
    if not run.di.main:
        return
    plan = run.plan
    epoch, pos = plan.position(at)
    state = {"version": 1, "step": at, "epoch": epoch, "position": pos, "data_seed": plan.seed,
             "steps_per_epoch": plan.steps_per_epoch, "global_batch": plan.global_batch,
             "world_size": run.di.world, "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "scaler": run.prec.scaler.state_dict() or None,
             "rng": rngs, "metrics": history, "elapsed": elapsed}

    def write(tmp: Path) -> None:
        ckpt.save_weights(run.model, tmp, run.cfg)
        ckpt.save_trainer_state(tmp / ckpt.STATE_FILE, state)

    path = ckpt.save_checkpoint(run.out, at, write, info)
    deleted = ckpt.rotate(run.out, run.cfg.train.save_total_limit)
    run.say(f"saved {path}{reason}" + (f" (removed {', '.join(p.name for p in deleted)})" if deleted else ""))


def _finish(run: _Run, history: list[dict[str, Any]]) -> Path:
    """``final/`` (the adapter, or a full model) and ``plots/loss.png``; returns the final folder."""
    from finetune.plots import matplotlib_missing, plot_loss

    out, say = run.out, run.say
    final = ckpt.write_final(run.model, out, run.cfg)
    say(f"wrote {final}")
    png_path = out / "plots" / "loss.png"
    try:
        png = plot_loss(history, png_path)
    except OSError as e:  # the adapter is saved; a missing picture is no reason to fail the run
        say(f"no loss plot: could not write {png_path} ({files.describe_os_error(e)})")
        return final
    if png is not None:
        say(f"wrote {png}")
    elif matplotlib_missing():
        say("no loss plot (matplotlib is not installed: pip install 'qlora-llama[plot]')")
    else:
        say("no loss plot (nothing logged)")
    return final


def _warn_config_changes(path: Path, cfg: RunConfig) -> None:
    """Resuming with other settings is allowed (e.g. more max_steps) but never silent."""
    import yaml

    try:
        before = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):  # unreadable or not UTF-8: nothing to compare with
        return
    now = cfg.to_dict()
    changed = [f"{section}.{key}" for section, values in now.items() for key, value in values.items()
               if (section, key) != ("train", "resume")
               and (before.get(section) or {}).get(key, value) != value]
    if changed:
        warnings.warn(f"resuming {path.parent} with changed settings: {', '.join(changed)}", stacklevel=3)


def _gather_rng(di: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG state, on rank 0 (others get an empty list)."""
    mine = ckpt.rng_state()
    if di.world == 1:
        return [mine]
    gathered: list[Any] = [None] * di.world if di.main else []
    dist.gather_object(mine, gathered if di.main else None, dst=0)
    return gathered if di.main else []


def _json_line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, allow_nan=True) + "\n"
