"""train.group_by_length: batches of similar length, so little of each micro-batch is padding.

The grouped order must still be a seeded shuffle (a function of seed, epoch and lengths only, so a
resumed run replays it), use every example at most once per epoch, and cut padding; the demo config
must waste at most 5% of its batch tokens on padding with the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import random
from pathlib import Path

from finetune.config import TrainConfig, load_config
from finetune.data.examples import prepare
from finetune.data.plan import make_plan
from llama.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _plan(group: bool, world: int = 1, lengths=None, n: int = 1000, **kw):
    tc = TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2, max_steps=300, seed=7,
                     group_by_length=group, **kw)
    rng = random.Random(0)
    lengths = lengths or [rng.randint(20, 400) for _ in range(n)]
    return make_plan(tc, len(lengths), world=world, lengths=lengths), lengths


def test_grouped_batches_pad_less_and_use_each_example_once() -> None:
    plain, lengths = _plan(False)
    grouped, _ = _plan(True)
    assert grouped.padding_fraction() < 0.05 < 0.3 < plain.padding_fraction()
    for epoch in (0, 1):
        order = grouped.epoch_order(epoch)
        assert len(order) == len(set(order)) == grouped.steps_per_epoch * grouped.global_batch
    steps = grouped.steps_per_epoch
    used = [i for s in range(steps) for mb in grouped.window(s) for i in mb]
    assert len(used) == len(set(used))
    # still shuffled: the first batches of an epoch are not simply the longest examples
    firsts = [max(lengths[i] for mb in grouped.window(s) for i in mb) for s in range(10)]
    assert firsts != sorted(firsts, reverse=True)


def test_grouped_order_is_a_function_of_seed_epoch_and_lengths() -> None:
    a, lengths = _plan(True)
    b, _ = _plan(True, lengths=lengths)
    assert [b.window(s) for s in (130, 0, 57)] == [a.window(s) for s in (130, 0, 57)]
    assert a.epoch_order(0) != a.epoch_order(1)
    c, _ = _plan(True, lengths=lengths, world=1)
    c.seed += 1
    c._orders.clear()
    assert c.epoch_order(0) != a.epoch_order(0)


def test_grouped_ranks_share_a_global_batch() -> None:
    two, lengths = _plan(True, world=2)
    for step in range(5):
        union = sorted(i for r in range(2) for mb in two.window(step, r) for i in mb)
        assert len(set(union)) == two.global_batch == 16
        sizes = [lengths[i] for i in union]
        assert max(sizes) - min(sizes) < 60  # one global batch: neighbours in a sorted mega-batch


def test_demo_config_wastes_at_most_5_percent_on_padding(smollm2_dir: Path) -> None:
    cfg = load_config(ROOT / "configs" / "demo.yaml", check_paths=False)
    cfg.model.path = str(smollm2_dir)
    cfg.data.path = str(ROOT / "data" / "emails.csv")
    assert cfg.train.group_by_length
    data = prepare(cfg.data, Tokenizer.from_pretrained(smollm2_dir))
    lengths = [len(e.input_ids) for e in data.train]
    plan = make_plan(cfg.train, len(lengths), world=1, lengths=lengths)
    used = min(plan.total_steps, plan.steps_per_epoch)
    real = padded = 0
    for step in range(used):  # the steps the demo actually runs
        for micro in plan.window(step):
            sizes = [lengths[i] for i in micro]
            real, padded = real + sum(sizes), padded + max(sizes) * len(sizes)
    assert 1 - real / padded <= 0.05, 1 - real / padded
