"""Dequantise once: a dense merged copy gives the 4-bit + LoRA logits; eval.dense decides and says so.

Oracle: the model itself before the swap (real bitsandbytes NF4 base, unmerged LoRA with a non-zero
B). fp32 on CPU: same dequantised values, the LoRA update merged in fp32, logits within 1e-5.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._inductor import config as inductor_config

import llama
import lora
import quant
from finetune.evaluate import dense

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_cli import env, run_cli  # noqa: E402, F401  (the eval.py fixture and runner)

PROMPTS = [[1, 45, 300, 17, 9, 88, 120], [1, 5], [1, 400, 401, 402, 7]]


def nf4_lora(model_dir: Path) -> llama.Llama:
    model = llama.from_pretrained(model_dir, linear_hook=quant.make_hook(quant.QuantConfig(
        compute_dtype=torch.float32)))
    torch.manual_seed(0)
    lora.inject(model, targets=["q_proj", "v_proj", "down_proj"], r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    return model.eval()


def test_dense_merged_logits_and_ids_equal_the_4bit_lora_path(tiny_model_dir):
    model = nf4_lora(tiny_model_dir)
    ids = torch.randint(3, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    generated = llama.generate_ids(model, PROMPTS, max_new_tokens=10, eos_id=[])
    plan = dense.plan_dense(model)
    n4 = sum(isinstance(m, quant.Linear4bit) for m in model.modules())
    assert plan.layers == n4 and plan.extra_bytes > 0
    dense.densify(model)
    assert not any(isinstance(m, (quant.Linear4bit, lora.LoRALinear)) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-5)
    assert llama.generate_ids(model, PROMPTS, max_new_tokens=10, eos_id=[]) == generated


def test_auto_densifies_when_it_fits_and_keeps_4bit_when_it_does_not(tiny_model_dir, monkeypatch):
    lines: list[str] = []
    model = nf4_lora(tiny_model_dir)
    assert dense.maybe_densify(model, "auto", log=lines.append)
    assert len(lines) == 1 and "dense merged copy" in lines[0] and "GiB was free" in lines[0]
    assert not any(isinstance(m, quant.Linear4bit) for m in model.modules())

    # a machine with (almost) no free memory: the check says so in one line and the model stays 4-bit
    monkeypatch.setattr(dense, "available_memory", lambda device: 1024)
    for setting, start in (("auto", "generation: a dense merged copy needs"),
                           (True, "eval.dense true, but a dense merged copy needs")):
        lines.clear()
        model = nf4_lora(tiny_model_dir)
        assert not dense.maybe_densify(model, setting, log=lines.append)
        assert len(lines) == 1 and lines[0].startswith(start), lines
        assert "only 0.00 GiB is free: generating from the 4-bit weights" in lines[0]
        assert any(isinstance(m, quant.Linear4bit) for m in model.modules())
    lines.clear()
    assert not dense.maybe_densify(nf4_lora(tiny_model_dir), False, log=lines.append)
    assert lines == ["generation: eval.dense false: generating from the 4-bit / unmerged weights"]


def test_eval_cli_prints_the_check_and_scores_alike_dense_or_not(env, capsys, tmp_path, monkeypatch):  # noqa: F811
    base = [env["cfg"], "--limit", 4, "--set", "quant.enabled=true"]
    rc, out, err = run_cli([*base, "--output", tmp_path / "d"], capsys)
    assert rc == 0, err
    assert "generation: dense merged copy" in out
    rc, out, err = run_cli([*base, "eval.dense=false", "--output", tmp_path / "q"], capsys)
    assert rc == 0, err
    assert "eval.dense false" in out
    monkeypatch.setattr(dense, "available_memory", lambda device: 0)
    rc, out, err = run_cli([*base, "eval.dense=true", "--output", tmp_path / "t"], capsys)
    assert rc == 0, err
    assert "eval.dense true, but a dense merged copy needs" in out and "generating from the 4-bit" in out
    m = {k: json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("d", "q", "t")}
    assert [m[k]["generation"]["dense"] for k in ("d", "q", "t")] == [True, False, False]
    preds = {k: [json.loads(x)["prediction"] for x in (tmp_path / k / "predictions.jsonl").read_text()
                 .splitlines()] for k in m}
    assert preds["d"] == preds["q"] == preds["t"]
    assert m["d"]["loss"]["eval_loss"] == m["q"]["loss"]["eval_loss"]  # measured before the swap


@pytest.mark.parametrize("value", ["maybe", "1"])
def test_eval_dense_rejects_other_values(env, capsys, value):  # noqa: F811
    rc, _, err = run_cli([env["cfg"], "--set", f"eval.dense={value}"], capsys)
    assert rc == 2 and "eval.dense" in err and err.count("\n") == 1


def test_eval_compile_without_a_working_compiler_decodes_eager(env, capsys, tmp_path):  # noqa: F811
    torch._dynamo.reset()
    broken = inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False})
    with broken:
        rc, out, err = run_cli([env["cfg"], "--limit", 2, "--set", "eval.compile=true", "--output", tmp_path],
                               capsys)
    assert rc == 0, err
    lines = [x for x in out.splitlines() if x.startswith("eval.compile")]
    assert len(lines) == 1 and "does not work on this machine" in lines[0] and "decoding eager" in lines[0]
    assert json.loads((tmp_path / "metrics.json").read_text())["generation"]["compiled"] is False
    torch._dynamo.reset()
