"""Fast generation: finished rows stop costing, the host looks every k steps, results never change.

Oracles: transformers' `generate` (greedy, several EOS ids), and our own generation of each prompt
alone (no batch, no compaction). What is counted is real work: the batch size of each decode
forward (a forward pre-hook on the model) and the device-to-host copies `tolist()` makes.
"""

from __future__ import annotations

import hf_fixtures
import pytest
import torch
from transformers import LlamaForCausalLM

import llama

PROMPTS = [[1, 45, 300, 17, 9, 88, 120], [1, 5], [1, 400, 401, 402, 7], [1, 33, 34], [1, 7, 8, 9], [1, 250]]




def early_eos(model: llama.Llama, n: int = 16) -> list[int]:
    """Two ids that end some rows early and not others (the model's own greedy tokens)."""
    free = llama.generate_ids(model, PROMPTS, max_new_tokens=n, eos_id=[])
    firsts = [row[2] for row in free[:2]]  # rows 0 and 1 stop after two tokens
    assert all(t not in row[:n // 2] for row in free[2:4] for t in firsts), "pick other ids"
    return firsts


def test_several_eos_ids_equal_transformers_and_finished_rows_stop_costing(tiny_model_dir):
    model = llama.from_pretrained(tiny_model_dir)
    ref = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    eos = early_eos(model)
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]) or None)
    got = llama.generate_ids(model, PROMPTS, max_new_tokens=16, eos_id=eos, check_every=2)
    hook.remove()
    assert got == hf_fixtures.hf_generate(ref, PROMPTS, 16, eos)
    assert got == [llama.generate_ids(model, [p], max_new_tokens=16, eos_id=eos)[0] for p in PROMPTS]
    finished_early = sum(len(r) < 8 for r in got)
    assert finished_early >= 2
    # 6 rows: once at most 4 are running the batch becomes 4 (2, 1 later): the decode forwards shrink
    assert sizes[0] == 6 and min(sizes) < 6 and sizes == sorted(sizes, reverse=True), sizes
    assert sum(sizes[1:]) < 6 * (len(sizes) - 1)


@pytest.mark.parametrize("check_every", [1, 3, 8, 100])
def test_results_do_not_depend_on_how_often_the_host_looks(tiny_model_dir, check_every):
    model = llama.from_pretrained(tiny_model_dir)
    eos = early_eos(model)
    reference = llama.generate_ids(model, PROMPTS, max_new_tokens=12, eos_id=eos, check_every=1)
    assert llama.generate_ids(model, PROMPTS, max_new_tokens=12, eos_id=eos, check_every=check_every) \
        == reference
    # stop_fn: asked about each prefix once, in order, whatever check_every is
    free = llama.generate_ids(model, PROMPTS, max_new_tokens=12, eos_id=[])
    target = free[3][4]

    def run(k: int) -> tuple[list[list[int]], list[tuple[int, ...]]]:
        asked: list[tuple[int, ...]] = []

        def stop(new: list[int]) -> bool:
            asked.append(tuple(new))
            return new[-1] == target

        return llama.generate_ids(model, PROMPTS, max_new_tokens=12, eos_id=[], stop_fn=stop,
                                  check_every=k), asked

    got, asked = run(check_every)
    assert got[3] == free[3][:free[3].index(target) + 1]
    for row, want in zip(got, free):
        assert row == want[:len(row)]
    per_step, asked_per_step = run(1)
    assert got == per_step and sorted(asked) == sorted(asked_per_step)  # the same questions, once each


def test_the_host_reads_the_device_only_every_k_steps(tiny_model_dir, monkeypatch):
    model = llama.from_pretrained(tiny_model_dir)
    calls = {"n": 0}
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self: torch.Tensor):  # noqa: ANN202 -- a spy: same result, counted
        calls["n"] += 1
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    n, k = 32, 8
    llama.generate_ids(model, PROMPTS, max_new_tokens=n, eos_id=[], check_every=k)
    # one look every k steps, plus reading the result once
    assert calls["n"] <= n // k + 1, calls
    calls["n"] = 0
    llama.generate_ids(model, PROMPTS, max_new_tokens=n, eos_id=[], check_every=1)
    assert calls["n"] >= n - 1  # the probe does see per-step looks


def test_check_every_must_be_positive(tiny_model_dir):
    model = llama.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="check_every must be >= 1"):
        llama.generate_ids(model, PROMPTS, check_every=0)


def test_a_ready_4d_mask_needs_positions_and_equals_the_2d_mask(tiny_model_dir):
    model = llama.from_pretrained(tiny_model_dir)
    ids = torch.randint(3, 512, (2, 6))
    mask2d = torch.ones(2, 6, dtype=torch.long)
    mask2d[1, :2] = 0
    real = mask2d.bool()
    mask4d = ((torch.arange(6)[None, :] <= torch.arange(6)[:, None]) & real[:, None, :]
              | torch.eye(6, dtype=torch.bool))[:, None]  # (B, 1, T, S), the diagonal keeps pad rows finite
    positions = (mask2d.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, mask=mask4d, positions=positions)
        torch.testing.assert_close(got, model(ids, mask2d), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="needs positions"):
        model(ids, mask=mask4d)
