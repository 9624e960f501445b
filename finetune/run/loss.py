"""The training objective: chunked next-token cross-entropy, token-weighted over a window; the eval loss.

The loop (``finetune.run.loop``), the evaluator (``finetune.evaluate.evaluator``) and the benchmarks all
compute the
loss here, so they agree to the last digit and none of them needs the loop's signals, DDP or logging.

Why token-weighted: the loss of a window is sum(per-token CE) / (target tokens in the whole window).
Averaging per micro-batch means and then over micro-batches (what dividing each micro-batch loss by
k does) weights a token of a short example more than one of a long example, so k micro-batches of
1 would not equal one batch of k. DDP averages gradients over ranks, so each rank multiplies its sum
by ``world`` and divides by the *global* N (all-reduced before the backward passes).

Why chunked CE: a Llama-2 vocabulary of 32000 in fp32 is 128 KB per token; 16 x 2048 tokens of
logits would be 4 GiB, twice with their gradient. The LM head runs on ``ce_chunk_size`` target
positions at a time inside a non-reentrant activation checkpoint, so the backward recomputes one
chunk's logits at a time instead of keeping them all.

No host syncs: labels stay on the host (the collator's tensors); which positions are targets is
worked out there, and only an index travels to the device, pinned and asynchronously.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from finetune.data.examples import IGNORE_INDEX, Example, collate

Autocast = Callable[[], contextlib.AbstractContextManager]


def _ce_chunk(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # fp32 logits for numerically sound log-softmax, whatever the autocast dtype of the head.
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def chunked_ce_sum(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *,
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
    y = to_device(targets.index_select(0, rows), hidden.device)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, to_device(rows, hidden.device))
    total = None
    for start in range(0, n, chunk_size):  # h: (N, H), only the rows that predict a target
        h_c, y_c = h[start:start + chunk_size], y[start:start + chunk_size]
        if torch.is_grad_enabled() and h_c.requires_grad:
            part = checkpoint(_ce_chunk, lm_head, h_c, y_c, use_reentrant=False)
        else:
            part = _ce_chunk(lm_head, h_c, y_c)
        total = part if total is None else total + part
    return total, n


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait: pinned, then an asynchronous copy.

    A copy from ordinary (pageable) memory to a GPU waits for the GPU's queue to drain first, which
    would stall the host once per micro-batch; from pinned memory it is queued like a kernel.
    """
    if device.type != "cuda" or t.device == device:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class LossSetup:
    """How this process computes the loss; the same for every window and every eval pass of a run.

    One value instead of six arguments that always travel together: the loop builds it once in its
    setup, the evaluator and the benchmarks build theirs with the defaults they need.
    """

    ce_chunk_size: int                   # target positions per LM-head chunk (chunked_ce_sum)
    device: torch.device
    autocast: Autocast = contextlib.nullcontext  # the forward's autocast context (optim.Precision)
    scaler: torch.amp.GradScaler | None = None   # fp16 loss scaling; None or disabled otherwise
    ddp: Any = None                      # the DDP wrapper: all micro-batches but the last skip its sync
    world: int = 1
    rank: int = 0


@dataclass
class WindowStats:
    """Sums over one accumulation window: local loss sum, global target tokens, local real tokens."""

    loss_sum: torch.Tensor
    target_tokens: int
    tokens: int


def window_backward(forward: Callable[..., torch.Tensor], lm_head: nn.Module,
                    batches: Sequence[dict[str, torch.Tensor]], *, setup: LossSetup) -> WindowStats:
    """Forward + backward of one accumulation window with token-weighted normalisation.

    The gradients left in ``.grad`` equal those of ``sum(CE over the window's target tokens, all
    ranks) / N`` where N counts those tokens; DDP's averaging over ranks is undone by ``* world``.
    ``forward(ids, attention_mask=..., hidden_only=True)`` is the model (or its DDP wrapper).
    """
    device, world, ddp, scaler = setup.device, setup.world, setup.ddp, setup.scaler
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
        ids = to_device(batch["input_ids"], device)
        mask = device_mask(batch["attention_mask"], device)
        tokens += int(batch["attention_mask"].sum())  # host tensors: counting them costs no sync
        sync = ddp is None or i == len(batches) - 1
        with (contextlib.nullcontext() if sync else ddp.no_sync()):
            with setup.autocast():
                hidden = forward(ids, attention_mask=mask, hidden_only=True)
                # host labels: the target rows are chosen on the CPU (no device sync per micro-batch)
                part, _ = chunked_ce_sum(lm_head, hidden, batch["labels"], chunk_size=setup.ce_chunk_size)
            loss = part * scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += part.detach().float()
    return WindowStats(loss_sum=loss_sum, target_tokens=n_global, tokens=tokens)


def device_mask(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The attention mask on ``device``, or None when the batch has no padding.

    Any mask rules out SDPA's flash kernel (and native GQA), so an unpadded batch (micro-batch 1,
    or equal lengths) runs without one. Checked on the CPU tensor from the collator: no device sync.
    """
    return None if bool(mask.all()) else to_device(mask, device)


@torch.no_grad()
def eval_loss(model: nn.Module, examples: Sequence[Example], *, pad_id: int, batch_size: int,
              setup: LossSetup, max_batches: int | None = None) -> tuple[float, int]:
    """Token-weighted mean CE over ``examples`` (the first ``max_batches`` batches), sharded over ranks."""
    if max_batches is not None:
        examples = examples[:max_batches * batch_size]
    device, world = setup.device, setup.world
    mine = examples[setup.rank::world]
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    try:
        for first in range(0, len(mine), batch_size):
            batch = collate(mine[first:first + batch_size], pad_id)
            with setup.autocast():
                ids = to_device(batch["input_ids"], device)
                mask = device_mask(batch["attention_mask"], device)
                hidden = model(ids, attention_mask=mask, hidden_only=True)
                part, n = chunked_ce_sum(model.lm_head, hidden, batch["labels"],  # host labels
                                         chunk_size=setup.ce_chunk_size)
            total[0] += part.double()
            total[1] += n
    finally:
        model.train(was_training)
    if world > 1:
        dist.all_reduce(total)
    loss_sum, n = total.tolist()
    return (loss_sum / n if n else math.nan), int(n)
