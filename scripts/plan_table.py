"""The README's memory table: ``train.py --plan`` for published models on common GPU setups, as Markdown.

    python scripts/plan_table.py                        # max_length 2048, micro-batch 1, checkpointing on
    python scripts/plan_table.py --max-length 512 --no-checkpointing

Why a script: the README's figures must come from the same code as ``--plan`` (finetune.memory_plan),
not be typed by hand. The models are configs/plan/*/config.json, the published hyper-parameters of each
checkpoint; no weights are needed (everything is built on the meta device). Each cell is the total per
rank (1 GiB reserve included) and, when it fits, the largest micro-batch that would.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.config import config_from_dict  # noqa: E402
from finetune.memory_plan import RESERVE, GiB, make_plan, size  # noqa: E402

MODELS = ["Llama-2-7b-hf", "Llama-2-13b-hf", "Llama-2-70b-hf", "Meta-Llama-3-8B", "Mixtral-8x7B-v0.1"]


def cell(plan, column: int) -> str:  # noqa: ANN001
    v = plan.verdicts[column]
    total = size(v.total + RESERVE)
    return f"{total} ✓ (≤ {v.largest_micro_batch})" if v.fits else f"{total} ✗"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--no-checkpointing", action="store_true")
    args = p.parse_args()
    print("| model | params | 4-bit base + dense | LoRA + grads + AdamW | activations | 1 × 24 GB | "
          "1 × 80 GB | 2 × 24 GB DDP | 2 × 24 GB FSDP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        raw = {"model": {"path": str(ROOT / "configs" / "plan" / name),
                         "gradient_checkpointing": not args.no_checkpointing},
               "data": {"path": "unused.jsonl", "max_length": args.max_length},
               "train": {"micro_batch_size": args.micro_batch}}
        cfg = config_from_dict(raw, check_paths=False)
        one24 = make_plan(cfg, gpus=2, gpu_memory=24 * GiB)
        one80 = make_plan(cfg, gpus=1, gpu_memory=80 * GiB)
        st = one24.static
        acts = one24.activations.peak(cfg.model.gradient_checkpointing)
        print(f"| {name} | {one24.params / 1e9:.1f}B | {size(st.quantized + st.dense)} | "
              f"{size(st.lora + st.grads + st.optimizer)} | {size(acts)} | {cell(one24, 0)} | "
              f"{cell(one80, 0)} | {cell(one24, 1)} | {cell(one24, 2)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
