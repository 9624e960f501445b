"""Side by side: two eval.py results (e.g. the base model and the fine-tuned one).

    python -m finetune.evaluate.compare runs/demo/eval-baseline/metrics.json runs/demo/eval/metrics.json

Prints one table with a column per result and the change, so the gain of fine-tuning is one glance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# (label, path into metrics.json, scale): scores print as percentages, the rest as they are.
ROWS: list[tuple[str, tuple[str, ...], float]] = [
    ("entity micro F1 %", ("entities", "f1"), 100.0),
    ("entity micro precision %", ("entities", "precision"), 100.0),
    ("entity micro recall %", ("entities", "recall"), 100.0),
    ("entity macro F1 %", ("entities", "macro_f1"), 100.0),
    ("exact match %", ("entities", "exact_match"), 100.0),
    ("parse failures %", ("entities", "parse_failure_rate"), 100.0),
    ("hallucinated spans %", ("entities", "hallucination_rate"), 100.0),
    ("ROUGE-L F1 %", ("rouge", "rougeL", "f1"), 100.0),
    ("BLEU", ("bleu", "bleu"), 1.0),
    ("eval loss", ("loss", "eval_loss"), 1.0),
    ("generated tokens/s", ("timing", "tokens_per_s"), 1.0),
]


def _get(m: dict[str, Any], path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(m, dict) or m.get(key) is None:
            return None
        m = m[key]
    return float(m) if isinstance(m, (int, float)) else None


def _fmt(x: float | None) -> str:
    return f"{'-':>10}" if x is None else f"{x:10.2f}"


def compare_table(metrics: list[dict[str, Any]], names: list[str]) -> str:
    """A fixed-width table: one row per metric, one column per result, then last minus first."""
    head = f"{'':26}" + "".join(f"{n[:10]:>11}" for n in names) + f"{'change':>11}"
    lines = [head, "-" * len(head)]
    for label, path, scale in ROWS:
        vals = [None if (v := _get(m, path)) is None else v * scale for m in metrics]
        delta = None if vals[0] is None or vals[-1] is None else vals[-1] - vals[0]
        lines.append(f"{label:26}" + "".join(f" {_fmt(v)}" for v in vals) +
                     (f" {'-':>10}" if delta is None else f" {delta:+10.2f}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if len(paths) < 2:
        print("usage: python -m finetune.evaluate.compare BASE/metrics.json TUNED/metrics.json [...]",
              file=sys.stderr)
        return 2
    metrics = []
    for p in paths:
        try:
            metrics.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            print(f"error: cannot read {p}: {e}; run eval.py first", file=sys.stderr)
            return 2
    names = ["base" if m.get("adapter") is None else "fine-tuned" for m in metrics]
    print(compare_table(metrics, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
