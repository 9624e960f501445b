"""The data order of a run: which examples form each optimizer step, on each rank.

Determinism (resume equivalence): the order is a pure function of (train.seed, epoch); the window of
step s is a slice of that order, so a resumed run needs only the step number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from finetune.config import TrainConfig
from finetune.errors import UserError


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


def make_plan(train_cfg: TrainConfig, n_examples: int, *, world: int,
              lengths: Sequence[int] | None = None) -> DataPlan:
    """The data plan; ``lengths`` (tokens per example) are used when ``train.group_by_length``."""
    plan = DataPlan(n_examples=n_examples, micro_batch_size=train_cfg.micro_batch_size,
                    accumulation=train_cfg.gradient_accumulation_steps, world=world, seed=train_cfg.seed,
                    total_steps=0, lengths=None if lengths is None else list(lengths),
                    group_by_length=train_cfg.group_by_length)
    if plan.steps_per_epoch < 1:
        raise UserError(f"the train split has {n_examples} examples, fewer than one optimizer step needs "
                        f"({world} rank(s) x train.micro_batch_size {train_cfg.micro_batch_size} x "
                        f"train.gradient_accumulation_steps {train_cfg.gradient_accumulation_steps} = "
                        f"{plan.global_batch}); lower them or add data")
    plan.total_steps = train_cfg.max_steps or max(1, math.ceil(train_cfg.epochs * plan.steps_per_epoch))
    return plan
