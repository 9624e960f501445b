"""The training loop: set a run up, take optimizer steps, log, evaluate, save, resume, stop cleanly.

One optimizer step (``step`` counts completed steps)::

    micro-batches of the window (finetune.data.plan) ─► forward + chunked CE + backward, token-weighted
    (finetune.run.loss.window_backward) ─► clip (report the pre-clip norm) ─► one host sync ─► AdamW
    ─► LR schedule (finetune.run.optim) ─► log / eval / save

``_train`` reads as that story: ``_setup`` (data, plan, model, optimizer, precision, DDP), ``_restore``
(a checkpoint's weights, optimizer, schedule, RNG), ``_open_run_dir``, then the loop over
``_optimizer_step`` with a ``LogWindow`` for the averages, a ``MetricsSink`` for metrics.jsonl and
TensorBoard (both in ``finetune.run.metrics_log``), ``_save`` for checkpoints and ``_finish`` for
``final/`` and the loss plot. Ranks, seeds and stop signals are ``finetune.run.processes``'.

Determinism (resume equivalence): the data order is a function of (train.seed, epoch) and the step
only, and the RNG states (dropout) are saved per rank in every checkpoint and restored, so a resumed
run continues bit-identically on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import llama
from finetune import files, preflight
from finetune.compiling import compile_decoder_layers
from finetune.config import RunConfig, save_config
from finetune.data.examples import PreparedData, collate, padding_id, prepare
from finetune.data.plan import DataPlan, make_plan
from finetune.errors import UserError
from finetune.modeling import load_model
from finetune.plots import matplotlib_missing, plot_loss
from finetune.run import checkpoint as ckpt
from finetune.run.lock import RunLock
from finetune.run.loss import LossSetup, eval_loss, window_backward
from finetune.run.metrics_log import METRICS_FILE, LogWindow, MetricsSink, StepOutcome
from finetune.run.optim import Precision, lr_factor, make_optimizer, make_precision
from finetune.run.processes import DistInfo, StopSignal, gather_rng, init_distributed, seed_all

Say = Callable[[str], None]


class Interrupted(KeyboardInterrupt):
    """SIGINT outside the save-and-exit path; ``str()`` says what was kept and how to continue."""


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN/inf; the run stopped without applying that update."""


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
    dist_info: DistInfo
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
    precision: Precision
    forward: Callable[..., torch.Tensor]  # the model, or its DDP wrapper
    loss_setup: LossSetup                 # chunk size, device, autocast, scaler, DDP, ranks


def _prepare_data(cfg: RunConfig, dist_info: DistInfo, say: Say) -> tuple[PreparedData, int, DataPlan]:
    """Tokenizer, examples and the data plan: a bad file or a too-small split fails in seconds, not
    after loading 7B weights."""
    preflight.check_max_length(cfg.data.max_length, cfg.model.path)
    preflight.check_model_weights(cfg.model.path)
    tok = llama.Tokenizer.from_pretrained(cfg.model.path)
    data = prepare(cfg.data, tok)
    say(data.stats.summary())
    preflight.check_token_ids(data.train + data.test, cfg.model.path, cfg.data.path)
    plan = make_plan(cfg.train, len(data.train), world=dist_info.world,
                     lengths=[len(e.input_ids) for e in data.train])
    say(f"plan: {plan.total_steps} optimizer steps of {plan.global_batch} examples "
        f"({dist_info.world} rank(s) x {plan.micro_batch_size} x {plan.accumulation} accumulation); "
        f"{plan.steps_per_epoch} steps per epoch of {plan.n_examples} examples; "
        f"{plan.padding_fraction():.1%} of batch tokens are padding"
        + (" (grouped by length)" if cfg.train.group_by_length else ""))
    return data, padding_id(tok), plan


def _setup(cfg: RunConfig, dist_info: DistInfo, *, out: Path, say: Say, data: PreparedData, pad_id: int,
           plan: DataPlan) -> _Run:
    """The model (seeded, so LoRA's initialisation is the seed's), optimizer, schedule, precision, DDP."""
    train_cfg = cfg.train
    run_cfg = cfg
    if dist_info.world > 1 and torch.cuda.is_available() and cfg.model.device != "cpu":
        run_cfg = copy.deepcopy(cfg)
        run_cfg.model.device = f"cuda:{dist_info.local_rank}"
    seed_all(train_cfg.seed)
    model = load_model(run_cfg, for_training=True, log=say)
    device = next(model.parameters()).device
    if train_cfg.compile and compile_decoder_layers(model, device):
        say("compile: each decoder layer is compiled with torch.compile (the first steps compile)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, train_cfg, device)
    total = plan.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total, warmup_steps=train_cfg.warmup_steps, kind=train_cfg.scheduler))
    precision = make_precision(train_cfg, cfg.model.dtype, device)
    say(f"precision: {precision.label}; optimizer {train_cfg.optimizer}; schedule {train_cfg.scheduler} "
        f"(warmup {train_cfg.warmup_steps}); peak lr {train_cfg.lr:g}")
    forward, ddp = _wrap_ddp(model, dist_info, device=device, seed=train_cfg.seed)
    loss_setup = LossSetup(ce_chunk_size=train_cfg.ce_chunk_size, device=device, autocast=precision.autocast,
                           scaler=precision.scaler, ddp=ddp, world=dist_info.world, rank=dist_info.rank)
    return _Run(cfg=cfg, dist_info=dist_info, out=out, say=say, data=data, pad_id=pad_id, plan=plan,
                model=model, device=device, params=params, optimizer=optimizer, scheduler=scheduler,
                precision=precision, forward=forward, loss_setup=loss_setup)


def _wrap_ddp(model: nn.Module, dist_info: DistInfo, *, device: torch.device,
              seed: int) -> tuple[Callable, Any]:
    """(forward, ddp): the model itself on one rank; a DDP wrapper over the trainable parameters only."""
    if dist_info.world == 1:
        return model, None
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]  # RoPE tables: computed identically on every rank
    # frozen base: no broadcast/sync
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=False)
    torch.manual_seed(seed + dist_info.rank)  # different dropout masks per rank
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
        ckpt.load_weights(run.model, checkpoint.path, run.cfg.lora)
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.precision.scaler.is_enabled() and state.get("scaler"):
            run.precision.scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, RuntimeError) as e:  # nothing has been written yet
        raise UserError(f"cannot resume from {checkpoint.path} with this config: "
                        f"{' '.join(str(e).split())[:300]}; resume with the settings the run was "
                        f"started with ({run.out / 'config.yaml'}) or choose a new train.output_dir"
                        ) from None
    resumed = _Resumed(int(state["step"]), list(state["metrics"]), float(state["elapsed"]))
    dist_info, rngs = run.dist_info, state["rng"]
    if len(rngs) == dist_info.world:
        ckpt.set_rng_state(rngs[dist_info.rank])
    else:
        warnings.warn(f"the checkpoint was written by {len(rngs)} rank(s), this run has {dist_info.world}: "
                      "dropout RNG is re-seeded, data order continues", stacklevel=2)
        torch.manual_seed(run.cfg.train.seed + dist_info.rank + resumed.step)
    if state.get("global_batch") != run.plan.global_batch:
        warnings.warn(f"the global batch changed ({state.get('global_batch')} -> {run.plan.global_batch}): "
                      "the data order after resuming differs from the original run", stacklevel=2)
    run.say(f"resumed from {checkpoint.path} (step {resumed.step} of {run.plan.total_steps})")
    return resumed


def _open_run_dir(run: _Run, *, resuming: bool, restarting: bool) -> None:
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
# the loop


def train(cfg: RunConfig, progress: bool = True) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module docstring for one step.

    Raises ``UserError`` for problems the user can fix (including ``TrainingDiverged``). Returns when
    done or after saving on SIGINT/SIGTERM (``result.interrupted`` holds the signal).
    """
    dist_info = init_distributed(cfg.model.device)
    try:
        # rank 0 owns the run folder for the whole run: a second run into it is refused (exit 2)
        lock = RunLock(cfg.train.output_dir) if dist_info.main else None
        with lock if lock is not None else contextlib.nullcontext():
            if lock is not None and lock.took_over:
                dead = lock.took_over
                print(f"took over the lock of a run that is no longer running (pid {dead.get('pid')} on "
                      f"{dead.get('host')})", flush=True)  # stdout: stderr is for the error line
            return _train(cfg, dist_info, progress)
    except KeyboardInterrupt:  # Ctrl-C while loading, or a second Ctrl-C that aborts a step or a save
        good = ckpt.latest_checkpoint(cfg.train.output_dir)
        raise Interrupted(f"interrupted without saving; the last complete checkpoint is {good.path}: "
                          "continue with --resume" if good else "interrupted before the first checkpoint; "
                          "nothing saved: run the same command again to start over") from None
    finally:
        if dist_info.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: RunConfig, dist_info: DistInfo, progress: bool) -> TrainResult:
    train_cfg, out = cfg.train, Path(cfg.train.output_dir)
    say: Say = (lambda msg: tqdm.write(msg)) if dist_info.main else (lambda _msg: None)
    if not dist_info.main:
        warnings.filterwarnings("ignore", category=UserWarning)  # rank 0 reports data/config warnings
    resume_from = ckpt.plan_run_dir(out, train_cfg.resume)
    restarting = resume_from is None and out.is_dir() and (out / METRICS_FILE).exists()
    if dist_info.world > 1:
        dist.barrier()  # every rank decided before rank 0 touches the directory
    data, pad_id, plan = _prepare_data(cfg, dist_info, say)
    if resume_from is not None:  # verify the checkpoint's files before minutes of model loading
        resume_from, state = ckpt.choose_checkpoint(out, cfg.lora, warn=say)
        ckpt.check_resume_config(resume_from, cfg.lora, out)
    run = _setup(cfg, dist_info, out=out, say=say, data=data, pad_id=pad_id, plan=plan)
    resumed = _Resumed() if resume_from is None else _restore(run, resume_from, state)
    if dist_info.main:
        _open_run_dir(run, resuming=resume_from is not None, restarting=restarting)
    sink = MetricsSink(out, main=dist_info.main, history=resumed.history, step=resumed.step)
    result = TrainResult(resumed.step, plan.total_steps, out, history=sink.history)
    run_start = time.perf_counter()

    def elapsed() -> float:
        return resumed.elapsed + time.perf_counter() - run_start

    log_window, evaluated_at = LogWindow(), -1
    bar = tqdm(total=plan.total_steps, initial=result.step, disable=not (progress and dist_info.main),
               desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    run.model.train()
    with StopSignal() as stop, bar, sink:
        while result.step < plan.total_steps:
            outcome = _optimizer_step(run, result.step, stop)
            step = result.step = result.step + 1
            result.last_loss = outcome.loss
            log_window.add(outcome)
            bar.update(1)
            last = step == plan.total_steps
            if step % train_cfg.logging_steps == 0 or last:
                entry = log_window.entry(step, lr=outcome.lr, device=run.device,
                                         steps_per_epoch=plan.steps_per_epoch, elapsed=elapsed())
                sink.record(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{outcome.lr:.2e}",
                                tok_s=f"{entry['tokens_per_s']:.0f}", refresh=False)
                log_window = LogWindow()
            with log_window.paused():
                if (step % train_cfg.eval_steps == 0 or last) and data.test:
                    result.eval_loss, evaluated_at = _evaluate(run, step, sink=sink, elapsed=elapsed()), step
                if step % train_cfg.save_steps == 0 or last or outcome.stopping:
                    info = {"eval_loss": result.eval_loss if evaluated_at == step else None,
                            "loss": result.last_loss}
                    _save(run, step, history=sink.history, elapsed=elapsed(), info=info,
                          reason=" (stopping on a signal)" if outcome.stopping else "")
            ckpt.fault_point("step", step)
            if outcome.stopping:
                result.interrupted = int(stop.signum) if stop.signum is not None else int(signal.SIGTERM)
                break
    if result.interrupted is None and dist_info.main:
        result.final_dir = _finish(run, sink.history)
    if dist_info.world > 1:
        dist.barrier()
    return result


def _optimizer_step(run: _Run, step: int, stop: StopSignal) -> StepOutcome:
    """Optimizer step ``step + 1``: the window's backward, clipping, one host sync, the update.

    Nothing is applied when the loss or (without loss scaling) the gradient norm is not finite.
    """
    train_cfg, dist_info, scaler, device = run.cfg.train, run.dist_info, run.precision.scaler, run.device
    train = run.data.train
    batches = [collate([train[i] for i in idx], run.pad_id) for idx in run.plan.window(step, dist_info.rank)]
    window = window_backward(run.forward, run.model.lm_head, batches, setup=run.loss_setup)
    scaler.unscale_(run.optimizer)  # a no-op unless fp16 loss scaling is on
    max_norm = train_cfg.max_grad_norm if train_cfg.max_grad_norm is not None else math.inf
    norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm)
    # one collective for the logged sums and the stop decision (all ranks stop at the same step)
    sums = torch.tensor([0.0, float(window.tokens), float(stop.signum is not None)], device=device,
                        dtype=torch.float64)
    sums[0] += window.loss_sum.double()
    if dist_info.world > 1:
        dist.all_reduce(sums)
    # the step's single host sync: loss sum, tokens, stop flag and grad norm in one copy
    loss_sum, tokens, stopping, grad_norm = torch.cat([sums, norm.detach().double().reshape(1).to(device)]
                                                      ).cpu().tolist()
    outcome = StepOutcome(loss_sum=loss_sum, target_tokens=window.target_tokens, tokens=int(tokens),
                          grad_norm=grad_norm, lr=run.optimizer.param_groups[0]["lr"], stopping=stopping > 0)
    if not math.isfinite(outcome.loss) or (not math.isfinite(grad_norm) and not scaler.is_enabled()):
        good = ckpt.latest_checkpoint(run.out)
        raise TrainingDiverged(
            f"training diverged at step {step + 1}: loss {outcome.loss}, grad norm {grad_norm} "
            f"(lr {outcome.lr:.3g}); the update was not applied; last good checkpoint: "
            f"{good.path if good else 'none'}; lower train.lr, raise train.warmup_steps, or use "
            "train.amp bf16/fp32")
    scaler.step(run.optimizer)  # optimizer.step(), or skipped by the scaler on an fp16 overflow
    scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return outcome


def _evaluate(run: _Run, step: int, *, sink: MetricsSink, elapsed: float) -> float:
    train_cfg = run.cfg.train
    loss, n = eval_loss(run.model, run.data.test, pad_id=run.pad_id, batch_size=train_cfg.micro_batch_size,
                        setup=run.loss_setup, max_batches=train_cfg.eval_max_batches)
    sink.record({"step": step, "eval_loss": loss, "eval_tokens": n, "elapsed": round(elapsed, 3)})
    run.say(f"step {step}: eval loss {loss:.4f} over {n} tokens")
    return loss


def _save(run: _Run, at: int, *, history: list[dict[str, Any]], elapsed: float, info: dict[str, Any],
          reason: str = "") -> None:
    """Checkpoint ``step-<at>``: every rank hands its RNG state to rank 0, which writes and rotates."""
    rngs = gather_rng(run.dist_info)
    if not run.dist_info.main:
        return
    plan = run.plan
    epoch, pos = plan.position(at)
    state = {"version": 1, "step": at, "epoch": epoch, "position": pos, "data_seed": plan.seed,
             "steps_per_epoch": plan.steps_per_epoch, "global_batch": plan.global_batch,
             "world_size": run.dist_info.world, "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "scaler": run.precision.scaler.state_dict() or None,
             "rng": rngs, "metrics": history, "elapsed": elapsed}

    def write(tmp: Path) -> None:
        ckpt.save_weights(run.model, tmp, lora_cfg=run.cfg.lora, model_path=run.cfg.model.path)
        ckpt.save_trainer_state(tmp / ckpt.STATE_FILE, state)

    path = ckpt.save_checkpoint(run.out, at, write, info=info)
    deleted = ckpt.rotate(run.out, run.cfg.train.save_total_limit)
    run.say(f"saved {path}{reason}" + (f" (removed {', '.join(p.name for p in deleted)})" if deleted else ""))


def _finish(run: _Run, history: list[dict[str, Any]]) -> Path:
    """``final/`` (the adapter, or a full model) and ``plots/loss.png``; returns the final folder."""
    out, say = run.out, run.say
    final = ckpt.write_final(run.model, out, lora_cfg=run.cfg.lora, model_path=run.cfg.model.path)
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


