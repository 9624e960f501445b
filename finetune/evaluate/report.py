"""Human-readable output of an evaluation: the console table and report.md (the plots: finetune.plots).

Everything reads the plain ``metrics.json`` dict that ``finetune.evaluate.evaluator`` writes, so a report
can be
rebuilt from the files alone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.files import write_text_atomic

# ---------------------------------------------------------------------------------------------------
# the console table


def _pct(x: float | None) -> str:
    return "   n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:6.2f}"


def _num(x: float | None, fmt: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, fmt)


def format_table(m: dict[str, Any]) -> str:
    """The evaluation summary as a fixed-width text table (percentages for rates and scores)."""
    e, r, b, t = m["entities"], m["rouge"], m["bleu"], m["timing"]
    lines = [
        f"eval of {m.get('adapter') or 'the base model (no adapter)'} on {m['split']} "
        f"({m['n_examples']} examples)",
        "",
        "entities (strict, multiset of (span, TYPE))      %",
        f"  micro precision                        {_pct(e['precision'])}",
        f"  micro recall                           {_pct(e['recall'])}",
        f"  micro F1                               {_pct(e['f1'])}",
        f"  macro F1                               {_pct(e['macro_f1'])}",
        f"  exact match                            {_pct(e['exact_match'])}",
        f"  parse failures                         {_pct(e['parse_failure_rate'])}",
        f"  hallucinated spans                     {_pct(e['hallucination_rate'])}",
        f"  gold / predicted / correct entities    {e['n_gold']} / {e['n_predicted']} / {e['n_correct']}",
    ]
    if e["per_type"]:
        lines += ["", "  type                    P       R      F1  support  predicted"]
        for kind, s in e["per_type"].items():
            lines.append(f"  {kind[:20]:<20} {_pct(s['precision'])}  {_pct(s['recall'])}  {_pct(s['f1'])}"
                         f"  {s['support']:>7}  {s['predicted']:>9}")
    lines += ["", "text overlap              P       R      F1"]
    for kind, label in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")):
        s = r[kind]
        lines.append(f"  {label:<20} {_pct(s['precision'])}  {_pct(s['recall'])}  {_pct(s['f1'])}")
    lines.append(f"  BLEU (sacrebleu)     {b['bleu']:6.2f}")
    loss = m.get("loss") or {}
    lines += ["", f"eval loss {_num(loss.get('eval_loss'))}  perplexity {_num(loss.get('perplexity'), '.3f')}"
                  f"  ({loss.get('tokens', 0)} response tokens)"]
    lines.append(f"generation {t['generate_s']:.2f} s total, {1000 * t['per_example_s']:.1f} ms/example, "
                 f"{t['generated_tokens']} tokens, {t['tokens_per_s']:.1f} tokens/s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# files


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl; unreadable lines (a line cut by a crash) are skipped."""
    records = []
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")  # a damaged byte spoils one line
    except OSError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------
# report.md


def write_report(m: dict[str, Any], out_dir: str | os.PathLike, plots: Sequence[str | os.PathLike] = (), *,
                 samples: Sequence[dict[str, Any]] = ()) -> Path:
    """Write ``report.md`` in ``out_dir``: the summary table, settings, plots and sample answers.

    ``samples`` are predictions.jsonl records (``input``, ``gold``, ``prediction``) shown verbatim, so a
    reader sees what the numbers are made of.
    """
    out_dir = Path(out_dir)
    e = m["entities"]
    lines = ["# Evaluation report", "",
             f"- model: `{m['model']}`", f"- adapter: `{m.get('adapter') or 'none (base model)'}`",
             f"- split: {m['split']}, {m['n_examples']} examples"
             + (f" ({m['skipped']} rows skipped: too long for data.max_length)" if m.get("skipped") else ""),
             f"- generation: greedy, max_new_tokens={m['generation']['max_new_tokens']}, "
             f"batch_size={m['generation']['batch_size']}, stop_at_eos={m['generation']['stop_at_eos']}",
             f"- device: {m.get('device', '?')}", "", "## Summary", "", "```", format_table(m), "```", ""]
    if e["per_type"]:
        lines += ["## Per type", "", "| type | precision | recall | F1 | support | predicted |",
                  "|---|---:|---:|---:|---:|---:|"]
        for kind, s in e["per_type"].items():
            lines.append(f"| {kind} | {100 * s['precision']:.2f} | {100 * s['recall']:.2f} | "
                         f"{100 * s['f1']:.2f} | {s['support']} | {s['predicted']} |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).relative_to(out_dir).as_posix()})" for p in plots]
        lines.append("")
    if samples:
        lines += ["## Sample answers", ""]
        for i, rec in enumerate(samples, 1):
            lines += [f"### {i}", "", "input:", "```", _fence_safe(rec["input"]), "```", "gold:", "```",
                      _fence_safe(rec["gold"]), "```", "prediction:", "```", _fence_safe(rec["prediction"]),
                      "```", ""]
    lines += ["Definitions: strict micro P/R/F1 over the multiset of normalised (span, TYPE) pairs; macro F1 "
              "over the types seen in gold or predictions; a hallucinated span is a predicted span not found "
              "in the input; ROUGE on Unicode words (rouge-score with a Unicode tokenizer), corpus BLEU by "
              "sacrebleu; eval loss is the token-weighted mean NLL of the response tokens (as in training).",
              ""]
    path = out_dir / "report.md"
    write_text_atomic(path, "\n".join(lines), durable=False)
    return path


def _fence_safe(text: str) -> str:
    return text.replace("```", "`\u200b``")
