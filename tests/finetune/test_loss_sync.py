"""The loss never makes the host wait for the device per micro-batch.

The probe is the meta device: its tensors have shapes but no values, so anything that would read a
device value back to the host (``.item()``, a count, a boolean gather whose size depends on the
data) raises there. A whole accumulation window — forward, chunked cross-entropy and backward, as
the loop runs it — must therefore go through on a meta model; the values themselves are checked on
the CPU against the full-logits reference (tests/finetune/test_loop.py) and here against the old
boolean-gather formulation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llama
import lora
from finetune.data.examples import IGNORE_INDEX, Example, collate
from finetune.run.loss import LossSetup, chunked_ce_sum, window_backward

CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
           bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, model_type="llama")


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for lengths in ((9, 5), (12, 12)):  # a padded micro-batch, then an unpadded one
        exs = []
        for n in lengths:
            ids = [1] + torch.randint(3, 128, (n - 1,), generator=g).tolist()
            exs.append(Example(ids, [IGNORE_INDEX] * 3 + ids[3:], prompt_len=3))
        out.append(collate(exs, pad_id=0))
    return out


def test_window_backward_runs_on_the_meta_device_so_it_reads_nothing_back() -> None:
    with torch.device("meta"):
        model = llama.Llama(llama.LlamaConfig.from_hf(CFG))
    lora.inject(model, targets="all-linear", r=2, alpha=4, dropout=0.1)
    model.train()
    model.gradient_checkpointing = True
    ws = window_backward(model, model.lm_head, batches(),
                         setup=LossSetup(ce_chunk_size=4, device=torch.device("meta")))
    assert ws.loss_sum.device.type == "meta"
    assert ws.target_tokens == sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches())
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in lora.trainable_parameters(model))


def test_the_old_boolean_gather_would_have_read_the_device() -> None:
    """The probe can fail: a mask computed on the device and used to gather needs its count."""
    hidden = torch.empty(2, 5, 8, device="meta")
    keep = torch.empty(2, 4, dtype=torch.bool, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        hidden[:, :-1][keep]


def test_host_side_selection_equals_the_boolean_gather_loss() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 7, 16)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    keep = labels[:, 1:] != IGNORE_INDEX
    expected = F.cross_entropy(head(hidden[:, :-1][keep]), labels[:, 1:][keep], reduction="sum")
    for chunk in (1, 4, 1024):
        total, n = chunked_ce_sum(head, hidden, labels, chunk_size=chunk)
        assert n == int(keep.sum())
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-5)
    empty = torch.full_like(labels, IGNORE_INDEX)
    total, n = chunked_ce_sum(head, hidden.requires_grad_(), empty, chunk_size=4)
    assert n == 0 and float(total) == 0.0 and total.requires_grad
