#!/usr/bin/env bash
# Every throughput target of issue 16 on one H100/H200, in about 8 minutes (see benchmarks/README.md).
#
#   bash benchmarks/gpu_runbook.sh            # results in $OUT (default runs/bench): *.log, *.json
#
# Needs the project installed with a CUDA torch, bitsandbytes, transformers and peft (README, "Install"),
# ~14 GiB of disk for the random Llama-2-7B-shaped checkpoint ($CK), written once and reused by both
# scripts and by later runs. Each script runs ours and HF in one process on the same weights and
# prints a PASS/FAIL line per target; a timeout stops a script that runs long, keeping its lines.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python}
CK=${CK:-/tmp/qlora-bench-7b}
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
date -u; git log -1 --format='commit %H' 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Training: 1x128, 4x512, 1x2048 with gradient checkpointing; ours eager and with train.compile; HF + PEFT.
# ~1 min writing the checkpoint, ~1 min per model load, ~2 min compiling, ~1 min of steps.
timeout 330 "$PY" benchmarks/bench_train.py --compare-hf --checkpoint-dir "$CK" \
    --shapes 1x128,4x512,1x2048 --grad-ckpt on --compile off,on --warmup 2 --steps 3 \
    --json "$OUT/train.json" 2>&1 | tee "$OUT/train.log"

# Generation: batch 1 and 16, 128-token prompts (unragged, as the HF anchor), 128 new tokens;
# ours from the 4-bit weights and from the dense merged copy with the decode step compiled (CUDA graphs).
timeout 240 "$PY" benchmarks/bench_generate.py --compare-hf --checkpoint-dir "$CK" \
    --batch-sizes 1,16 --prompt-len 128 --new-tokens 128 --variants 4bit,dense+compile \
    --warmup 1 --repeats 2 --json "$OUT/generate.json" 2>&1 | tee "$OUT/generate.log"

echo "== targets =="
grep -h "^target\|^parity\|greedy rows" "$OUT/train.log" "$OUT/generate.log"
