"""torch.compile traces the forward and the KV-cache decode step in one graph and matches eager."""

from __future__ import annotations

import pytest
import torch

import llama


@pytest.fixture
def one_layer_dir(make_checkpoint, compiler):
    return make_checkpoint(num_hidden_layers=1, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})


def test_compiled_forward_with_padding_mask_equals_eager(one_layer_dir):
    model = llama.from_pretrained(one_layer_dir)
    ids = torch.randint(0, 512, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask), model(ids, mask), rtol=0, atol=1e-5)


def test_compiled_decode_step_generates_the_eager_ids(one_layer_dir):
    model = llama.from_pretrained(one_layer_dir)
    prompts = [[1, 45, 300, 17, 9], [1, 5], [1, 400, 401]]
    eager = llama.generate_ids(model, prompts, max_new_tokens=8, eos_id=[])
    assert llama.generate_ids(model, prompts, max_new_tokens=8, eos_id=[], compile=True) == eager
