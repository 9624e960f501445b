"""New tokens/s of batched greedy generation with the KV cache on the 4-bit model: ours vs HF `generate`.

    python benchmarks/bench_generate.py --compare-hf                  # Llama-2-7B shape, random weights
    python benchmarks/bench_generate.py --compare-hf --prompts 16 --prompt-len 256 --new-tokens 64
    python benchmarks/bench_generate.py --checkpoint /models/Llama-2-7b-hf --compare-hf --lora
    python benchmarks/bench_generate.py --preset cpu-tiny --compare-hf   # seconds on a CPU (smoke test)

Ours is `llama.generate_ids` (one prefill over the left-padded batch, then one decode step per
token into preallocated caches), with and without `compile=True` (torch.compile of the decode
step). HF is `model.generate` of transformers' LlamaForCausalLM loaded 4-bit through its
bitsandbytes integration (NF4, double quant, same compute dtype), from the same weights. Both run
greedy with EOS disabled (ours `eos_id=[]`, HF `min_new_tokens = max_new_tokens`) so every row
produces exactly --new-tokens tokens; tokens/s counts those new tokens over the whole call
(prefill included). `--lora` adds unmerged LoRA r=16 on q/k/v/o on both sides, as eval.py runs a
trained adapter. Prompts are random ids; with --ragged (default) their lengths spread from
--prompt-len down to half of it, so left padding is exercised.

The agreement line (rows whose greedy tokens are identical, ours vs HF) shows that both decode the
same model; in fp32 on CPU they should agree, in bf16 near-ties may flip late tokens.
Target (H100, Llama-2-7B, see benchmarks/README.md): ours >= 10x HF new tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402  (shared: shapes, random weights, loaders, memory)

import llama  # noqa: E402
import lora  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "cpu-tiny": dict(shape="tiny", device="cpu", prompts=4, prompt_len=16, new_tokens=16, warmup=1,
                     repeats=2, compile="off"),
}


@dataclass
class GenResult:
    impl: str  # ours | ours+compile | hf
    prompts: int
    prompt_len: int  # the longest prompt
    new_tokens: int  # per row, asked for
    status: str = "ok"
    tokens_per_s: float = math.nan  # new tokens of all rows per second of generate() wall time
    ms_per_call: float = math.nan
    generated: int = 0  # new tokens produced per call (all rows)
    peak_bytes: int = 0


def make_prompts(n: int, length: int, vocab: int, ragged: bool, seed: int) -> list[list[int]]:
    """`n` prompts of random ids after BOS (1); ragged: lengths spread evenly from `length` to length/2."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [length - (i * (length // 2)) // max(n - 1, 1) if ragged else length for i in range(n)]
    return [[1] + torch.randint(3, vocab, (max(L, 2) - 1,), generator=gen).tolist() for L in lengths]


def ours_generate_fn(model: nn.Module, prompts: list[list[int]], new_tokens: int, compile: bool) -> Any:
    """A closure running our generation (EOS disabled: every row yields `new_tokens`)."""

    def run() -> list[list[int]]:
        return llama.generate_ids(model, prompts, max_new_tokens=new_tokens, eos_id=[], pad_id=0,
                                  compile=compile)

    return run


def hf_generate_fn(model: nn.Module, prompts: list[list[int]], new_tokens: int,
                   device: torch.device) -> Any:
    """A closure running HF generate on the left-padded batch; returns the new ids per row."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)

    def run() -> list[list[int]]:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=True)
        return out[:, P:].tolist()

    return run


def measure(impl: str, run: Any, prompts: list[list[int]], new_tokens: int, warmup: int, repeats: int,
            device: torch.device, mem: bt.PeakMemory) -> tuple[GenResult, list[list[int]]]:
    res = GenResult(impl, len(prompts), max(len(p) for p in prompts), new_tokens)
    out: list[list[int]] = []
    mem.reset()
    try:
        for _ in range(warmup):  # also compiles, for ours+compile
            run()
        bt.sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = run()
        bt.sync(device)
        seconds = (time.perf_counter() - t0) / repeats
    except torch.OutOfMemoryError:
        res.status = "oom"
        return res, out
    except Exception as e:  # noqa: BLE001 -- e.g. torch.compile failing on this platform: report, go on
        res.status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return res, out
    finally:
        res.peak_bytes = mem.peak()
    res.generated = sum(len(o) for o in out)
    res.ms_per_call = seconds * 1e3
    res.tokens_per_s = res.generated / seconds
    return res, out


def print_row(r: GenResult) -> None:
    what = f"{r.impl:<13} {r.prompts} prompts <= {r.prompt_len} + {r.new_tokens} new"
    if r.status != "ok":
        print(f"{what}: {r.status}", flush=True)
        return
    print(f"{what}: {r.tokens_per_s:>9.1f} new tok/s  {r.ms_per_call:>9.1f} ms/call  "
          f"{r.ms_per_call / r.new_tokens:>7.2f} ms/step  peak {bt.fmt_bytes(r.peak_bytes)}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="defaults for a quick run (flags still override)")
    ap.add_argument("--shape", choices=sorted(bt.SHAPES), default="7b")
    ap.add_argument("--layers", type=int, default=None, help="cut the shape to N decoder layers")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="a real HF Llama dir instead of random weights")
    ap.add_argument("--prompts", type=int, default=8, help="prompts in the batch")
    ap.add_argument("--prompt-len", type=int, default=128, help="tokens of the longest prompt (with BOS)")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--ragged", action=argparse.BooleanOptionalAction, default=True,
                    help="prompt lengths from --prompt-len down to half of it (left padding)")
    ap.add_argument("--compile", default=None,
                    help="ours with torch.compile: off | on | off,on (default off,on on CUDA, off on CPU)")
    ap.add_argument("--lora", action="store_true", help="unmerged LoRA r=16 on q/k/v/o on both sides")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (compiles)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls")
    args = bt.parse_common(ap, argv, PRESETS, "also run transformers' generate (bitsandbytes 4-bit)")
    if min(args.prompts, args.prompt_len, args.new_tokens, args.repeats) < 1 or args.warmup < 0:
        ap.error("--prompts, --prompt-len, --new-tokens and --repeats must be >= 1, --warmup >= 0")
    return args


def add_lora(impl: str, model: nn.Module) -> nn.Module:
    if impl == "ours":
        print(f"ours: {lora.inject(model, targets=bt.LORA_TARGETS, r=16, alpha=32, dropout=0.05)}")
        return model.eval()
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=bt.LORA_TARGETS,
                    task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed checkpointing methods
        return get_peft_model(model, lc).eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = bt.pick_device(args.device)
    dtype = bt.compute_dtype(device, args.dtype)
    modes = args.compile or ("off,on" if device.type == "cuda" else "off")
    compile_modes = [m.strip() == "on" for m in modes.split(",")]
    info = bt.env_info(device)
    bt.print_env(info)
    mem = bt.PeakMemory(device)
    tmp: Path | None = None
    path = args.checkpoint
    if path is None:
        cfg = bt.model_config(args.shape, args.layers, dtype)
        if args.compare_hf:
            tmp = Path(tempfile.mkdtemp(prefix="bench_generate_", dir=args.tmp_dir))
            path = bt.write_hf_checkpoint(cfg, tmp / "model", device, dtype, args.seed)
    else:
        cfg = json.loads((path / "config.json").read_text())
    prompts = make_prompts(args.prompts, args.prompt_len, cfg["vocab_size"], args.ragged, args.seed)
    print(f"model: hidden {cfg['hidden_size']}, layers {cfg['num_hidden_layers']}, "
          f"vocab {cfg['vocab_size']}; "
          f"NF4+DQ, compute {str(dtype).removeprefix('torch.')}{', LoRA r=16 q/k/v/o' if args.lora else ''}; "
          f"{args.prompts} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens, "
          f"{args.new_tokens} new tokens each, greedy, no EOS; {args.warmup} warmup + {args.repeats} timed "
          f"calls; peak = {mem.kind}")
    results: list[GenResult] = []
    outputs: dict[str, list[list[int]]] = {}
    try:
        if path is None:
            model = bt.build_random(cfg, device, dtype, args.seed)
        else:
            model = bt.load_ours(path, device, dtype)
        if args.lora:
            model = add_lora("ours", model)
        for on in compile_modes:
            run = ours_generate_fn(model, prompts, args.new_tokens, on)
            res, out = measure("ours+compile" if on else "ours", run, prompts, args.new_tokens, args.warmup,
                               args.repeats, device, mem)
            print_row(res)
            results.append(res)
            outputs[res.impl] = out
        del model, run
        bt.free(device)
        if args.compare_hf:
            hf = bt.load_hf(path, device, dtype)
            if args.lora:
                hf = add_lora("hf", hf)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # generation-flag notices
                res, out = measure("hf", hf_generate_fn(hf, prompts, args.new_tokens, device), prompts,
                                   args.new_tokens, args.warmup, args.repeats, device, mem)
            print_row(res)
            results.append(res)
            outputs["hf"] = out
            del hf
            bt.free(device)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = summarise(results, outputs, device)
    bt.write_json(args, info, cfg, results, summary)
    return {"results": results, **summary}


def summarise(results: list[GenResult], outputs: dict[str, list[list[int]]],
              device: torch.device) -> dict[str, Any]:
    by = {r.impl: r for r in results if r.status == "ok"}
    ratios, agreement = {}, {}
    hf = by.get("hf")
    for impl in ("ours", "ours+compile"):
        if impl in by and hf is not None:
            ratios[impl] = by[impl].tokens_per_s / hf.tokens_per_s
            a, b = outputs[impl], outputs["hf"]
            agreement[impl] = {"rows_identical": sum(x == y for x, y in zip(a, b)),
                               "first_token_equal": sum(x[:1] == y[:1] for x, y in zip(a, b)), "rows": len(a)}
            g = agreement[impl]
            print(f"{impl} vs hf: greedy rows identical {g['rows_identical']}/{g['rows']}, first token equal "
                  f"{g['first_token_equal']}/{g['rows']}; speed ratio {ratios[impl]:.2f}x")
    if ratios:
        best = max(ratios.values())
        where = "" if device.type == "cuda" else " (CPU: not the GPU target's conditions)"
        print(f"target ours >= 10x hf new tokens/s: best {best:.2f}x{where}")
    return {"ratios": ratios, "agreement": agreement}


if __name__ == "__main__":
    main()
