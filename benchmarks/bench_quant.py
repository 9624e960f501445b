"""Peak memory and time of loading a Llama-2-7B-shaped checkpoint through the 4-bit streaming path.

    python benchmarks/bench_quant.py                  # all 32 layers (CUDA: the <= 4.5 GiB target)
    python benchmarks/bench_quant.py --layers 2       # a slice of the 7B shape, e.g. on CPU
    python benchmarks/bench_quant.py --linear-bench   # also time one 4-bit linear, ours vs bitsandbytes'

A random checkpoint with Llama-2-7b-hf's config (fp16, sharded one file per decoder layer, index.json,
transformers-4.x config.json) is written to a temporary directory by a child process, so the parent's
peak RSS measures only the load. The load is `llama.from_pretrained(..., linear_hook=quant.nf4(...))`:
each linear is quantised as soon as its weight arrives, so the expected peak is the 4-bit model plus
one dense linear (plus, on CPU, the allocator's and the interpreter's own footprint).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# meta-llama/Llama-2-7b-hf config.json (the fields the loader reads).
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2, pad_token_id=None, hidden_act="silu",
                 architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float16",
                 transformers_version="4.31.0")


def write_checkpoint(out: Path, layers: int, seed: int = 0) -> None:
    """Random N(0, 0.02) fp16 weights in HF layout: one shard per decoder layer + one for the rest."""
    from safetensors.torch import save_file

    cfg = dict(LLAMA2_7B, num_hidden_layers=layers)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).half()

    n_shards = layers + 1
    weight_map, total = {}, 0
    for s in range(n_shards):
        if s < layers:
            p = f"model.layers.{s}."
            tensors = {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(h, h),
                       p + "self_attn.v_proj.weight": rand(h, h), p + "self_attn.o_proj.weight": rand(h, h),
                       p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                       p + "mlp.down_proj.weight": rand(h, i),
                       p + "input_layernorm.weight": torch.ones(h, dtype=torch.half),
                       p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.half)}
        else:
            tensors = {"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h),
                       "model.norm.weight": torch.ones(h, dtype=torch.half)}
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def bench_load(path: Path, device: torch.device, dtype: torch.dtype) -> None:
    import llama
    import quant

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = rss_now_bytes()
    t0 = time.perf_counter()
    hook = quant.nf4(compute_dtype=dtype)
    model = llama.from_pretrained(path, device=device, dtype=dtype, linear_hook=hook)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    report = quant.memory_report(model)
    cfg = model.config
    one_linear = cfg.intermediate_size * cfg.hidden_size * torch.tensor([], dtype=dtype).element_size()
    print(f"loaded {cfg.num_hidden_layers} layer(s) on {device} in {seconds:.2f} s "
          f"({sum(p.stat().st_size for p in path.glob('*.safetensors')) / 2**30 / seconds:.2f} GiB/s of fp16 "
          "checkpoint)")
    print(f"memory report: {report}")
    print(f"expected peak ~ model + one dense linear = {gib(report.total_bytes)} + {gib(one_linear)} = "
          f"{gib(report.total_bytes + one_linear)}")
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        print(f"peak CUDA memory allocated {gib(peak)} (now {gib(torch.cuda.memory_allocated() - base)}, "
              f"reserved peak {gib(torch.cuda.max_memory_reserved())})")
    else:
        print(f"peak RSS {gib(rss_peak_bytes())} (before load {gib(rss0)}, after {gib(rss_now_bytes())}; "
              f"peak - before = {gib(rss_peak_bytes() - rss0)})")
    # A forward pass proves the model is usable (and shows what one costs at this size).
    ids = torch.randint(0, cfg.vocab_size, (1, 128), device=device)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids)
        if cuda:
            torch.cuda.synchronize()
    print(f"forward 1x128 tokens: {time.perf_counter() - t0:.3f} s")


def bench_linear(device: torch.device, dtype: torch.dtype, tokens: list[int], repeats: int) -> None:
    """Forward + input-gradient backward of one 4-bit linear at Llama-2-7B shapes: ours vs bnb's."""
    import bitsandbytes as bnb

    import quant

    qc = quant.QuantConfig(compute_dtype=dtype)
    for n_in, n_out in ((4096, 4096), (4096, 11008), (11008, 4096)):
        dense = torch.nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
        ours = quant.to_4bit(dense, qc)
        ref = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=dtype, quant_type="nf4")
        ref.load_state_dict({"weight": dense.weight.detach().cpu()})
        ref = ref.to(device)
        for t in tokens:
            x = torch.randn(t, n_in, device=device, dtype=dtype, requires_grad=True)
            times = {}
            for label, m in (("quant", ours), ("bnb", ref), ("dense", dense)):
                for i in range(repeats + 2):  # two warm-up calls
                    if i == 2:
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                    m(x).backward(torch.ones(t, n_out, device=device, dtype=dtype))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[label] = (time.perf_counter() - t0) / repeats * 1e3
            print(f"linear {n_in}->{n_out} x {t} tokens, fwd+bwd(input): "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B shape (32 = all)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--dir", type=Path, default=None, help="write/reuse the checkpoint here (kept)")
    ap.add_argument("--linear-bench", action="store_true", help="also time one 4-bit linear vs bitsandbytes")
    ap.add_argument("--tokens", default="128,2048", help="token counts for --linear-bench")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--write-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_only is not None:
        write_checkpoint(args.write_only, args.layers)
        return
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda"
                                                            else torch.float32)
    tmp = None
    path = args.dir
    if path is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_quant_"))
        path = tmp / "llama2-7b-shape"
    try:
        if not (path / "config.json").is_file():
            t0 = time.perf_counter()
            # A child process writes it, so this process's peak RSS is the load's alone.
            cmd = [sys.executable, __file__, "--write-only", str(path), "--layers", str(args.layers)]
            subprocess.run(cmd, check=True)
            print(f"wrote a Llama-2-7B-shaped checkpoint with {args.layers} layer(s) to {path} in "
                  f"{time.perf_counter() - t0:.1f} s")
        bench_load(path, device, dtype)
        if args.linear_bench:
            bench_linear(device, dtype, [int(t) for t in args.tokens.split(",")], args.repeats)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
