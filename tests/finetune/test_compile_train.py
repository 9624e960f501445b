"""train.compile: compiled decoder layers give the eager losses; without a compiler, eager + one warning.

The runs are the real loop (finetune.run.loop.train) on the tiny fixture Llama with real bitsandbytes NF4
base weights, LoRA and gradient checkpointing, on CPU inductor (fp32). Dropout is 0 so the compiled
and eager runs draw no random numbers that could differ.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch._inductor import config as inductor_config

sys.path.insert(0, str(Path(__file__).parent))
from train_testlib import run_config, train_losses, write_csv  # noqa: E402

from finetune.compiling import compiler_problem  # noqa: E402
from finetune.config import config_from_dict  # noqa: E402
from finetune.run.loop import train  # noqa: E402

# Inductor reorders fp32 sums inside a fused kernel; over 5 optimizer steps the losses stay this close.
REL_TOL = 1e-4


@pytest.fixture
def one_layer_dir(make_checkpoint) -> Path:
    """One decoder layer, micro-batches of 1 (no padding mask): few distinct graphs to compile on 2 cores."""
    return make_checkpoint(num_hidden_layers=1, tokenizer=True)


def qlora_config(model_dir: Path, tmp_path: Path, name: str, compile: bool):  # noqa: ANN201
    data = write_csv(tmp_path / "data.csv")
    cfg = run_config(model_dir, data, tmp_path / name, quant={"enabled": True},
                     model={"gradient_checkpointing": True}, lora={"dropout": 0.0, "targets": "all-linear"},
                     train={"max_steps": 5, "save_steps": 5, "eval_steps": 5, "compile": compile,
                            "micro_batch_size": 1})
    cfg["data"].update(train_size=12, test_size=0)
    return config_from_dict(cfg)


@pytest.mark.slow  # inductor compiles a forward and a backward graph (~30 s on 2 cores)
def test_compiled_training_gives_the_eager_losses(one_layer_dir, tmp_path, one_thread, capsys):
    reason = compiler_problem("cpu")
    if reason:
        pytest.skip(f"torch.compile unavailable: {reason}")
    torch._dynamo.reset()
    train(qlora_config(one_layer_dir, tmp_path, "eager", False), progress=False)
    capsys.readouterr()
    result = train(qlora_config(one_layer_dir, tmp_path, "compiled", True), progress=False)
    assert "each decoder layer is compiled" in capsys.readouterr().out
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert [s for s, _ in compiled] == [1, 2, 3, 4, 5] == [s for s, _ in eager]
    for (_, a), (_, b) in zip(compiled, eager):
        assert abs(a - b) <= REL_TOL * abs(b), (compiled, eager)
    assert result.final_dir is not None and (result.final_dir / "adapter_model.safetensors").is_file()


def test_compile_without_a_working_compiler_trains_eager_with_one_warning(tiny_model_dir, tmp_path,
                                                                          one_thread):
    # A real broken toolchain: inductor is pointed at a C++ compiler that does not exist.
    torch._dynamo.reset()
    broken = inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False})
    with broken, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(qlora_config(tiny_model_dir, tmp_path, "fallback", True), progress=False)
    ours = [str(w.message) for w in caught if "train.compile" in str(w.message)]
    assert len(ours) == 1 and "\n" not in ours[0], ours
    assert "torch.compile does not work on this machine" in ours[0] and "running eager" in ours[0]
    assert result.step == 5 and len(train_losses(tmp_path / "fallback")) == 5
    torch._dynamo.reset()
