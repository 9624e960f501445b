"""New tokens/s of batched greedy KV-cache generation: ours (4-bit, or dense merged) vs HF `generate`.

    python benchmarks/bench_generate.py --compare-hf                  # Llama-2-7B shape, random weights
    python benchmarks/bench_generate.py --compare-hf --batch-sizes 1,16 --prompt-len 128 --new-tokens 128
    python benchmarks/bench_generate.py --checkpoint /models/Llama-2-7b-hf --compare-hf --lora
    python benchmarks/bench_generate.py --preset cpu-tiny --compare-hf   # seconds on a CPU (smoke test)

Ours is `llama.generate_ids` (one prefill over the left-padded batch, then one decode step per
token into preallocated caches) in several variants: `4bit` (the QLoRA model as trained: every
decode step dequantises each weight), `dense` (finetune.evaluate.dense: each 4-bit weight dequantised once,
the adapter merged, as eval.py does when memory allows), each optionally `+compile`
(torch.compile of the decode step, fullgraph; CUDA graphs on CUDA). HF is `model.generate` of
transformers' LlamaForCausalLM loaded 4-bit through its bitsandbytes integration (NF4, double
quant, same compute dtype), from the same weights. Both run greedy with EOS disabled (ours
`eos_id=[]`, HF `min_new_tokens = max_new_tokens`) so every row produces exactly --new-tokens
tokens; tokens/s counts those new tokens over the whole call (prefill included). `--lora` adds
unmerged LoRA r=16 on q/k/v/o on both sides, as eval.py runs a trained adapter. Prompts are random
ids of --prompt-len tokens (the unragged setting the HF anchor was measured in); --ragged spreads
their lengths down to half, so left padding is exercised.

HF runs first, then ours (4-bit before dense, eager before compiled): each row of ours prints its
agreement and target lines as soon as it is measured and --json is rewritten after every row, so a
run stopped by a timeout keeps them (see bench_train.py, "Reporting as it goes").

The agreement line (rows whose greedy tokens are identical, ours vs HF) shows that both decode the
same model; in fp32 on CPU they should agree, in bf16 near-ties may flip late tokens.
Targets (H100, Llama-2-7B, see benchmarks/README.md): ours >= 20x HF new tokens/s at batch 1 and
>= 10x at batch 16.
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
    "cpu-tiny": dict(shape="tiny", device="cpu", batch_sizes="1,16", prompt_len=16, new_tokens=16, warmup=1,
                     repeats=2, variants="4bit,dense", ragged=True),
}
TARGETS = {1: 20.0, 16: 10.0}  # batch size -> ours/HF new tokens/s wanted (7B on an H100)


@dataclass
class GenResult:
    impl: str  # ours | ours+compile | ours+dense | ours+dense+compile | hf
    prompts: int
    prompt_len: int  # the longest prompt
    new_tokens: int  # per row, asked for
    status: str = "ok"
    tokens_per_s: float = math.nan  # new tokens of all rows per second of generate() wall time
    ms_per_call: float = math.nan
    generated: int = 0  # new tokens produced per call (all rows)
    peak_bytes: int = 0
    examples_per_s: float = math.nan  # prompts answered per second
    warmup_s: float = math.nan  # the untimed calls (compiling and capturing CUDA graphs, for +compile)
    graphs: int = 0  # graphs torch.compile had made in this process after this configuration


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
        t0 = time.perf_counter()
        for _ in range(warmup):  # also compiles, for ours+compile
            run()
        bt.sync(device)
        res.warmup_s = time.perf_counter() - t0
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
        res.graphs = bt.compiled_graphs()
    res.generated = sum(len(o) for o in out)
    res.ms_per_call = seconds * 1e3
    res.tokens_per_s = res.generated / seconds
    res.examples_per_s = len(prompts) / seconds
    return res, out


def print_row(r: GenResult) -> None:
    what = f"{r.impl:<19} batch {r.prompts:>3} x <= {r.prompt_len} + {r.new_tokens} new"
    if r.status != "ok":
        print(f"{what}: {r.status}", flush=True)
        return
    print(f"{what}: {r.tokens_per_s:>9.1f} new tok/s  {r.ms_per_call:>9.1f} ms/call  "
          f"{r.ms_per_call / r.new_tokens:>7.2f} ms/step {r.examples_per_s:>8.2f} ex/s  "
          f"peak {bt.fmt_bytes(r.peak_bytes)}  (warmup {r.warmup_s:.1f} s"
          f"{f', {r.graphs} graphs compiled so far' if r.impl.endswith('compile') else ''})", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="defaults for a quick run (flags still override)")
    ap.add_argument("--shape", choices=sorted(bt.SHAPES), default="7b")
    ap.add_argument("--layers", type=int, default=None, help="cut the shape to N decoder layers")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="a real HF Llama dir instead of random weights")
    ap.add_argument("--batch-sizes", default="1,16", help="prompts per batch, one run each (e.g. 1,16)")
    ap.add_argument("--prompt-len", type=int, default=128, help="tokens of the longest prompt (with BOS)")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--ragged", action=argparse.BooleanOptionalAction, default=False,
                    help="prompt lengths from --prompt-len down to half of it (left padding)")
    ap.add_argument("--variants", default=None,
                    help="ours: any of 4bit, 4bit+compile, dense, dense+compile (default on CUDA: "
                         "4bit,4bit+compile,dense+compile; on CPU: 4bit,dense)")
    ap.add_argument("--lora", action="store_true", help="unmerged LoRA r=16 on q/k/v/o on both sides")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (compiles)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls")
    args = bt.parse_common(ap, argv, PRESETS, "also run transformers' generate (bitsandbytes 4-bit)")
    try:
        args.batch_list = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    except ValueError:
        args.batch_list = []
    if not args.batch_list or min(args.batch_list) < 1:
        ap.error(f"--batch-sizes {args.batch_sizes!r}: a list of positive integers like 1,16")
    if min(args.prompt_len, args.new_tokens, args.repeats) < 1 or args.warmup < 0:
        ap.error("--prompt-len, --new-tokens and --repeats must be >= 1, --warmup >= 0")
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


def imports_needed(args: argparse.Namespace, variants: list[str],
                   device: torch.device) -> list[tuple[str, str]]:
    """Every module this run will import later (checked at start by `bench_train.check_imports`)."""
    needs = [("bitsandbytes", "the 4-bit model"), ("safetensors.torch", "the random checkpoint")]
    if any(v.startswith("dense") for v in variants):
        needs.append(("finetune.evaluate.dense", "--variants dense"))
    if any(v.endswith("+compile") for v in variants) and device.type == "cuda":
        needs.append(("triton", "--variants ...+compile (inductor on CUDA)"))
    if args.compare_hf:
        needs += [("transformers", "--compare-hf"), ("accelerate", "--compare-hf (transformers' bitsandbytes "
                                                                   "loading)")]
        if args.lora:
            needs.append(("peft", "--compare-hf --lora"))
    return needs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    bt.line_buffered_stdout()
    args = parse_args(argv)
    device = bt.pick_device(args.device)
    dtype = bt.compute_dtype(device, args.dtype)
    default = "4bit,4bit+compile,dense+compile" if device.type == "cuda" else "4bit,dense"
    variants = [v.strip() for v in (args.variants or default).split(",") if v.strip()]
    bad = [v for v in variants if v not in ("4bit", "4bit+compile", "dense", "dense+compile")]
    if bad:
        sys.exit(f"error: --variants: unknown {bad}; use 4bit, 4bit+compile, dense, dense+compile")
    info = bt.env_info(device)
    bt.print_env(info)
    bt.check_imports(imports_needed(args, variants, device))
    bt.check_4bit_kernels(device, dtype)
    if args.preflight:
        print("preflight: every package this run needs imports; NF4 kernels run on", device)
        return {}
    bt.stop_on_sigterm()
    mem = bt.PeakMemory(device)
    tmp: Path | None = None
    path = args.checkpoint
    results: list[GenResult] = []
    outputs: dict[tuple[str, int], list[list[int]]] = {}
    reporter: bt.Reporter | None = None
    stopped: str | None = None
    done = False
    summary: dict[str, Any] = {}
    try:
        if path is None:
            cfg = bt.model_config(args.shape, args.layers, dtype)
            if args.checkpoint_dir is not None:
                path = bt.checkpoint_once(cfg, args.checkpoint_dir, device, dtype, args.seed)
            elif args.compare_hf:
                tmp = Path(tempfile.mkdtemp(prefix="bench_generate_", dir=args.tmp_dir))
                path = bt.write_hf_checkpoint(cfg, tmp / "model", device, dtype, args.seed)
        else:
            cfg = json.loads((path / "config.json").read_text())
        batches = {b: make_prompts(b, args.prompt_len, cfg["vocab_size"], args.ragged, args.seed + b)
                   for b in args.batch_list}
        print(f"model: hidden {cfg['hidden_size']}, layers {cfg['num_hidden_layers']}, "
              f"vocab {cfg['vocab_size']}; NF4+DQ, compute {str(dtype).removeprefix('torch.')}"
              f"{', LoRA r=16 q/k/v/o' if args.lora else ''}; batch sizes {args.batch_list}, prompts of "
              f"{args.prompt_len} tokens{' (ragged down to half)' if args.ragged else ''}, {args.new_tokens} "
              f"new tokens each, greedy, no EOS; {args.warmup} warmup + {args.repeats} timed calls; "
              f"peak = {mem.kind}")
        reporter = bt.Reporter(args, info, cfg, lambda rows, outs: summarise(rows, outs, device, args.shape))

        def record(res: GenResult, b: int, out: list[list[int]]) -> None:
            print_row(res)
            results.append(res)
            outputs[(res.impl, b)] = out
            reporter.update(results, outputs)

        # HF first: then each row of ours completes its pair at once and prints its agreement and target
        # lines, the 4-bit variants before the compiled ones, so a run cut short still has them.
        if args.compare_hf:
            hf = bt.load_hf(path, device, dtype)
            if args.lora:
                hf = add_lora("hf", hf)
            for b, prompts in batches.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # generation-flag notices
                    res, out = measure("hf", hf_generate_fn(hf, prompts, args.new_tokens, device), prompts,
                                       args.new_tokens, args.warmup, args.repeats, device, mem)
                record(res, b, out)
            del hf
            bt.free(device)
            bt.report_leftover(device, "hf model")
        if path is None:
            model = bt.build_random(cfg, device, dtype, args.seed)
        else:
            model = bt.load_ours(path, device, dtype)
        if args.lora:
            model = add_lora("ours", model)
        is_dense = False
        # 4-bit ones first, and within each, eager before compiled (compiling is the slow, uncertain part)
        for variant in sorted(variants, key=lambda v: (v.startswith("dense"), v.endswith("+compile"))):
            if variant.startswith("dense") and not is_dense:
                from finetune.evaluate.dense import densify, plan_dense

                plan = plan_dense(model)
                t0 = time.perf_counter()
                densify(model)
                bt.sync(device)
                is_dense = True
                print(f"ours: dense merged copy made in {time.perf_counter() - t0:.1f} s "
                      f"(+{plan.extra_bytes / bt.GiB:.2f} GiB)")
            on = variant.endswith("+compile")
            name = "ours" + ("+dense" if variant.startswith("dense") else "") + ("+compile" if on else "")
            for b, prompts in batches.items():
                run = ours_generate_fn(model, prompts, args.new_tokens, on)
                res, out = measure(name, run, prompts, args.new_tokens, args.warmup, args.repeats, device,
                                   mem)
                record(res, b, out)
        del model
        bt.free(device)
        done = True
    except bt.Stopped:
        stopped = "SIGTERM (a timeout?)"
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if reporter is not None:
            if not done and stopped is None:
                stopped = "an error (its traceback follows)"
            summary = reporter.finish(results, outputs, stopped=stopped)
    return {"results": results, **summary}


def summarise(results: list[GenResult], outputs: dict[tuple[str, int], list[list[int]]],
              device: torch.device, shape: str = "7b") -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Ratios and greedy agreement per (variant, batch size) vs HF, and a PASS/FAIL line per target.

    Works on the rows so far (the best of ours so far per batch size); returns the summary for --json
    and its lines as (key, text), as `bench_train.Reporter` wants them.
    """
    lines: list[tuple[str, str]] = []
    by = {(r.impl, r.prompts): r for r in results if r.status == "ok"}
    ratios: dict[str, float] = {}
    agreement: dict[str, dict[str, int]] = {}
    best: dict[int, tuple[float, str]] = {}
    for (impl, b), r in by.items():
        hf = by.get(("hf", b))
        if impl == "hf" or hf is None:
            continue
        key = f"{impl} batch {b}"
        ratios[key] = r.tokens_per_s / hf.tokens_per_s
        a, h = outputs[(impl, b)], outputs[("hf", b)]
        agreement[key] = {"rows_identical": sum(x == y for x, y in zip(a, h)),
                          "first_token_equal": sum(x[:1] == y[:1] for x, y in zip(a, h)), "rows": len(a)}
        g = agreement[key]
        lines.append((key, f"{key} vs hf: greedy rows identical {g['rows_identical']}/{g['rows']}, first "
                           f"token equal {g['first_token_equal']}/{g['rows']}; "
                           f"speed ratio {ratios[key]:.2f}x"))
        if b not in best or ratios[key] > best[b][0]:
            best[b] = (ratios[key], impl)
    gpu_7b = device.type == "cuda" and shape == "7b"
    checks: dict[str, Any] = {}
    for b, want in TARGETS.items():
        if b in best:
            ratio, impl = best[b]
            checks[f"speed_batch_{b}"] = {"ratio": ratio, "want": want, "pass": ratio >= want, "impl": impl}
            head = f"target batch {b} new tokens/s >= {want:g}x hf"
            lines.append((head, f"{head}: {ratio:.2f}x ({impl}) {bt.verdict(ratio >= want, gpu_7b)}"))
    return {"ratios": ratios, "agreement": agreement, "targets": checks}, lines


if __name__ == "__main__":
    main()
