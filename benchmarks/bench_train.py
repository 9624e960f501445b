"""Tokens/s and peak memory of one QLoRA training step: ours, and (optionally) HF + PEFT + bitsandbytes.

    python benchmarks/bench_train.py                          # Llama-2-7B shape, random weights, CUDA
    python benchmarks/bench_train.py --compare-hf             # + the same step in transformers/peft/bnb
    python benchmarks/bench_train.py --layers 4               # a 4-layer slice of the 7B shape
    python benchmarks/bench_train.py --checkpoint /models/Llama-2-7b-hf --compare-hf
    python benchmarks/bench_train.py --preset cpu-tiny --compare-hf   # seconds on a CPU (smoke test)

One step is what finetune/run/loop.py does for one micro-batch: autocast forward to the final hidden
states, the loop's own chunked cross-entropy and backward (`finetune.run.loss.window_backward`), grad
clipping, AdamW on the LoRA weights. The base is NF4 with double quantisation (quant), LoRA r=16 on
q/k/v/o (lora), bf16 compute on CUDA and fp32 on CPU, non-reentrant gradient checkpointing on/off.

Random weights (no --checkpoint) are drawn directly on the device, tensor by tensor, and each linear
is quantised as soon as it exists, so the 7B shape needs neither a file nor a dense copy of the model.
With --compare-hf the same random tensors are written once as an HF checkpoint in a temporary folder
so both sides load identical weights through their production loaders (ours: llama.from_pretrained
with the quant hook; HF: from_pretrained with BitsAndBytesConfig), and a parity line shows both
compute the same loss before training.

Reporting as it goes (issue 29): HF runs first, then ours eager, then ours compiled, so each row of
ours completes its pair at once; its ratio and target lines are printed then (a target again when a
faster variant improves it), and --json is rewritten (atomically) after every row. Every import the
run needs is checked at start (one `error:` line naming a missing package); SIGTERM (a timeout) ends the
run with a summary of what ran and `"stopped"` in the JSON.

Peak memory: torch.cuda.max_memory_allocated on CUDA (weights + activations + optimizer, reset per
configuration); on CPU the process's peak resident set (VmHWM, reset per configuration where Linux
allows it), which includes the interpreter and libraries and is only a rough indicator.
Targets (H100, Llama-2-7B, see benchmarks/README.md): ours >= 2.5x HF tokens/s at 4x512 with
checkpointing; <= 5 GiB peak at 1x2048.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama  # noqa: E402
import lora  # noqa: E402
import quant  # noqa: E402

# HF config.json fields (transformers-4.x shape, as published checkpoints have them).
_COMMON = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
               tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=1,
               eos_token_id=2, pad_token_id=None, hidden_act="silu", initializer_range=0.02,
               architectures=["LlamaForCausalLM"], model_type="llama")
SHAPES: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf
    "7b": dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    # the same architecture, small enough for seconds on a CPU
    "tiny": dict(_COMMON, vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),
    # HuggingFaceTB/SmolLM2-135M: GQA 9/3, tied embeddings, a large vocabulary for its size
    "smollm2-135m": dict(_COMMON, vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# cpu-tiny: the runbook's own shapes (so every target line is produced) on the 2-layer model, in seconds
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-tiny": dict(shape="tiny", device="cpu", shapes="1x128,4x512,1x2048", warmup=1, steps=2),
}
GiB = 2**30


# ---------------------------------------------------------------------------------------------------
# environment, timing, memory (bench_generate.py imports these)


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {spec} but no CUDA device is visible; use --device cpu")
    return device


def compute_dtype(device: torch.device, name: str | None) -> torch.dtype:
    """bf16 on CUDA and fp32 on CPU (as the loop does), unless --dtype says otherwise."""
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def env_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (printed, and stored in --json)."""
    info: dict[str, Any] = {
        "machine": platform.platform(), "python": platform.python_version(), "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(), "omp_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "bitsandbytes": _version("bitsandbytes"),
        "transformers": _version("transformers"), "peft": _version("peft"), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name} ({props.total_memory / GiB:.1f} GiB)"
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def print_env(info: dict[str, Any]) -> None:
    print(" | ".join(f"{k} {v}" for k, v in info.items()))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory since the last `reset()`: CUDA allocator peak, or the process's peak RSS on CPU.

    On Linux, writing "5" to /proc/self/clear_refs resets VmHWM (the RSS high-water mark) to the
    current RSS, so each configuration gets its own CPU peak; elsewhere it is the process lifetime's.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB

    def now(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        with contextlib.suppress(OSError):
            return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
        return 0


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def report_leftover(device: torch.device, what: str) -> None:
    """After `what` is freed, say if CUDA memory is still held (it would count in the next peaks)."""
    if device.type == "cuda":
        left = torch.cuda.memory_allocated(device)
        note = "" if left < 2**28 else "; warning: it counts in ours' peak memory (a reference kept alive?)"
        print(f"{what} freed: {left / 2**20:.0f} MiB still allocated{note}")


# ---------------------------------------------------------------------------------------------------
# reporting as the run goes (a timeout keeps what was measured), imports checked before any work


def line_buffered_stdout() -> None:
    """Every line reaches the log when printed, also through `| tee` (a pipe is block-buffered)."""
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]


class Stopped(SystemExit):
    """SIGTERM (what `timeout` sends) turned into an exception, so `finally` blocks still run."""


_SIGTERM_SEEN = False


def stop_on_sigterm() -> None:
    """SIGTERM raises `Stopped` (exit status 143): temporary checkpoints are removed, and the summary
    of what ran is printed and stored. A second SIGTERM (timeout also signals its process group) is
    ignored; `timeout -k` still ends a process whose clean-up hangs. Should library code swallow the
    exception (a compiler wrapping it in its own error), the next `Reporter.update` raises it again."""

    def handler(signum: int, frame: Any) -> None:
        global _SIGTERM_SEEN
        _SIGTERM_SEEN = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stopped(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def check_imports(needs: list[tuple[str, str]]) -> None:
    """Import every module the run will use, now: a missing or broken package ends the run with one
    line naming it, before minutes of loading and measuring (exit status 2)."""
    import importlib

    for module, why in needs:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 -- ImportError, or a package that fails while importing
            package = module.split(".")[0]
            detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            print(f"error: {why} needs the Python package '{package}', which cannot be imported "
                  f"({type(e).__name__}: {detail}); install it (pip install -e '.[test]' has them all) "
                  "and run again", flush=True)
            sys.exit(2)


def check_4bit_kernels(device: torch.device, dtype: torch.dtype) -> None:
    """One tiny NF4 quantise/dequantise on `device`: a bitsandbytes without kernels for it fails here."""
    import bitsandbytes.functional as bf

    try:
        w = torch.randn(64, 64, device=device, dtype=dtype)
        packed, state = bf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
        back = bf.dequantize_4bit(packed, state)
        sync(device)
        if not bool(torch.isfinite(back).all()):
            raise RuntimeError("non-finite dequantised values")
    except Exception as e:  # noqa: BLE001 -- any failure means the 4-bit path cannot run here
        print(f"error: bitsandbytes cannot quantise to NF4 on {device} ({type(e).__name__}: "
              f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})", flush=True)
        sys.exit(2)


def compiled_graphs() -> int:
    """How many graphs torch.compile (dynamo) has made in this process so far (each one is a compile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Reporter:
    """Prints summary lines as soon as they can be computed and keeps --json current.

    `update(results, *extra)` runs `summarise(results, *extra)` (which returns the summary and its
    lines as (key, text) pairs), prints each line whose text is new or changed since it was last
    printed (a target line again when a faster variant of ours improves it), and rewrites --json
    atomically with `"complete": false`. `finish(results, *extra, stopped=...)` prints every line once
    more under a `== summary` heading (the last lines of a log repeat every target) and writes the
    JSON with `"complete"` true, or false and `"stopped"` saying why the run ended early.
    """

    def __init__(self, args: argparse.Namespace, info: dict, cfg: dict,
                 summarise: Callable[..., Any]) -> None:
        self.args, self.info, self.cfg, self.summarise = args, info, cfg, summarise
        self.printed: dict[str, str] = {}

    def update(self, results: list, *extra: Any) -> dict[str, Any]:
        summary, lines = self.summarise(results, *extra)
        self.write(results, summary, complete=False)  # first: a printed line is always in the file too
        for key, text in lines:
            if self.printed.get(key) != text:
                print(text, flush=True)
                self.printed[key] = text
        if _SIGTERM_SEEN:
            raise Stopped(128 + signal.SIGTERM)
        return summary

    def finish(self, results: list, *extra: Any, stopped: str | None = None) -> dict[str, Any]:
        summary, lines = self.summarise(results, *extra)
        head = "== summary" + (f" (stopped early: {stopped}; only the configurations above ran)" if stopped
                               else "") + " =="
        print(head, flush=True)
        for _, text in lines:
            print(text, flush=True)
        self.write(results, summary, complete=stopped is None, stopped=stopped)
        return summary

    def write(self, results: list, summary: dict, complete: bool, stopped: str | None = None) -> None:
        """`--json FILE`: environment, arguments, model, every result row so far and the summary; written
        to a temporary file and renamed, so a kill mid-write leaves the previous complete file."""
        if self.args.json is None:
            return
        data = {"complete": complete, **({"stopped": stopped} if stopped else {}), "env": self.info,
                "args": {k: str(v) for k, v in vars(self.args).items()}, "model": self.cfg,
                "results": [asdict(r) for r in results], **summary}
        self.args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.args.json.with_name(self.args.json.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.args.json)


# ---------------------------------------------------------------------------------------------------
# models: random weights, HF checkpoint writer, our loader, HF's loader


def model_config(shape: str, layers: int | None, dtype: torch.dtype) -> dict[str, Any]:
    cfg = dict(SHAPES[shape], torch_dtype=str(dtype).removeprefix("torch."))
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


def random_tensors(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype,
                   seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a Llama checkpoint with this config, N(0, 0.02) (norms 1), one at a time.

    Drawn on `device` in fp32 and cast, so a given (seed, device type) always yields the same weights;
    both the direct builder and the HF checkpoint writer use this, in the same order.
    """
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(dtype)

    yield "model.embed_tokens.weight", rand(v, h)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)),
                            ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, h)),
                            ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)), ("mlp.down_proj", (h, i))):
            yield p + name + ".weight", rand(*shape)
        yield p + "input_layernorm.weight", torch.ones(h, device=device, dtype=dtype)
        yield p + "post_attention_layernorm.weight", torch.ones(h, device=device, dtype=dtype)
    yield "model.norm.weight", torch.ones(h, device=device, dtype=dtype)
    if not cfg.get("tie_word_embeddings"):
        yield "lm_head.weight", rand(v, h)


def build_random(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Our 4-bit Llama with random weights made on `device`; each linear is quantised as it appears.

    Mirrors what llama.from_pretrained does with the quant hook (meta skeleton, fill, hook per
    linear), minus the file, so a 7B shape costs the 4-bit model plus one dense linear.
    """
    with torch.device("meta"):
        model = llama.Llama(llama.LlamaConfig.from_hf(cfg))
    hook = quant.make_hook(quant.QuantConfig(compute_dtype=dtype))
    for name, t in random_tensors(cfg, device, dtype, seed):
        path, attr = name.rsplit(".", 1)
        module = model.get_submodule(path)
        setattr(module, attr, nn.Parameter(t, requires_grad=False))
        if isinstance(module, nn.Linear):
            new = hook(path, module)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        del t, module
    if cfg.get("tie_word_embeddings"):
        model.tie_weights()  # the embedding was replaced above: point the head at the new one
    model.model.rotary_emb.reset(device)
    return model.eval()


def write_hf_checkpoint(cfg: dict[str, Any], out: Path, device: torch.device, dtype: torch.dtype,
                        seed: int = 0) -> Path:
    """The tensors of `random_tensors` as an HF checkpoint: one safetensors shard per layer + index."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    total, n_files = 0, 0

    def flush() -> None:
        nonlocal total, n_files
        n_files += 1
        file = f"model-{n_files:05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        shard.clear()

    for name, t in random_tensors(cfg, device, dtype, seed):
        shard[name] = t.cpu()
        if name.endswith("post_attention_layernorm.weight") or name == "model.embed_tokens.weight":
            flush()  # one shard per decoder layer (and one for the embedding), as published checkpoints
    flush()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def checkpoint_once(cfg: dict[str, Any], folder: Path, device: torch.device, dtype: torch.dtype,
                    seed: int = 0) -> Path:
    """The random checkpoint in `folder`: written the first time, reused after (by either script).

    A folder holding another shape is refused rather than silently benchmarked.
    """
    done = folder / "model.safetensors.index.json"
    if done.is_file():
        have = json.loads((folder / "config.json").read_text())
        if have != cfg:
            diff = sorted(k for k in set(have) | set(cfg) if have.get(k) != cfg.get(k))
            sys.exit(f"error: --checkpoint-dir {folder} holds another model ({', '.join(diff)} differ); "
                     "use an empty folder")
        print(f"reusing the random checkpoint in {folder}")
        return folder
    t0 = time.perf_counter()
    write_hf_checkpoint(cfg, folder, device, dtype, seed)  # the index is written last: a complete write
    print(f"wrote random weights ({cfg['num_hidden_layers']} layers) to {folder} in "
          f"{time.perf_counter() - t0:.1f} s (reused by later runs with --checkpoint-dir {folder})")
    return folder


def load_ours(path: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The production path: stream the HF checkpoint, quantise each linear as it arrives."""
    return llama.from_pretrained(path, device=device, dtype=dtype, linear_hook=quant.nf4(compute_dtype=dtype))


def hf_bnb_config(dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def bnb_reference_cpu_path() -> None:
    """Keep bitsandbytes' CPU 4-bit layers on their dequantise-then-matmul path (compute dtype as asked).

    On CPUs with AVX512-BF16, bitsandbytes >= 0.49 repacks a Linear4bit in eval mode and runs a fused
    bf16 kernel instead: it computes in bf16 whatever the dtype asked for, and rejects output widths
    that are not a multiple of its tile ("N must be divisible by block_n"). The HF side of a
    comparison must run the same maths as ours, on every CPU.
    """
    import bitsandbytes.nn.modules as bnb_modules

    bnb_modules.has_avx512bf16 = lambda: False


def load_hf(path: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """transformers' LlamaForCausalLM, 4-bit NF4 + double quant through its bitsandbytes integration."""
    import transformers
    from transformers import AutoModelForCausalLM

    bnb_reference_cpu_path()

    transformers.utils.logging.disable_progress_bar()  # keep the benchmark's output a table

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    where = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}" \
        if device.type == "cuda" else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return AutoModelForCausalLM.from_pretrained(
            str(path), quantization_config=hf_bnb_config(dtype), device_map={"": where},
            attn_implementation="sdpa", **{dtype_kw: dtype})


def hf_set_checkpointing(model: nn.Module, on: bool) -> None:
    """Non-reentrant gradient checkpointing on/off (transformers 5 renamed the methods)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if on:
            if hasattr(base, "activation_checkpointing_enable"):
                base.activation_checkpointing_enable({"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()
    base.config.use_cache = False


# ---------------------------------------------------------------------------------------------------
# the measured step


@dataclass
class Result:
    impl: str  # ours | hf
    batch: int
    seq_len: int
    grad_ckpt: bool
    status: str = "ok"  # ok | oom | error: ...
    tokens_per_s: float = math.nan  # real (non-padding) input tokens per second
    ms_per_step: float = math.nan
    peak_bytes: int = 0
    tokens: int = 0  # real tokens processed in the timed steps
    loss: float = math.nan  # of the last timed step
    warmup_s: float = math.nan  # the untimed steps (compiling, for ours+compile)
    graphs: int = 0  # graphs torch.compile had made in this process after this configuration

    @property
    def key(self) -> tuple[int, int, bool]:
        return self.batch, self.seq_len, self.grad_ckpt


def make_batch(batch: int, seq_len: int, vocab: int, pad_frac: float, seed: int) -> dict[str, torch.Tensor]:
    """A right-padded batch as the collator makes it (CPU tensors); labels = inputs, -100 on padding.

    Row 0 always has the full length; with pad_frac > 0 the other rows keep a random
    (1 - pad_frac) .. 1 fraction of their tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if pad_frac > 0:
        low = max(2, int(seq_len * (1 - pad_frac)))
        for r in range(1, batch):
            mask[r, int(torch.randint(low, seq_len + 1, (1,), generator=gen)):] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def autocast_for(device: torch.device, dtype: torch.dtype) -> Callable[[], contextlib.AbstractContextManager]:
    if device.type == "cuda" and dtype != torch.float32:
        return lambda: torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext


def optimizer_for(params: list[nn.Parameter], device: torch.device, lr: float) -> torch.optim.Optimizer:
    """The loop's default optimizer (finetune.run.optim.make_optimizer: AdamW, fused on CUDA)."""
    from finetune.config import TrainConfig
    from finetune.run.optim import make_optimizer

    return make_optimizer(params, TrainConfig(lr=lr), device)


def ours_step_fn(model: nn.Module, device: torch.device, amp: Callable, ce_chunk: int,
                 opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> Callable[[dict], torch.Tensor]:
    from finetune.run.loss import LossSetup, window_backward

    setup = LossSetup(ce_chunk_size=ce_chunk, device=device, autocast=amp)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ws = window_backward(model, model.lm_head, [batch], setup=setup)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return ws.loss_sum / max(ws.target_tokens, 1)

    return step


def hf_step_fn(model: nn.Module, device: torch.device, amp: Callable, opt: torch.optim.Optimizer,
               params: list[nn.Parameter]) -> Callable[[dict], torch.Tensor]:
    """What HF's Trainer does per micro-batch: model(..., labels=) (mean CE), backward, clip, AdamW."""

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with amp():
            loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure(impl: str, step: Callable[[dict], torch.Tensor], batch: dict[str, torch.Tensor], grad_ckpt: bool,
            warmup: int, steps: int, device: torch.device, mem: PeakMemory) -> Result:
    B, T = batch["input_ids"].shape
    res = Result(impl, B, T, grad_ckpt)
    mem.reset()
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            step(batch)
        sync(device)
        res.warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step(batch)
        sync(device)
        seconds = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        res.status = "oom"
        return res
    except RuntimeError as e:  # e.g. a kernel that does not exist for this dtype/device
        res.status = f"error: {str(e).splitlines()[0][:120]}"
        return res
    finally:
        res.peak_bytes = mem.peak()
        res.graphs = compiled_graphs()
    res.tokens = int(batch["attention_mask"].sum()) * steps
    res.tokens_per_s = res.tokens / seconds
    res.ms_per_step = seconds / steps * 1e3
    res.loss = float(loss)
    return res


def parity_loss(impl: str, model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                amp: Callable) -> float:
    """Mean next-token CE of `batch` at LoRA init (B = 0, so the base model's loss), no grad."""
    from finetune.run.loss import chunked_ce_sum, device_mask

    with torch.no_grad(), amp():
        ids = batch["input_ids"].to(device)
        if impl == "hf":
            return float(model(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                               labels=batch["labels"].to(device)).loss)
        hidden = model(ids, attention_mask=device_mask(batch["attention_mask"], device), hidden_only=True)
        total, n = chunked_ce_sum(model.lm_head, hidden, batch["labels"].to(device), chunk_size=1024)
        return float(total) / max(n, 1)


# ---------------------------------------------------------------------------------------------------
# main


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(n) for n in part.lower().split("x")) for part in text.split(",") if part.strip()]
    except ValueError:
        out = []
    if not out or any(len(s) != 2 or min(s) < 1 for s in out):
        sys.exit(f"error: --shapes {text!r} is not a list of BATCHxSEQ like 1x128,4x512")
    return out  # type: ignore[return-value]


def parse_common(ap: argparse.ArgumentParser, argv: list[str] | None, presets: dict[str, dict],
                 compare_help: str) -> argparse.Namespace:
    """The options both benchmark scripts share, then parse with `--preset`'s values as defaults."""
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="compute dtype (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--compare-hf", action="store_true", help=compare_help)
    ap.add_argument("--tmp-dir", type=Path, default=None,
                    help="where --compare-hf writes the random HF checkpoint (7B: ~13 GiB; deleted after)")
    ap.add_argument("--checkpoint-dir", type=Path, default=None,
                    help="write the random HF checkpoint here once and reuse it in later runs (both scripts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write environment + results here")
    ap.add_argument("--preflight", action="store_true",
                    help="only check that every package this run needs imports and that the 4-bit kernels "
                         "run on the device, then exit (0 = ready)")
    first, _ = ap.parse_known_args(argv)
    if first.preset:
        ap.set_defaults(**presets[first.preset])
    return ap.parse_args(argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="defaults for a quick run (flags still override)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="model shape of the random weights")
    ap.add_argument("--layers", type=int, default=None, help="cut the shape to N decoder layers")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="a real HF Llama dir (safetensors) instead of random weights")
    ap.add_argument("--shapes", default="1x128,4x512,1x2048", help="micro-batch x sequence length list")
    ap.add_argument("--grad-ckpt", default="on,off", help="gradient checkpointing modes to run: on,off")
    ap.add_argument("--pad-frac", type=float, default=0.0,
                    help="rows after the first keep a random (1-F)..1 of their tokens (0 = no padding)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ce-chunk-size", type=int, default=1024, help="the loop's train.ce_chunk_size")
    ap.add_argument("--compile", default=None,
                    help="ours with train.compile (each decoder layer compiled): off | on | off,on "
                         "(default off,on on CUDA, off on CPU)")
    ap.add_argument("--only-checkpoint", action="store_true",
                    help="after the preflight, only write the random checkpoint to --checkpoint-dir; exit")
    args = parse_common(ap, argv, PRESETS, "also run transformers + peft + bitsandbytes on the same weights")
    if args.only_checkpoint and args.checkpoint_dir is None:
        ap.error("--only-checkpoint needs --checkpoint-dir")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if not set(args.grad_ckpt.replace(" ", "").split(",")) <= {"on", "off"}:
        ap.error(f"--grad-ckpt {args.grad_ckpt!r}: use on, off or on,off")
    return args


def fmt_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def print_row(r: Result) -> None:
    shape = f"{r.batch}x{r.seq_len}"
    if r.status != "ok":
        print(f"{r.impl:<12} {shape:>7} ckpt={'on ' if r.grad_ckpt else 'off'}  {r.status}"
              f"  (peak {fmt_bytes(r.peak_bytes)})", flush=True)
        return
    compiled = f", {r.graphs} graphs compiled so far" if r.impl.endswith("compile") else ""
    print(f"{r.impl:<12} {shape:>7} ckpt={'on ' if r.grad_ckpt else 'off'} {r.tokens_per_s:>10.0f} tok/s "
          f"{r.ms_per_step:>9.1f} ms/step  peak {fmt_bytes(r.peak_bytes):>10}  loss {r.loss:.4f}  "
          f"(warmup {r.warmup_s:.1f} s{compiled})", flush=True)


def compile_variants(args: argparse.Namespace, device: torch.device) -> list[bool]:
    """Ours eager and/or with train.compile, as --compile says (default off,on on CUDA, off on CPU)."""
    spec = args.compile or ("off,on" if device.type == "cuda" else "off")
    return [m.strip() == "on" for m in spec.split(",")]


def run_impl(impl: str, model: nn.Module, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
             vocab: int, mem: PeakMemory, results: list[Result], parity: dict[str, float],
             report: Callable[[], Any]) -> None:
    """LoRA on the model, its parity loss, then every (compile, checkpointing, shape) configuration.

    Each row is appended to `results` and `parity[impl]` is set as soon as it is known; `report()`
    runs after each, so its lines and the JSON never wait for the remaining configurations.
    """
    amp = autocast_for(device, dtype)
    shapes, modes = parse_shapes(args.shapes), [m.strip() == "on" for m in args.grad_ckpt.split(",")]
    torch.manual_seed(args.seed)
    if impl == "ours":
        stats = lora.inject(model, targets=LORA_TARGETS, r=args.r, alpha=args.alpha,
                            dropout=args.lora_dropout)
        print(f"ours: {stats}; {quant.memory_report(model)}")
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # peft's QLoRA recipe: upcast the dense (non-4-bit) weights to fp32, checkpointing on
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
            lc = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.lora_dropout,
                            target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
            model = get_peft_model(model, lc)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"hf: peft LoRA, trainable params {trainable:,}")
    parity[impl] = parity_loss(impl, model, make_batch(2, min(64, shapes[0][1]), vocab, 0.0, args.seed + 1),
                               device, amp)
    report()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer_for(params, device, args.lr)
    step = (ours_step_fn(model, device, amp, args.ce_chunk_size, opt, params) if impl == "ours"
            else hf_step_fn(model, device, amp, opt, params))
    variants = compile_variants(args, device) if impl == "ours" else [False]
    for compiled in variants:
        name = impl
        if compiled:
            from finetune.compiling import compile_decoder_layers

            print(f"ours+compile: compiling each decoder layer (graphs so far: {compiled_graphs()})")
            if not compile_decoder_layers(model, device, what="--compile on"):
                continue
            name = "ours+compile"
        for on in modes:
            if impl == "ours":
                model.gradient_checkpointing = on
            else:
                hf_set_checkpointing(model, on)
            for B, T in shapes:
                batch = make_batch(B, T, vocab, args.pad_frac, args.seed + B * 100003 + T)
                row = measure(name, step, batch, on, args.warmup, args.steps, device, mem)
                print_row(row)
                results.append(row)
                report()
                free(device)
        if compiled:
            for layer in model.model.layers:
                layer._compiled_call_impl = None  # back to eager for whatever runs next
    del opt, step, params


def imports_needed(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str]]:
    """Every module this run will import later (checked at start by `check_imports`)."""
    needs = [("bitsandbytes", "the 4-bit base"), ("safetensors.torch", "the random checkpoint"),
             ("finetune.run.loss", "the training step"), ("finetune.run.optim", "the optimizer"),
             ("finetune.config", "the optimizer settings")]
    if any(compile_variants(args, device)):
        needs.append(("finetune.compiling", "--compile on"))
        if device.type == "cuda":
            needs.append(("triton", "--compile on (inductor on CUDA)"))
    if args.compare_hf:
        needs += [("transformers", "--compare-hf"), ("peft", "--compare-hf"),
                  ("accelerate", "--compare-hf (transformers' bitsandbytes loading)")]
    return needs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    line_buffered_stdout()
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = compute_dtype(device, args.dtype)
    info = env_info(device)
    print_env(info)
    check_imports(imports_needed(args, device))
    check_4bit_kernels(device, dtype)
    if args.preflight:
        print("preflight: every package this run needs imports; NF4 kernels run on", device)
        return {}
    if args.only_checkpoint:
        checkpoint_once(model_config(args.shape, args.layers, dtype), args.checkpoint_dir, device, dtype,
                        args.seed)
        return {}
    stop_on_sigterm()
    mem = PeakMemory(device)
    tmp: Path | None = None
    path = args.checkpoint
    results: list[Result] = []
    parity: dict[str, float] = {}
    reporter: Reporter | None = None
    stopped: str | None = None
    done = False
    summary: dict[str, Any] = {}
    try:
        if path is None:
            cfg = model_config(args.shape, args.layers, dtype)
            if args.checkpoint_dir is not None:
                path = checkpoint_once(cfg, args.checkpoint_dir, device, dtype, args.seed)
            elif args.compare_hf:
                tmp = Path(tempfile.mkdtemp(prefix="bench_train_", dir=args.tmp_dir))
                t0 = time.perf_counter()
                path = write_hf_checkpoint(cfg, tmp / "model", device, dtype, args.seed)
                print(f"wrote random {args.shape} weights ({cfg['num_hidden_layers']} layers) to {path} "
                      f"in {time.perf_counter() - t0:.1f} s")
        else:
            cfg = json.loads((path / "config.json").read_text())
            if args.layers is not None:
                print("note: --layers is ignored with --checkpoint")
        print(f"model: hidden {cfg['hidden_size']}, layers {cfg['num_hidden_layers']}, heads "
              f"{cfg['num_attention_heads']}/{cfg.get('num_key_value_heads')}, intermediate "
              f"{cfg['intermediate_size']}, vocab {cfg['vocab_size']}; NF4+DQ base, LoRA r={args.r} on "
              f"{','.join(LORA_TARGETS)}, compute {str(dtype).removeprefix('torch.')}, {args.warmup} "
              f"warmup + {args.steps} timed steps; peak = {mem.kind}")
        reporter = Reporter(args, info, cfg, lambda rows, par: summarise(rows, par, device, args.shape))

        def report() -> None:
            reporter.update(results, parity)

        # HF first: then each row of ours completes its pair at once and prints its ratio and target
        # lines, eager before compiled, so a run cut short (a timeout mid-compile) still has them.
        if args.compare_hf:
            mem.reset()
            t0 = time.perf_counter()
            model = load_hf(path, device, dtype)
            sync(device)
            print(f"hf: model ready in {time.perf_counter() - t0:.1f} s, {fmt_bytes(mem.now())} now")
            run_impl("hf", model, args, device, dtype, cfg["vocab_size"], mem, results, parity, report)
            del model
            free(device)
            report_leftover(device, "hf model")
        mem.reset()
        t0 = time.perf_counter()
        if path is None:
            model = build_random(cfg, device, dtype, args.seed)
        else:
            model = load_ours(path, device, dtype)
        sync(device)
        print(f"ours: model ready in {time.perf_counter() - t0:.1f} s, {fmt_bytes(mem.now())} now "
              f"(peak while loading {fmt_bytes(mem.peak())})")
        run_impl("ours", model, args, device, dtype, cfg["vocab_size"], mem, results, parity, report)
        del model
        free(device)
        done = True
    except Stopped:
        stopped = "SIGTERM (a timeout?)"
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if reporter is not None:
            if not done and stopped is None:
                stopped = "an error (its traceback follows)"
            summary = reporter.finish(results, parity, stopped=stopped)
    return {"results": results, **summary}


def verdict(ok: bool, gpu_7b: bool) -> str:
    """PASS/FAIL, marked when the run is not the target's conditions (a 7B shape on a GPU)."""
    return ("PASS" if ok else "FAIL") + ("" if gpu_7b else " (not 7B on a GPU: indicative only)")


def summarise(results: list[Result], parity: dict[str, float], device: torch.device,
              shape: str = "7b") -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Ratios ours/HF per configuration and a PASS/FAIL line per target (the targets mean a 7B on a GPU).

    Targets (with gradient checkpointing): tokens/s >= 5x HF at 1x128, >= 2.5x at 4x512 and 1x2048;
    peak memory at 1x2048 <= HF's and <= 5 GiB. The best of ours (eager or compiled) so far is compared.
    Works on any subset of the rows (a run still going, or cut short); returns the summary for --json
    and its lines as (key, text), the key naming what the line is about.
    """
    hf = {r.key: r for r in results if r.impl == "hf" and r.status == "ok"}
    ours: dict[tuple[int, int, bool], Result] = {}
    for r in results:
        if r.impl.startswith("ours") and r.status == "ok":
            if r.key not in ours or r.tokens_per_s > ours[r.key].tokens_per_s:
                ours[r.key] = r
    lines: list[tuple[str, str]] = []
    ratios = {}
    if "hf" in parity and "ours" in parity:
        diff = abs(parity["ours"] - parity["hf"])
        lines.append(("parity", "parity (base-model loss at LoRA init, same batch): "
                                f"ours {parity['ours']:.5f}  hf {parity['hf']:.5f}  diff {diff:.2e}"))
    for r in results:
        h = hf.get(r.key)
        if r.impl != "hf" and h is not None and r.status == "ok":
            name = f"{r.impl} {r.batch}x{r.seq_len} ckpt={'on' if r.grad_ckpt else 'off'}"
            ratios[name] = r.tokens_per_s / h.tokens_per_s
            lines.append((f"ratio {name}", f"speed ratio {name:<32} {ratios[name]:6.2f}x hf"))
    gpu_7b = device.type == "cuda" and shape == "7b"
    checks: dict[str, Any] = {}
    for (B, T), want in (((1, 128), 5.0), ((4, 512), 2.5), ((1, 2048), 2.5)):
        key = (B, T, True)
        head = f"target {B}x{T} ckpt=on tokens/s >= {want}x hf"
        if key in ours and key in hf:
            ratio = ours[key].tokens_per_s / hf[key].tokens_per_s
            checks[f"speed_{B}x{T}"] = {"ratio": ratio, "want": want, "pass": ratio >= want,
                                        "impl": ours[key].impl}
            lines.append((head, f"{head}: {ratio:.2f}x ({ours[key].impl}) {verdict(ratio >= want, gpu_7b)}"))
        elif key in ours and "hf" not in parity:
            lines.append((head, f"{head}: not measured (run with --compare-hf)"))
    big = ours.get((1, 2048, True))
    if big is not None:
        gib = big.peak_bytes / GiB
        h = hf.get((1, 2048, True))
        ok = gib <= 5.0 and (h is None or big.peak_bytes <= h.peak_bytes)
        than_hf = f", hf {h.peak_bytes / GiB:.2f} GiB" if h is not None else " (hf not measured)"
        checks["peak_1x2048"] = {"gib": gib, "hf_gib": h.peak_bytes / GiB if h else None, "pass": ok}
        head = "target peak at 1x2048 ckpt=on <= hf and <= 5 GiB"
        lines.append((head, f"{head}: {gib:.2f} GiB{than_hf} {verdict(ok, gpu_7b)}"))
    return {"parity_loss": dict(parity), "ratios": ratios, "targets": checks}, lines


if __name__ == "__main__":
    main()
