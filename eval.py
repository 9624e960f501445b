"""Score a fine-tuned (or base) model on the held-out split: entity P/R/F1, ROUGE, BLEU, loss, speed.

    python eval.py CONFIG.yaml [--adapter DIR|none] [--split test|train] [--limit N] [--baseline]
                               [--set section.key=value ...] [--output DIR]

Writes predictions.jsonl, metrics.json, report.md and plots/*.png into the eval output dir (default
<train.output_dir>/eval, or eval-baseline with --baseline) and prints a summary table. Mistakes a user
can fix (bad config, missing adapter, adapter for another model, empty split) print one ``error:`` line
and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys

from finetune.errors import UserError, report
from finetune.errors import is_user_error as is_user_error  # the rule report() applies (tests pin it)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run config YAML (the one used for training)")
    p.add_argument("--adapter", help="PEFT adapter dir (default: eval.adapter, else "
                   "<train.output_dir>/final); 'none' scores model.path as is (e.g. a merged export)")
    p.add_argument("--split", choices=("test", "train"), help="which split to score (default: eval.split)")
    p.add_argument("--limit", type=int, help="score only the first N rows of the split")
    p.add_argument("--baseline", action="store_true", help="score the base model without any adapter")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set eval.batch_size=16 eval.max_new_tokens=96")
    p.add_argument("--output", help="output dir (default: eval.output_dir, else <train.output_dir>/eval)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from finetune.config import load_config
        from finetune.evaluate.evaluator import run_eval
        from finetune.evaluate.report import format_table

        if args.limit is not None and args.limit < 1:
            raise UserError(f"--limit must be >= 1 (got {args.limit}); leave it out to score the whole split")
        overrides = list(args.overrides)
        if args.split:
            overrides.append(f"eval.split={args.split}")
        if args.limit is not None:
            overrides.append(f"eval.limit={args.limit}")
        cfg = load_config(args.config, overrides=overrides)
        metrics = run_eval(cfg, adapter=args.adapter, baseline=args.baseline, output_dir=args.output,
                           progress=not args.no_progress)
    except Exception as e:
        return report(e)
    print(format_table(metrics))
    print(f"\nwrote {metrics['files']['report']} (and predictions.jsonl, metrics.json, plots/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
