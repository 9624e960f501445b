"""QuantConfig validation and layer selection; the memory report against the quant states' own tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quant


def test_default_selection_is_decoder_linears_without_head_or_embeddings() -> None:
    qc = quant.QuantConfig()
    assert qc.quant_type == "nf4" and qc.double_quant and qc.blocksize == 64
    assert qc.compute_dtype == torch.bfloat16
    assert qc.selects("model.layers.0.self_attn.q_proj")
    assert qc.selects("model.layers.31.mlp.down_proj")
    assert not qc.selects("lm_head")
    assert not qc.selects("model.embed_tokens")
    assert not qc.selects("layers.0.self_attn.q_proj")  # not under model.layers: a different model


def test_skip_patterns_match_whole_path_components() -> None:
    qc = quant.QuantConfig(skip=("layers\\.1", "mlp"))
    assert not qc.selects("model.layers.1.self_attn.q_proj")
    assert qc.selects("model.layers.10.self_attn.q_proj")  # "layers.1" is not a prefix match of "layers.10"
    assert not qc.selects("model.layers.3.mlp.up_proj")
    assert qc.selects("model.layers.3.self_attn.o_proj")
    assert quant.QuantConfig(skip="o_proj").skip == ("o_proj",)  # a single string is one pattern
    everything = quant.QuantConfig(targets=".*", skip=())
    assert everything.selects("lm_head") and everything.selects("model.embed_tokens")


@pytest.mark.parametrize("kwargs,match", [
    (dict(quant_type="int4"), "quant_type"),
    (dict(blocksize=48), "blocksize"),
    (dict(compute_dtype=torch.int8), "compute_dtype"),
    (dict(compute_dtype="float64"), "compute_dtype"),
    (dict(targets="model.layers.(["), "not a valid regex"),
    (dict(skip=("lm_head", "(")), "not a valid regex"),
    (dict(double_quant="yes"), "double_quant"),
])
def test_bad_settings_raise_quant_error(kwargs: dict, match: str) -> None:
    with pytest.raises(quant.QuantError, match=match):
        quant.QuantConfig(**kwargs)
    assert issubclass(quant.QuantError, ValueError)


def test_compute_dtype_accepts_names() -> None:
    assert quant.QuantConfig(compute_dtype="float16").compute_dtype == torch.float16
    assert quant.QuantConfig(compute_dtype="torch.float32").compute_dtype == torch.float32


def _model(double_quant: bool = True) -> nn.Module:
    """A decoder-shaped toy: one 4-bit-able block, a dense head, an embedding and a trainable adapter."""
    torch.manual_seed(0)
    root = nn.Module()
    root.model = nn.Module()
    root.model.embed_tokens = nn.Embedding(100, 64)
    root.model.layers = nn.ModuleList([nn.ModuleDict({"up_proj": nn.Linear(64, 256, bias=False),
                                                      "down_proj": nn.Linear(256, 64, bias=True)})])
    root.lm_head = nn.Linear(64, 100, bias=False)
    root.adapter = nn.Linear(64, 8, bias=False)
    for p in root.parameters():
        p.requires_grad_(False)
    root.adapter.weight.requires_grad_(True)
    return quant.quantize_model(root, quant.QuantConfig(double_quant=double_quant,
                                                        compute_dtype=torch.float32))


def test_memory_report_counts_every_tensor_once() -> None:
    model = _model()
    q4 = [m for m in model.modules() if isinstance(m, quant.Linear4bit)]
    assert len(q4) == 2 and not isinstance(model.lm_head, quant.Linear4bit)
    r = quant.memory_report(model)
    assert r.quantized_params == 64 * 256 * 2
    assert r.quantized_bytes == sum(m.weight.numel() * m.weight.element_size() for m in q4) == 64 * 256
    # The statistics: every tensor bitsandbytes' own serialisation writes, minus the packed metadata blob.
    stats = sum(v.numel() * v.element_size() for m in q4
                for k, v in m.weight.quant_state.as_dict(packed=True).items()
                if isinstance(v, torch.Tensor) and not k.startswith("quant_state."))
    stats += 4 * len(q4)  # the fp32 offset of double quantisation (a float in the serialised form)
    assert r.quant_stats_bytes == stats
    dense = [model.model.embed_tokens.weight, model.lm_head.weight, model.model.layers[0]["down_proj"].bias]
    assert r.dense_params == sum(p.numel() for p in dense)
    assert r.dense_bytes == 4 * r.dense_params
    assert (r.trainable_params, r.trainable_bytes) == (64 * 8, 64 * 8 * 4)
    assert r.total_bytes == r.quantized_bytes + r.quant_stats_bytes + r.dense_bytes + r.trainable_bytes
    text = str(r)
    assert "bits/param" in text and f"{r.quantized_params:,}" in text and "trainable" in text


def test_tied_parameters_counted_once() -> None:
    model = _model()
    model.lm_head.weight = model.model.embed_tokens.weight
    assert quant.memory_report(model).dense_params == 100 * 64 + 64


@pytest.mark.parametrize("double_quant", [True, False])
def test_bits_per_param_of_a_large_layer(double_quant: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4096, 1024, bias=False)
    m = quant.to_4bit(lin, quant.QuantConfig(double_quant=double_quant, compute_dtype=torch.float32))
    bits = quant.memory_report(m).bits_per_quantized_param
    bs, n = 64, 4096 * 1024
    code_tables = 8 * 4 * (16 + (256 if double_quant else 0)) / n  # fp32 code maps, per layer
    # QLoRA's storage formula: 4 bits + an 8-bit absmax per block + an fp32 scale per 256 blocks
    # (+ offset) with double quantisation; 4 bits + an fp32 absmax per block without.
    expected = 4 + (8 / bs + (32 * (n // (bs * 256)) + 32) / n if double_quant else 32 / bs) + code_tables
    assert bits == pytest.approx(expected, rel=1e-9)
    # Without the per-layer code tables (negligible at 7B sizes) this is the paper's ~4.127 / 4.5.
    assert bits - code_tables == pytest.approx(4.127 if double_quant else 4.5, abs=1e-3)


def test_importing_quant_and_checking_its_rules_does_not_load_bitsandbytes() -> None:
    """finetune.config checks quant settings against quant's own rules at every config load; that must
    stay cheap and quiet (bitsandbytes' import prints kernel notices), so bitsandbytes loads on first
    use of a layer, and then it does load."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; import quant; from finetune.config import QuantConfig; QuantConfig(); "
            "print('bitsandbytes' in sys.modules); quant.Linear4bit; print('bitsandbytes' in sys.modules)")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        quant.nope  # noqa: B018
