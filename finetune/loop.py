"""The training loop: token-weighted accumulation, chunked cross-entropy, AdamW, checkpoints, DDP.

One optimizer step (``step`` counts completed steps)::

    micro-batches of the window ─► count their target tokens N (all ranks) ─► for each micro-batch:
    autocast forward to the final hidden states ─► chunked CE summed ─► backward(sum * world / N)
    ─► clip (report the pre-clip norm) ─► AdamW ─► LR schedule ─► log / eval / save

Why token-weighted: the loss of a window is sum(per-token CE) / (target tokens in the whole window).
Averaging per micro-batch means and then over micro-batches (what dividing each micro-batch loss by
k does) weights a token of a short example more than one of a long example, so k micro-batches of
1 would not equal one batch of k. DDP averages gradients over ranks, so each rank multiplies its sum
by ``world`` and divides by the *global* N (all-reduced before the backward passes).

Why chunked CE: a Llama-2 vocabulary of 32000 in fp32 is 128 KB per token; 16 x 2048 tokens of
logits would be 4 GiB, twice with their gradient. The LM head runs on ``ce_chunk_size`` target
positions at a time inside a non-reentrant activation checkpoint, so the backward recomputes one
chunk's logits at a time instead of keeping them all.

Determinism (resume equivalence): the data order is a pure function of (train.seed, epoch); the
window of step s is a slice of that order, so a resumed run needs only the step number. The RNG
states (dropout) are saved per rank in every checkpoint and restored.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import resource
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from finetune import checkpoint as ckpt
from finetune import files, preflight
from finetune.config import RunConfig, TrainConfig, save_config
from finetune.data import IGNORE_INDEX, Example, collate, prepare
from finetune.errors import UserError
from finetune.runlock import RunLock

METRICS_FILE = "metrics.jsonl"


class Interrupted(KeyboardInterrupt):
    """SIGINT outside the save-and-exit path; ``str()`` says what was kept and how to continue."""


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN/inf; the run stopped without applying that update."""


# ---------------------------------------------------------------------------------------------------
# loss


def _ce_chunk(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # fp32 logits for numerically sound log-softmax, whatever the autocast dtype of the head.
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def chunked_ce_sum(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   chunk_size: int) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over positions with a label, and their count.

    ``hidden`` [B, T, H] are the final-normed hidden states, ``labels`` [B, T] aligned with the
    inputs (HF convention): position t predicts ``labels[t + 1]``; ``-100`` carries no loss. Only
    target rows reach the LM head, ``chunk_size`` at a time, each in a non-reentrant checkpoint
    (its logits are recomputed in backward, never stored).

    No host sync when ``labels`` are on the CPU (the collator's, as the loop passes them): which
    rows are targets is worked out on the host, and only an index (pinned, copied asynchronously)
    goes to the device, so the device never has to report a count or a boolean gather's size.
    Labels on a GPU are first copied to the host (one sync; the loop never passes them so).
    """
    targets = labels[:, 1:].reshape(-1).cpu()  # the collator's host tensor: .cpu() is a no-op
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # worked out on the host
    n = int(rows.numel())
    if n == 0:  # keeps the graph connected (DDP expects every trainable parameter to get a gradient)
        return hidden.sum() * 0.0, 0
    y = _to_device(targets.index_select(0, rows), hidden.device)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, _to_device(rows, hidden.device))
    total = None
    for start in range(0, n, chunk_size):  # h: (N, H), only the rows that predict a target
        h_c, y_c = h[start:start + chunk_size], y[start:start + chunk_size]
        if torch.is_grad_enabled() and h_c.requires_grad:
            part = checkpoint(_ce_chunk, lm_head, h_c, y_c, use_reentrant=False)
        else:
            part = _ce_chunk(lm_head, h_c, y_c)
        total = part if total is None else total + part
    return total, n


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait: pinned, then an asynchronous copy.

    A copy from ordinary (pageable) memory to a GPU waits for the GPU's queue to drain first, which
    would stall the host once per micro-batch; from pinned memory it is queued like a kernel.
    """
    if device.type != "cuda" or t.device == device:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass
class WindowStats:
    """Sums over one accumulation window: local loss sum, global target tokens, local real tokens."""

    loss_sum: torch.Tensor
    target_tokens: int
    tokens: int


def window_backward(forward: Callable[..., torch.Tensor], lm_head: nn.Module,
                    batches: Sequence[dict[str, torch.Tensor]], ce_chunk_size: int,
                    device: torch.device, amp: Callable[[], contextlib.AbstractContextManager] | None = None,
                    scaler: Any = None, ddp: Any = None, world: int = 1) -> WindowStats:
    """Forward + backward of one accumulation window with token-weighted normalisation.

    The gradients left in ``.grad`` equal those of ``sum(CE over the window's target tokens, all
    ranks) / N`` where N counts those tokens; DDP's averaging over ranks is undone by ``* world``.
    ``forward(ids, attention_mask=..., hidden_only=True)`` is the model (or its DDP wrapper).
    """
    local = sum(count_targets(b) for b in batches)  # host labels: no device involved
    n_global = local
    if world > 1:  # one round trip per window (not per micro-batch) to learn the global count
        count = torch.tensor([float(local)], device=device, dtype=torch.float64)
        dist.all_reduce(count)
        n_global = int(count.item())
    scale = world / max(n_global, 1)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    tokens = 0
    for i, batch in enumerate(batches):
        ids = _to_device(batch["input_ids"], device)
        mask = device_mask(batch["attention_mask"], device)
        tokens += int(batch["attention_mask"].sum())  # host tensors: counting them costs no sync
        sync = ddp is None or i == len(batches) - 1
        with (contextlib.nullcontext() if sync else ddp.no_sync()):
            with amp() if amp is not None else contextlib.nullcontext():
                hidden = forward(ids, attention_mask=mask, hidden_only=True)
                # host labels: the target rows are chosen on the CPU (no device sync per micro-batch)
                part, _ = chunked_ce_sum(lm_head, hidden, batch["labels"], ce_chunk_size)
            loss = part * scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += part.detach().float()
    return WindowStats(loss_sum=loss_sum, target_tokens=n_global, tokens=tokens)


def device_mask(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The attention mask on ``device``, or None when the batch has no padding.

    Any mask rules out SDPA's flash kernel (and native GQA), so an unpadded batch (micro-batch 1,
    or equal lengths) runs without one. Checked on the CPU tensor from the collator: no device sync.
    """
    return None if bool(mask.all()) else _to_device(mask, device)


@torch.no_grad()
def eval_loss(model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int,
              ce_chunk_size: int, device: torch.device,
              amp: Callable[[], contextlib.AbstractContextManager] | None = None,
              max_batches: int | None = None, rank: int = 0, world: int = 1) -> tuple[float, int]:
    """Token-weighted mean CE over ``examples`` (the first ``max_batches`` batches), sharded over ranks."""
    if max_batches is not None:
        examples = examples[:max_batches * batch_size]
    mine = examples[rank::world]
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    try:
        for first in range(0, len(mine), batch_size):
            batch = collate(mine[first:first + batch_size], pad_id)
            with amp() if amp is not None else contextlib.nullcontext():
                ids = _to_device(batch["input_ids"], device)
                mask = device_mask(batch["attention_mask"], device)
                hidden = model(ids, attention_mask=mask, hidden_only=True)
                part, n = chunked_ce_sum(model.lm_head, hidden, batch["labels"], ce_chunk_size)  # host labels
            total[0] += part.double()
            total[1] += n
    finally:
        model.train(was_training)
    if world > 1:
        dist.all_reduce(total)
    loss_sum, n = total.tolist()
    return (loss_sum / n if n else math.nan), int(n)


# ---------------------------------------------------------------------------------------------------
# schedule, optimizer, precision


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak LR for the (0-based) optimizer step ``step``.

    Warmup is linear and never 0 (nanoGPT's ``(it + 1) / (warmup + 1)``), then cosine
    (``0.5 (1 + cos(pi p))``, Loshchilov & Hutter 2017, SGDR without restarts), linear (``1 - p``) or
    constant, with p the fraction of the post-warmup steps already done.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(params: list[nn.Parameter], tc: TrainConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: torch's (fused on CUDA) or bitsandbytes' 8-bit / paged ones.

    The 8-bit variants keep the two Adam moments in blockwise 8-bit (Dettmers et al. 2022); the paged
    one also lets them spill to CPU memory under pressure, as in the QLoRA paper (Dettmers et al. 2023).
    """
    if tc.optimizer == "adamw":
        fused = device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay,
                                 **({"fused": True} if fused else {}))
    if device.type != "cuda":
        raise UserError(f"train.optimizer={tc.optimizer} needs a CUDA device (bitsandbytes' 8-bit optimizers "
                        "are GPU kernels); use train.optimizer: adamw on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if tc.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=tc.lr, weight_decay=tc.weight_decay)


@dataclass
class Precision:
    label: str  # fp32 | bf16 | fp16
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: Any = None


def make_precision(tc: TrainConfig, model_dtype: str, device: torch.device) -> Precision:
    """bf16 autocast on CUDA; fp16 autocast + GradScaler only when asked (warned); fp32 on CPU."""
    amp = tc.amp
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            warnings.warn(f"train.amp={amp} is ignored on {device}: CPU training computes in float32",
                          stacklevel=2)
        return Precision("fp32", contextlib.nullcontext)
    if amp == "auto":
        amp = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[model_dtype]
    if amp == "fp32":
        return Precision("fp32", contextlib.nullcontext)
    if amp == "fp16":
        warnings.warn("train.amp=fp16: float16 autocast with a GradScaler (loss scaling) can overflow and "
                      "skip steps; prefer bf16 on GPUs that support it (Ampere and newer)", stacklevel=2)
        return Precision("fp16", lambda: torch.autocast("cuda", dtype=torch.float16),
                         torch.amp.GradScaler("cuda"))
    return Precision("bf16", lambda: torch.autocast("cuda", dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------------
# data order


@dataclass
class DataPlan:
    """How examples become optimizer steps: a global batch of G = world * micro * accumulation examples."""

    n_examples: int
    micro_batch_size: int
    accumulation: int
    world: int
    seed: int
    total_steps: int
    lengths: list[int] | None = None  # tokens per example: padding report, and grouping when asked
    group_by_length: bool = False
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.world * self.micro_batch_size * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        # drop_last: an incomplete global batch would leave some ranks without work; the next epoch's
        # permutation differs, so the dropped examples are not the same ones every epoch
        return self.n_examples // self.global_batch

    def epoch_order(self, epoch: int) -> list[int]:
        """The permutation of epoch ``epoch``: a function of (seed, epoch) only (DistributedSampler's
        ``seed + epoch`` convention)."""
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n_examples, generator=g).tolist()
            if self.group_by_length and self.lengths is not None:
                order = self._grouped(order, g)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def _grouped(self, order: list[int], g: torch.Generator) -> list[int]:
        """The shuffled order regrouped so that each global batch holds examples of similar length.

        As HF's LengthGroupedSampler: cut the shuffled order into mega-batches of 50 global batches,
        sort each by length (longest first), cut into global batches and shuffle those (seeded), so
        batches pad little yet the epoch is still a random walk over lengths. Still a function of
        (seed, epoch, lengths) only, so resume replays it exactly."""
        G, mega = self.global_batch, self.global_batch * 50
        flat = [i for at in range(0, len(order), mega)
                for i in sorted(order[at:at + mega], key=lambda i: -self.lengths[i])]
        batches = [flat[at:at + G] for at in range(0, len(flat) - G + 1, G)]
        return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]

    def padding_fraction(self, epoch: int = 0) -> float | None:
        """Share of the micro-batch tokens of epoch ``epoch`` that are padding (None without lengths)."""
        if self.lengths is None:
            return None
        real = padded = 0
        for step in range(self.steps_per_epoch):
            for rank in range(self.world):
                for micro in self.window(epoch * self.steps_per_epoch + step, rank):
                    sizes = [self.lengths[i] for i in micro]
                    real, padded = real + sum(sizes), padded + max(sizes) * len(sizes)
        return 1 - real / padded if padded else 0.0

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of the 0-based optimizer step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def window(self, step: int, rank: int = 0) -> list[list[int]]:
        """Example indices of this rank's micro-batches for optimizer step ``step``.

        The step takes the next G examples of the epoch order; rank r gets every world-th of them,
        exactly the share a DistributedSampler over the same order gives it, so the union over ranks
        is the same set a single process with ``world`` times the accumulation would use.
        """
        epoch, pos = self.position(step)
        chunk = self.epoch_order(epoch)[pos * self.global_batch:(pos + 1) * self.global_batch]
        mine = chunk[rank::self.world]
        m = self.micro_batch_size
        return [mine[i * m:(i + 1) * m] for i in range(self.accumulation)]


def make_plan(tc: TrainConfig, n_examples: int, world: int, lengths: Sequence[int] | None = None) -> DataPlan:
    """The data plan; ``lengths`` (tokens per example) are used when ``train.group_by_length``."""
    plan = DataPlan(n_examples, tc.micro_batch_size, tc.gradient_accumulation_steps, world, tc.seed, 0,
                    None if lengths is None else list(lengths), tc.group_by_length)
    if plan.steps_per_epoch < 1:
        raise UserError(f"the train split has {n_examples} examples, fewer than one optimizer step needs "
                        f"({world} rank(s) x train.micro_batch_size {tc.micro_batch_size} x "
                        f"train.gradient_accumulation_steps {tc.gradient_accumulation_steps} = "
                        f"{plan.global_batch}); lower them or add data")
    plan.total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * plan.steps_per_epoch))
    return plan


# ---------------------------------------------------------------------------------------------------
# run-level helpers


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

    tc = cfg.train
    out = Path(tc.output_dir)
    say: Callable[[str], None] = (lambda msg: tqdm.write(msg)) if di.main else (lambda _msg: None)
    if not di.main:
        warnings.filterwarnings("ignore", category=UserWarning)  # rank 0 reports data/config warnings

    resume_from = ckpt.plan_run_dir(out, tc.resume)
    restarting = resume_from is None and out.is_dir() and (out / "metrics.jsonl").exists()
    if di.world > 1:
        dist.barrier()  # every rank decided before rank 0 touches the directory
    run_cfg = cfg
    if di.world > 1 and torch.cuda.is_available() and cfg.model.device != "cpu":
        run_cfg = copy.deepcopy(cfg)
        run_cfg.model.device = f"cuda:{di.local_rank}"
    # data first: a bad file or a too-small split fails in seconds, not after loading 7B weights
    import llama
    from finetune.modeling import load_model

    preflight.check_max_length(cfg.data.max_length, cfg.model.path)
    preflight.check_model_weights(cfg.model.path)
    tok = llama.Tokenizer.from_pretrained(cfg.model.path)
    data = prepare(cfg.data, tok)
    say(data.stats.summary())
    pad_id = tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else tok.eos_id
    preflight.check_token_ids(data.train + data.test, cfg.model.path, cfg.data.path)
    plan = make_plan(tc, len(data.train), di.world, [len(e.input_ids) for e in data.train])
    padding = plan.padding_fraction()
    say(f"plan: {plan.total_steps} optimizer steps of {plan.global_batch} examples ({di.world} rank(s) x "
        f"{plan.micro_batch_size} x {plan.accumulation} accumulation); {plan.steps_per_epoch} steps per "
        f"epoch of {plan.n_examples} examples; {padding:.1%} of batch tokens are padding"
        + (" (grouped by length)" if tc.group_by_length else ""))
    state: dict[str, Any] | None = None
    if resume_from is not None:  # verify the checkpoint's files before minutes of model loading
        resume_from, state = ckpt.choose_checkpoint(out, cfg, warn=say)
        ckpt.check_resume_config(resume_from, cfg)
    seed_all(tc.seed)
    model, _ = load_model(run_cfg, for_training=True, log=say)
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

    forward: Callable[..., torch.Tensor] = model
    ddp = None
    if di.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)  # frozen base: no broadcast/sync
        # buffers (RoPE tables) are computed identically on every rank and are ignored above
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=False)
        forward = ddp
        torch.manual_seed(tc.seed + di.rank)  # different dropout masks per rank

    step, history, elapsed_before = 0, [], 0.0
    if resume_from is not None and state is not None:
        try:
            ckpt.load_weights(model, resume_from.path, cfg)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if prec.scaler is not None and state.get("scaler"):
                prec.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:  # nothing has been written yet
            raise UserError(f"cannot resume from {resume_from.path} with this config: "
                            f"{' '.join(str(e).split())[:300]}; resume with the settings the run was "
                            f"started with ({out / 'config.yaml'}) or choose a new train.output_dir"
                            ) from None
        step, history, elapsed_before = int(state["step"]), list(state["metrics"]), float(state["elapsed"])
        rngs = state["rng"]
        if len(rngs) == di.world:
            ckpt.set_rng_state(rngs[di.rank])
        else:
            warnings.warn(f"the checkpoint was written by {len(rngs)} rank(s), this run has {di.world}: "
                          "dropout RNG is re-seeded, data order continues", stacklevel=2)
            torch.manual_seed(tc.seed + di.rank + step)
        if state.get("global_batch") != plan.global_batch:
            warnings.warn(f"the global batch changed ({state.get('global_batch')} -> {plan.global_batch}): "
                          "the data order after resuming differs from the original run", stacklevel=2)
        say(f"resumed from {resume_from.path} (step {step} of {total})")
    if di.main:  # only now touch the run dir: a failed start leaves nothing that blocks a retry
        out.mkdir(parents=True, exist_ok=True)
        for path in ckpt.clean_temp(out):
            say(f"removed the leftovers of an interrupted save: {path.name}")
        if resume_from is not None:
            _warn_config_changes(out / "config.yaml", cfg)
        elif restarting:
            say(f"starting {out} over from step 0: the run there stopped before its first checkpoint")
        files.guarded(lambda: save_config(cfg, out / "config.yaml"), f"write {out / 'config.yaml'}",
                      "free space or fix the folder's permissions")

    if di.main:  # metrics.jsonl = the history of the checkpoint (lines logged after it are dropped)
        files.guarded(lambda: ckpt.write_text_atomic(out / METRICS_FILE, "".join(map(_json_line, history))),
                      f"write {out / METRICS_FILE}", "free space or fix the folder's permissions")

    writer = None
    if di.main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"), purge_step=step or None)
        except ImportError:
            pass

    result = TrainResult(step=step, total_steps=total, output_dir=out, history=history)
    last_eval: float | None = None
    win = {"loss": 0.0, "targets": 0, "tokens": 0, "norms": [], "t0": time.perf_counter(), "pause": 0.0}
    run_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - run_start

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        if di.main:
            try:
                with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
                    f.write(_json_line(entry))
            except OSError as e:
                raise UserError(f"could not append to {out / METRICS_FILE}: {files.describe_os_error(e)}; "
                                f"free space; {ckpt.last_good_text(out)}") from None
            if writer is not None:
                for key, value in entry.items():
                    if key != "step" and isinstance(value, (int, float)):
                        writer.add_scalar(key, value, entry["step"])

    def save(at: int, reason: str = "") -> Path | None:
        rngs = _gather_rng(di)
        if not di.main:
            return None
        epoch, pos = plan.position(at)
        state = {"version": 1, "step": at, "epoch": epoch, "position": pos, "data_seed": plan.seed,
                 "steps_per_epoch": plan.steps_per_epoch, "global_batch": plan.global_batch,
                 "world_size": di.world, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(),
                 "scaler": prec.scaler.state_dict() if prec.scaler is not None else None,
                 "rng": rngs, "metrics": history, "elapsed": elapsed()}
        info = {"eval_loss": last_eval if last_eval_step == at else None, "loss": result.last_loss}

        def write(tmp: Path) -> None:
            ckpt.save_weights(model, tmp, cfg)
            ckpt.save_trainer_state(tmp / ckpt.STATE_FILE, state)

        path = ckpt.save_checkpoint(out, at, write, info)
        deleted = ckpt.rotate(out, tc.save_total_limit)
        say(f"saved {path}{reason}" + (f" (removed {', '.join(p.name for p in deleted)})" if deleted else ""))
        return path

    last_eval_step = -1
    bar = tqdm(total=total, initial=step, disable=not (progress and di.main), desc="train", unit="step",
               dynamic_ncols=True, file=sys.stderr)
    model.train()
    with StopSignal() as stop, bar:
        while step < total:
            batches = [collate([data.train[i] for i in idx], pad_id) for idx in plan.window(step, di.rank)]
            ws = window_backward(forward, model.lm_head, batches, tc.ce_chunk_size, device, prec.autocast,
                                 prec.scaler, ddp, di.world)
            if prec.scaler is not None:
                prec.scaler.unscale_(optimizer)
            max_norm = tc.max_grad_norm if tc.max_grad_norm is not None else math.inf
            norm_t = torch.nn.utils.clip_grad_norm_(params, max_norm)
            # one collective for the logged sums and the stop decision (all ranks stop at the same step)
            sums = torch.tensor([0.0, float(ws.tokens), float(stop.signum is not None)], device=device,
                                dtype=torch.float64)
            sums[0] += ws.loss_sum.double()
            if di.world > 1:
                dist.all_reduce(sums)
            # the step's single host sync: loss sum, tokens, stop flag and grad norm in one copy
            sums = torch.cat([sums, norm_t.detach().double().reshape(1).to(device)]).cpu()
            grad_norm = float(sums[3])
            loss = sums[0].item() / max(ws.target_tokens, 1)
            lr = optimizer.param_groups[0]["lr"]
            if not math.isfinite(loss) or (not math.isfinite(grad_norm) and prec.scaler is None):
                good = ckpt.latest_checkpoint(out)
                raise TrainingDiverged(
                    f"training diverged at step {step + 1}: loss {loss}, grad norm {grad_norm} "
                    f"(lr {lr:.3g}); the update was not applied; last good checkpoint: "
                    f"{good.path if good else 'none'}; lower train.lr, raise train.warmup_steps, or use "
                    "train.amp bf16/fp32")
            if prec.scaler is not None:
                prec.scaler.step(optimizer)
                prec.scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            result.step, result.last_loss = step, loss

            win["loss"] += sums[0].item()
            win["targets"] += ws.target_tokens
            win["tokens"] += int(sums[1].item())
            win["norms"].append(grad_norm)
            bar.update(1)
            if step % tc.logging_steps == 0 or step == total:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = max(time.perf_counter() - win["t0"] - win["pause"], 1e-9)
                entry = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4),
                         "loss": win["loss"] / max(win["targets"], 1), "lr": lr,
                         "grad_norm": sum(win["norms"]) / len(win["norms"]),
                         "tokens_per_s": win["tokens"] / seconds, "target_tokens": win["targets"],
                         "peak_mem_bytes": peak_memory_bytes(device), "elapsed": round(elapsed(), 3)}
                record(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{entry['tokens_per_s']:.0f}", refresh=False)
                win = {"loss": 0.0, "targets": 0, "tokens": 0, "norms": [], "t0": time.perf_counter(),
                       "pause": 0.0}
            pause_start = time.perf_counter()
            stopping = sums[2].item() > 0
            if (step % tc.eval_steps == 0 or step == total) and data.test:
                last_eval, n_eval = eval_loss(model, data.test, pad_id, tc.micro_batch_size, tc.ce_chunk_size,
                                              device, prec.autocast, tc.eval_max_batches, di.rank, di.world)
                last_eval_step = step
                result.eval_loss = last_eval
                record({"step": step, "eval_loss": last_eval, "eval_tokens": n_eval,
                        "elapsed": round(elapsed(), 3)})
                say(f"step {step}: eval loss {last_eval:.4f} over {n_eval} tokens")
            if step % tc.save_steps == 0 or step == total or stopping:
                save(step, " (stopping on a signal)" if stopping else "")
            win["pause"] += time.perf_counter() - pause_start
            ckpt.fault_point("step", step)
            if stopping:
                result.interrupted = int(stop.signum) if stop.signum is not None else int(signal.SIGTERM)
                break

    if result.interrupted is None and di.main:
        result.final_dir = ckpt.write_final(model, out, cfg)
        say(f"wrote {result.final_dir}")
        from finetune.plots import plot_loss

        try:
            png = plot_loss(history, out / "plots" / "loss.png")
        except OSError as e:  # the adapter is saved; a missing picture is no reason to fail the run
            png = None
            say(f"no loss plot: could not write {out / 'plots' / 'loss.png'} ({files.describe_os_error(e)})")
        say(f"wrote {png}" if png else "no loss plot (matplotlib is not installed: pip install "
            "'qlora-llama[plot]')" if history else "no loss plot (nothing logged)")
    if writer is not None:
        writer.close()
    if di.world > 1:
        dist.barrier()
    return result


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
    import json

    return json.dumps(entry, allow_nan=True) + "\n"
