"""Fine-tune a Llama-family model with QLoRA (or LoRA, or full training for small models).

    python train.py CONFIG.yaml [--set section.key=value ...] [--resume] [--no-progress]
    torchrun --nproc_per_node N train.py CONFIG.yaml ...      # DistributedDataParallel, N ranks
    python train.py CONFIG.yaml --plan [--gpus N] [--gpu-memory 24GiB]   # memory per rank; loads nothing

Writes <train.output_dir>/{config.yaml, metrics.jsonl, checkpoints/step-N/, final/, plots/loss.png,
tensorboard/ (when the tensorboard package is installed)}.
Exit codes: 0 done; 2 a mistake the user can fix (one ``error:`` line on stderr, no traceback: bad
config or data, a run dir that would be overwritten or is in use by another run, a full disk, a
diverged loss); 130/143 stopped by SIGINT/SIGTERM after saving a checkpoint (continue with --resume;
a second Ctrl-C aborts at once and says what was kept). A run that stopped before its first
checkpoint restarts with the same command.
"""

from __future__ import annotations

import argparse
import os
import sys

from finetune.errors import UserError, report
from finetune.errors import is_user_error as is_user_error  # the rule report() applies (tests pin it)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run config YAML, e.g. configs/llama2.yaml")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set train.lr=1e-4 lora.r=8")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in train.output_dir that verifies")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plan", action="store_true",
                   help="print the memory per rank (single / DDP / FSDP) from config.json alone and exit")
    p.add_argument("--gpus", type=int, metavar="N", help="--plan: GPUs (ranks) to plan for (default 1)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="--plan: memory of one GPU, e.g. 24GiB, 80GB "
                   "(default: the visible GPU's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from finetune.config import load_config
        from finetune.run.loop import train

        overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
        if args.plan:
            return _plan(args, overrides)
        if args.gpus is not None or args.gpu_memory is not None:
            raise UserError("--gpus and --gpu-memory describe the GPUs for --plan; add --plan, or launch "
                            "N ranks with torchrun --nproc_per_node N train.py CONFIG.yaml")
        cfg = load_config(args.config, overrides=overrides)
        result = train(cfg, progress=not args.no_progress)
    except KeyboardInterrupt as e:  # outside the loop's save-and-exit path (loading; a second Ctrl-C)
        print(str(e) or "interrupted before training started; nothing saved", file=sys.stderr)
        return 130
    except Exception as e:
        return report(e, show=int(os.environ.get("RANK", "0")) == 0)
    if result.interrupted is not None:
        return 128 + result.interrupted
    return 0


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    """--plan: read the config and config.json only (no weights, no data); see finetune.memory_plan."""
    from finetune.config import load_config
    from finetune.memory_plan import format_plan, make_plan, parse_memory

    memory = parse_memory(args.gpu_memory) if args.gpu_memory is not None else None
    cfg = load_config(args.config, overrides=overrides, check_paths=False)
    print(format_plan(make_plan(cfg, gpus=1 if args.gpus is None else args.gpus, gpu_memory=memory)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
