"""The GPU-only paths, each on a tiny fixture Llama in seconds, so the first GPU run finds what breaks.

Every test here is marked `gpu` (skipped without CUDA, with the reason, by tests/conftest.py); all of
them together run in one short call (`bash benchmarks/gpu_check.sh` runs them first), the ones without
a compile or a second process first, so a timeout still leaves their verdicts. Each compares
the GPU path with its plain eager or CPU counterpart, or checks the one property the path is for:
- a pre-quantised model loaded on CPU and moved with `.to("cuda")` computes what it computed on CPU
  and what the same file loaded straight onto the GPU computes;
- bf16 autocast with fused AdamW trains (the loss falls, adapters stay fp32 and finite);
- fp16 autocast with the GradScaler takes real optimizer steps;
- bitsandbytes' 8-bit AdamW keeps 8-bit moments and trains;
- the compiled decode step (CUDA graphs) generates the eager tokens, recorded and replayed;
- three compiled training steps (train.compile: each decoder layer, NF4 + LoRA, checkpointing) give
  the eager losses;
- two NCCL ranks (`torchrun train.py`) train when two GPUs are present.
The models are fp32 wherever the comparison must be tight, so a difference means a bug, not rounding.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import hf_fixtures
import pytest
import torch
import torch.nn.functional as F

import llama
import lora
import quant

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.device("cuda")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama of tests/hf_fixtures.py (2 layers, hidden 64, GQA 4/2, vocab 512), fp32."""
    return hf_fixtures.make_hf_checkpoint(tmp_path_factory.mktemp("gpu_tiny"))


def qlora_model(path: Path, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """NF4 base on the GPU (quantised while loading, as train.py does), LoRA r=8 on q/k/v/o, no dropout."""
    model = llama.from_pretrained(path, device=CUDA, dtype=dtype, linear_hook=quant.nf4(compute_dtype=dtype))
    torch.manual_seed(seed)  # the LoRA A initialisation
    lora.inject(model, targets=TARGETS, r=8, alpha=16, dropout=0.0)
    return model


def lora_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def token_batch(batch: int = 2, seq: int = 32, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(CUDA)


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `ids` (no padding), in fp32."""
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, steps: int,
                autocast_dtype: torch.dtype | None = None) -> list[float]:
    """`steps` plain optimizer steps on one batch (forward, backward, AdamW); the loss of each."""
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = next_token_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def compiler_works() -> None:
    from finetune.compiling import compiler_problem

    problem = compiler_problem(CUDA)
    if problem:
        pytest.fail(f"torch.compile does not work on this GPU machine: {problem}")


def test_prequantised_model_moved_to_cuda_computes_as_on_cpu(model_dir: Path, tmp_path: Path) -> None:
    qc = quant.QuantConfig(compute_dtype=torch.float32)
    cpu_model = llama.from_pretrained(model_dir, linear_hook=quant.make_hook(qc))
    saved = quant.save_quantized(cpu_model, tmp_path / "nf4", qc)

    def skeleton() -> torch.nn.Module:
        with torch.device("meta"):
            return llama.Llama(cpu_model.config)

    moved = quant.load_quantized(skeleton(), saved, qc, device="cpu").to("cuda")
    direct = quant.load_quantized(skeleton(), saved, qc, device="cuda")
    four_bit = [m for m in moved.modules() if isinstance(m, quant.Linear4bit)]
    assert four_bit and all(m.weight.device.type == "cuda" for m in four_bit)
    assert all(m.weight.quant_state.absmax.device.type == "cuda" for m in four_bit)  # the stats moved too
    ids = token_batch(seed=3).cpu()
    with torch.no_grad():
        want = cpu_model(ids)
        got = moved(ids.to(CUDA))
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got, direct(ids.to(CUDA)))


def test_bf16_autocast_with_fused_adamw_trains(model_dir: Path) -> None:
    from finetune.config import TrainConfig
    from finetune.run.optim import make_optimizer, make_precision

    model = qlora_model(model_dir, torch.bfloat16)
    model.train()
    params = lora_params(model)
    opt = make_optimizer(params, TrainConfig(lr=1e-2), CUDA)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    precision = make_precision(TrainConfig(amp="bf16"), "bfloat16", CUDA)
    assert precision.label == "bf16" and not precision.scaler.is_enabled()
    ids = token_batch()
    losses = []
    for _ in range(5):
        with precision.autocast():
            loss = next_token_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in params)


def test_fp16_autocast_with_grad_scaler_takes_optimizer_steps(model_dir: Path) -> None:
    from finetune.config import TrainConfig
    from finetune.run.optim import make_optimizer, make_precision

    model = qlora_model(model_dir, torch.float16)
    model.train()
    params = lora_params(model)
    opt = make_optimizer(params, TrainConfig(lr=1e-2), CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "train.amp=fp16: ... prefer bf16"
        precision = make_precision(TrainConfig(amp="fp16"), "float16", CUDA)
    scaler = precision.scaler
    assert precision.label == "fp16" and scaler.is_enabled()
    ids = token_batch()
    b_weights = [p for n, p in model.named_parameters() if n.endswith("lora_B.weight")]
    assert b_weights and all(bool((p == 0).all()) for p in b_weights)  # PEFT's init: B = 0
    losses = []
    for _ in range(6):  # a first step may be skipped while the scale adapts (an overflow halves it)
        with precision.autocast():
            loss = next_token_loss(model, ids)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert 0 < scaler.get_scale() < float("inf")
    assert any(bool((p != 0).any()) for p in b_weights)  # at least one step was applied
    assert all(bool(torch.isfinite(p).all()) for p in params)
    assert losses[-1] < losses[0], losses


def test_adamw8bit_keeps_8bit_moments_and_trains(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    from finetune.config import TrainConfig
    from finetune.run.optim import make_optimizer

    # hidden 256 and r=16: q_proj's LoRA A (16 x 256) and B (256 x 16) have 4096 values each, bitsandbytes'
    # threshold for 8-bit state (smaller tensors, like k_proj's B here, keep 32-bit moments)
    path = hf_fixtures.make_hf_checkpoint(tmp_path / "wide", hidden_size=256, intermediate_size=512)
    model = llama.from_pretrained(path, device=CUDA, dtype=torch.bfloat16,
                                  linear_hook=quant.nf4(compute_dtype=torch.bfloat16))
    torch.manual_seed(0)
    lora.inject(model, targets=TARGETS, r=16, alpha=32, dropout=0.0)
    model.train()
    params = lora_params(model)
    opt = make_optimizer(params, TrainConfig(optimizer="adamw8bit", lr=1e-2), CUDA)
    assert isinstance(opt, bnb.optim.AdamW8bit)
    losses = train_steps(model, opt, token_batch(), steps=5, autocast_dtype=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    moments = [opt.state[p]["state1"] for p in params if p.numel() >= 4096]
    assert moments and all(m.dtype == torch.uint8 for m in moments)


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_cuda_graph_decode_generates_the_eager_tokens(model_dir: Path, base: str) -> None:
    compiler_works()
    torch._dynamo.reset()
    hook = quant.nf4(compute_dtype=torch.float32) if base == "nf4" else None
    model = llama.from_pretrained(model_dir, device=CUDA, dtype=torch.float32, linear_hook=hook)
    prompts = [[1, 45, 300, 17, 9, 88], [1, 5], [1, 400, 401]]  # ragged: left padding in the batch
    eager = llama.generate_ids(model, prompts, max_new_tokens=12, eos_id=[])
    first = llama.generate_ids(model, prompts, max_new_tokens=12, eos_id=[], compile=True)  # compile, record
    again = llama.generate_ids(model, prompts, max_new_tokens=12, eos_id=[], compile=True)  # replay
    assert [len(row) for row in eager] == [12, 12, 12]
    assert first == eager and again == eager


def test_three_compiled_training_steps_give_the_eager_losses(model_dir: Path) -> None:
    from finetune.compiling import compile_decoder_layers

    compiler_works()
    torch._dynamo.reset()
    ids = token_batch()
    losses = {}
    for compiled in (False, True):
        model = qlora_model(model_dir, torch.float32, seed=0)
        model.gradient_checkpointing = True
        model.train()
        if compiled:
            assert compile_decoder_layers(model, CUDA)
        opt = torch.optim.AdamW(lora_params(model), lr=1e-2)
        losses[compiled] = train_steps(model, opt, ids, steps=3)
    eager, compiled = losses[False], losses[True]
    assert eager[2] < eager[0]  # the steps did something the comparison can see
    assert compiled == pytest.approx(eager, rel=1e-3), (compiled, eager)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL between two ranks)")
def test_two_nccl_ranks_train(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "finetune"))
    from train_testlib import cli_env, run_config, write_csv, write_yaml

    model = hf_fixtures.make_hf_checkpoint(tmp_path / "model", tokenizer=True)
    data = write_csv(tmp_path / "data.csv")
    cfg = run_config(model, data, tmp_path / "run", model={"device": "cuda", "dtype": "bfloat16"},
                     quant={"enabled": True}, lora={"dropout": 0.0},
                     train={"max_steps": 2, "eval_steps": 2, "save_steps": 2,
                            "gradient_accumulation_steps": 1})
    config = write_yaml(tmp_path / "ddp.yaml", cfg)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*launcher, str(ROOT / "train.py"), str(config), "--no-progress"], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
