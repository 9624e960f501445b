"""``train.py --plan`` (finetune.memory_plan): its figures against the real thing, and its bad inputs.

Weights, LoRA, gradients and optimizer state: the plan (meta skeleton, no weights) must equal, byte for
byte, the tensors of a model really built from the same config (real loader, bitsandbytes NF4, LoRA)
after a real AdamW step. Activations: the plan must be within 25% of the measured peak of a real CPU
forward+backward.

How the activation peak is measured: glibc's ``mallinfo2()`` reports the bytes the C heap has handed out
and not taken back (``uordblks``, small chunks, plus ``hblkhd``, mmap'd large ones); PyTorch's CPU
allocator is plain ``posix_memalign``/``free`` with no cache, so every tensor allocation and free moves
that number. A ``TorchDispatchMode`` samples it after every ATen op of the forward and the backward
(the autograd engine runs the backward of a CPU graph on the calling thread, inside the mode), and the
peak minus the value before the step is the activation peak. Gradients are allocated by a warm-up
step first and zeroed in place, so they are not part of the difference (the plan lists them apart).
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import hf_fixtures
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.config import config_from_dict
from finetune.errors import UserError
from finetune.memory_plan import GiB, format_plan, make_plan, parse_memory

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ["Llama-2-7b-hf", "Llama-2-13b-hf", "Llama-2-70b-hf", "Meta-Llama-3-8B", "Mixtral-8x7B-v0.1"]


def _config(model_dir: Path, tmp: Path, **sections: dict) -> object:
    data = tmp / "rows.jsonl"
    data.write_text('{"input_text": "a", "output_text": "b"}\n')
    raw = {"model": {"path": str(model_dir), "device": "cpu"}, "data": {"path": str(data)}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_dict(raw)


def _batch(vocab: int, b: int, t: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones(b, t, dtype=torch.long), "labels": ids.clone()}


def _real_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """The bytes of every tensor the run holds, summed from the live objects (each storage once)."""
    seen: set[int] = set()

    def nbytes(t: torch.Tensor | None) -> int:
        if t is None or t.untyped_storage().data_ptr() in seen:
            return 0
        seen.add(t.untyped_storage().data_ptr())
        return t.untyped_storage().nbytes()

    out = dict(quantized=0, dense=0, lora=0, grads=0, optimizer=0)
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            out["quantized"] += nbytes(p) + nbytes(qs.absmax) + nbytes(qs.code)
            if qs.nested:
                out["quantized"] += nbytes(qs.offset) + nbytes(qs.state2.absmax) + nbytes(qs.state2.code)
        elif p.requires_grad:
            out["lora"] += nbytes(p)
            out["grads"] += nbytes(p.grad)
        else:
            out["dense"] += nbytes(p)
    out["dense"] += sum(nbytes(b) for b in model.buffers())
    out["optimizer"] = sum(nbytes(t) for state in optimizer.state.values() for t in state.values()
                           if isinstance(t, torch.Tensor))
    return out


@pytest.mark.parametrize("variant", [
    dict(),
    dict(lora={"targets": "all-linear", "r": 4, "dropout": 0.0},
         quant={"double_quant": False, "blocksize": 128}),
    dict(lora={"targets": ["q_proj", "v_proj", "down_proj"], "r": 8}, quant={"skip": ["lm_head"]}),
    dict(lora={"enabled": False}, quant={"enabled": False}),  # full training: every weight, fp32
])
def test_weights_lora_optimizer_equal_the_real_allocations_byte_for_byte(tmp_path, one_thread, variant):
    from finetune.modeling import load_model
    from finetune.run.loss import LossSetup, window_backward
    from finetune.run.optim import make_optimizer

    model_dir = hf_fixtures.make_hf_checkpoint(tmp_path / "m", intermediate_size=192)
    cfg = _config(model_dir, tmp_path, **variant)
    model = load_model(cfg, log=None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.train, torch.device("cpu"))
    window_backward(model, model.lm_head, [_batch(512, 2, 16)],
                    setup=LossSetup(ce_chunk_size=cfg.train.ce_chunk_size, device=torch.device("cpu")))
    optimizer.step()
    real = _real_bytes(model, optimizer)
    st = make_plan(cfg, device="cpu").static
    planned = dict(quantized=st.quantized, dense=st.dense, lora=st.lora, grads=st.grads,
                   optimizer=st.optimizer)
    print("real", real, "planned", planned)
    assert planned == real
    assert real["quantized"] > 0 or not cfg.quant.enabled
    assert real["optimizer"] == 2 * real["lora"] + 4 * len(params)


class _HeapPeak(TorchDispatchMode):
    """The largest heap in-use figure seen after any ATen op (see the module docstring)."""

    def __init__(self, in_use) -> None:  # noqa: ANN001
        super().__init__()
        self.in_use, self.peak = in_use, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out


def _heap_in_use():
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2) to read the heap")

    def in_use() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    return in_use


SHAPES = {  # two shapes: GQA 4/2 with a small vocabulary, GQA 8/2 with a wider MLP and more layers
    "h128-L2": dict(model=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
                    batch=4, seq=128),
    "h256-L3": dict(model=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                               num_attention_heads=8, num_key_value_heads=2, vocab_size=1000),
                    batch=2, seq=256),
}


def _bf16_model(model_dir: Path, cfg: object) -> torch.nn.Module:
    """The GPU recipe on the CPU: bf16 frozen base, NF4 computing in bf16, fp32 LoRA, run under autocast.

    ``load_model`` keeps CPU runs in fp32; this builds from the same parts (real loader, quant hook,
    lora.inject) in bf16, so the plan's bf16 branches (fp32 norm copies, fp32 CE) are measured too.
    """
    import llama
    import lora
    import quant

    model = llama.from_pretrained(model_dir, dtype=torch.bfloat16,
                                  linear_hook=quant.make_hook(quant.QuantConfig(compute_dtype=torch.bfloat16)))
    lo = cfg.lora
    lora.inject(model, targets=lo.targets, r=lo.r, alpha=lo.alpha, dropout=lo.dropout)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    return model.train()


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "fp32-full-training"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_activation_estimate_is_within_25_percent_of_the_measured_cpu_peak(tmp_path, one_thread, shape,
                                                                           checkpointing, precision):
    import contextlib

    from finetune.memory_plan import activation_bytes, build_skeleton, model_shape
    from finetune.modeling import load_model
    from finetune.run.loss import LossSetup, window_backward

    in_use = _heap_in_use()
    spec = SHAPES[shape]
    model_dir = hf_fixtures.make_hf_checkpoint(tmp_path / "m", max_position_embeddings=512, **spec["model"])
    full_training = {"lora": {"enabled": False}, "quant": {"enabled": False}}
    full = full_training if precision == "fp32-full-training" else {}
    cfg = _config(model_dir, tmp_path, model={"gradient_checkpointing": checkpointing},
                  data={"max_length": spec["seq"]}, train={"micro_batch_size": spec["batch"]}, **full)
    cpu = torch.device("cpu")
    if precision != "bf16-autocast":  # the CPU run exactly as train.py makes it
        model, amp = load_model(cfg, log=None), contextlib.nullcontext
        planned = make_plan(cfg, device="cpu").activations.peak(checkpointing)
    else:  # CPU dropout keeps its noise in the input's dtype (2 bytes); CUDA's keeps a bool mask
        model, amp = _bf16_model(model_dir, cfg), lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        skeleton, lcfg = build_skeleton(cfg, torch.bfloat16)
        planned = activation_bytes(model_shape(skeleton, lcfg, cfg), batch=spec["batch"], seq=spec["seq"],
                                   ce_chunk_size=cfg.train.ce_chunk_size, act=2, mask=2).peak(checkpointing)
    batch = _batch(spec["model"]["vocab_size"], spec["batch"], spec["seq"])
    setup = LossSetup(ce_chunk_size=cfg.train.ce_chunk_size, device=cpu, autocast=amp)
    window_backward(model, model.lm_head, [batch], setup=setup)  # makes the grads
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    before = in_use()
    with _HeapPeak(in_use) as mode:
        window_backward(model, model.lm_head, [batch], setup=setup)
    measured = mode.peak - before
    print(f"{shape} {precision} checkpointing={checkpointing}: measured {measured / 2**20:.2f} MiB, planned "
          f"{planned / 2**20:.2f} MiB, ratio {planned / measured:.3f}")
    assert abs(planned / measured - 1) <= 0.25


def test_published_configs_plan_on_the_meta_device_in_seconds(tmp_path):
    """The README's models: no weights exist here, the plan needs none; 70B does not fit one 24 GB card."""
    for name in PUBLISHED:
        cfg = _config(ROOT / "configs" / "plan" / name, tmp_path, model={"gradient_checkpointing": True},
                      data={"max_length": 2048})
        plan = make_plan(cfg, gpus=2, gpu_memory=24 * GiB)
        text = format_plan(plan)
        assert [lay.name for lay in plan.layouts] == ["single", "DDP x2", "FSDP x2"]
        fsdp, single = plan.layouts[2], plan.layouts[0]
        assert fsdp.quantized == -(-single.quantized // 2) and fsdp.optimizer == -(-single.optimizer // 2)
        assert plan.layouts[1].comm == single.grads  # DDP's buckets: one more copy of the gradients
        assert "fits in 24.00 GiB?" in text
    seventy = make_plan(_config(ROOT / "configs/plan/Llama-2-70b-hf", tmp_path), gpu_memory=24 * GiB)
    assert not seventy.verdicts[0].fits and "FSDP" in seventy.verdicts[0].advice
    # Llama-2-7B's 4-bit base: 6.48e9 quantised weights at ~4.127 bits
    seven = make_plan(_config(ROOT / "configs/plan/Llama-2-7b-hf", tmp_path), gpu_memory=80 * GiB)
    assert 3.0 * GiB < seven.static.quantized < 3.2 * GiB and seven.verdicts[0].fits


def test_first_change_is_one_that_fits(tmp_path):
    seven = ROOT / "configs/plan/Llama-2-7b-hf"
    cfg = _config(seven, tmp_path, data={"max_length": 2048}, train={"micro_batch_size": 4})
    v = make_plan(cfg, gpu_memory=20 * GiB).verdicts[0]
    assert not v.fits and v.largest_micro_batch == 1
    assert "train.micro_batch_size: 1" in v.advice and "gradient_checkpointing: true" in v.advice
    mixtral = _config(ROOT / "configs/plan/Mixtral-8x7B-v0.1", tmp_path, lora={"targets": "all-linear"},
                      model={"gradient_checkpointing": True})
    advice = make_plan(mixtral, gpu_memory=24 * GiB).verdicts[0].advice
    assert "FSDP over 2 such GPUs" in advice
    assert make_plan(mixtral, gpus=2, gpu_memory=24 * GiB).verdicts[2].fits


def test_parse_memory():
    assert parse_memory("24GiB") == 24 * 2**30 == parse_memory("24 G") == parse_memory("24gib")
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("81559MiB") == 81559 * 2**20
    for bad in ("24", "GiB", "-3GiB", "24 parsecs", "0GB", ""):
        with pytest.raises(UserError, match="e.g. --gpu-memory 24GiB"):
            parse_memory(bad)


# ---------------------------------------------------------------------------------------------------
# the CLI, in subprocesses: exit codes and one-line errors


def _train(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def _yaml(tmp: Path, model_path: Path) -> Path:
    cfg = tmp / "run.yaml"
    cfg.write_text(f"model: {{path: {model_path}}}\ndata: {{path: {tmp / 'absent.jsonl'}, max_length: 64}}\n")
    return cfg


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def test_cli_plan_prints_the_table_without_weights_or_data(tmp_path):
    model = tmp_path / "only-config"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                   **hf_fixtures.TINY_CONFIG}))
    p = _train(str(_yaml(tmp_path, model)), "--plan", "--gpus", "2", "--gpu-memory", "1GiB")
    assert p.returncode == 0, p.stderr
    assert "single" in p.stdout and "DDP x2" in p.stdout and "FSDP x2" in p.stdout
    assert "fits in 1.00 GiB?" in p.stdout and "Traceback" not in p.stderr
    assert "eval.py KV cache" in p.stdout


def test_cli_plan_without_config_json_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_error_line(_train(str(_yaml(tmp_path, empty)), "--plan"))
    assert "config.json" in line


def test_cli_plan_unknown_architecture_is_one_line(tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                   **hf_fixtures.TINY_CONFIG}))
    line = _one_error_line(_train(str(_yaml(tmp_path, model)), "--plan"))
    assert "GPT2LMHeadModel" in line and "not supported" in line


def test_cli_plan_unreadable_gpu_memory_is_one_line_with_an_example(tmp_path):
    line = _one_error_line(_train(str(_yaml(tmp_path, ROOT / "configs/plan/Llama-2-7b-hf")), "--plan",
                                  "--gpu-memory", "24"))
    assert "'24'" in line and "e.g. --gpu-memory 24GiB" in line


def test_cli_gpu_flags_without_plan_are_one_line(tmp_path):
    line = _one_error_line(_train(str(_yaml(tmp_path, ROOT / "configs/plan/Llama-2-7b-hf")), "--gpus", "2"))
    assert "--plan" in line


def test_cli_plan_refuses_what_the_run_would_refuse(tmp_path):
    run_yaml = str(_yaml(tmp_path, ROOT / "configs/plan/Llama-2-7b-hf"))
    line = _one_error_line(_train(run_yaml, "--plan", "--set", "data.max_length=8192"))
    assert "max_length 8192" in line and "4096" in line
    assert "--gpus 0" in _one_error_line(_train(run_yaml, "--plan", "--gpus", "0"))
