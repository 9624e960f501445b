#!/usr/bin/env bash
# The first GPU run, in one command that fits one 10-minute remote call (~9 minutes at most):
#   1. the gpu-marked tests (`pytest -m gpu`: CUDA-graph decode, compiled training, bf16 + fused AdamW,
#      prequantised load + .to("cuda"), fp16 + GradScaler, 8-bit AdamW, 2-rank NCCL with 2 GPUs), under
#      a timeout of $TESTS_S;
#   2. benchmarks/gpu_runbook.sh (every throughput target), given what is left of $TOTAL_S;
#   3. a summary: the tests' result line, each stage's status and the latest line per target.
# Everything printed is also appended to $LOG (default runs/bench/gpu_check.log); the runbook's own
# logs and JSON files are in $OUT.
#
#   bash benchmarks/gpu_check.sh
#   TESTS_S=0 bash benchmarks/gpu_check.sh     # a second call: the runbook alone, with the whole budget
#   PRESET=cpu-tiny CK=/tmp/ck-tiny OUT=/tmp/out bash benchmarks/gpu_check.sh   # rehearsal on CPU
set -u
cd "$(dirname "$0")/.."
export PY=${PY:-python}
export OUT=${OUT:-runs/bench}
LOG=${LOG:-$OUT/gpu_check.log}
TOTAL_S=${TOTAL_S:-540}       # everything; one remote call allows 600
TESTS_S=${TESTS_S:-120}       # the gpu tests (tiny models: seconds each, plus 3 compiles); 0 = skip them
mkdir -p "$OUT" "$(dirname "$LOG")"
TESTS_LOG="$OUT/gpu_tests.log"

main() {
    local start=$SECONDS
    echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') =="
    git log -1 --format='commit %H %s' 2>/dev/null || true
    "$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| devices',
          [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" 2>&1 || true

    local tests_rc=0
    if [ "$TESTS_S" -gt 0 ]; then
        echo "== 1 gpu tests (timeout $TESTS_S s) =="
        # -v: a line per test as it ends, so a timeout still shows the verdicts reached
        timeout -k 10 "$TESTS_S" "$PY" -m pytest -m gpu -v -rs -p no:cacheprovider tests 2>&1 | tee "$TESTS_LOG"
        tests_rc=${PIPESTATUS[0]}
    else
        echo "== 1 gpu tests: skipped (TESTS_S=0) ==" | tee "$TESTS_LOG"
    fi

    local left=$((TOTAL_S - (SECONDS - start) - 15))
    echo "== 2 runbook (budget $left s) =="
    BUDGET_S=$left bash benchmarks/gpu_runbook.sh 2>&1 | tee "$OUT/runbook.log"
    local runbook_rc=${PIPESTATUS[0]}

    echo "== gpu_check summary ($((SECONDS - start)) s) =="
    local result
    result=$(grep -E "(passed|failed|skipped|errors?|deselected).* in [0-9.]+s" "$TESTS_LOG" | tail -n 1 | tr -d '=')
    case $tests_rc in
        0) echo "gpu tests: ok: ${result:-?}" ;;
        124|137) echo "gpu tests: STOPPED by the $TESTS_S s timeout: ${result:-no result line}" ;;
        *) echo "gpu tests: FAILED (status $tests_rc): ${result:-no result line}" ;;
    esac
    grep -E "^(FAILED|ERROR) |(FAILED|ERROR) +\[" "$TESTS_LOG" | head -n 20
    [ "$tests_rc" = 124 ] && grep -E " (PASSED|FAILED|ERROR|SKIPPED)" "$TESTS_LOG" | head -n 30
    if grep -q "SKIPPED.*needs a CUDA device" "$TESTS_LOG"; then
        echo "gpu tests: skipped here: no CUDA device"
    else
        grep "^SKIPPED" "$TESTS_LOG" | head -n 5
    fi
    echo "runbook: status $runbook_rc"
    sed -n '/^== targets/,$p' "$OUT/runbook.log" | tail -n +2
    [ "$tests_rc" = 0 ] && [ "$runbook_rc" = 0 ]
}

main 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "gpu_check: status $rc; the whole output is in $LOG" | tee -a "$LOG"
exit "$rc"
