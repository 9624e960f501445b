"""Ship a fine-tuned model: the merged weights as a Hugging Face directory or as a GGUF file.

    python export.py CONFIG.yaml --format hf|gguf --output PATH [--adapter DIR|none]
                     [--gguf-type f32|f16|bf16|q8_0|q4_0] [--force] [--set section.key=value ...]

hf: base + adapter merged (each 4-bit weight dequantised, the update added in fp32) as a directory
transformers and llama load. gguf: the same merged weights as one GGUF file for llama.cpp / Ollama
(Llama-2/3, SmolLM2, Mistral, Qwen2), with an Ollama ``Modelfile`` beside it. Written under a temporary
name and renamed when complete. Mistakes a user can fix (an existing output without --force, an unknown
--gguf-type or family, an adapter for another base, a full disk) print one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import sys

from finetune.errors import report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run config YAML (the one used for training)")
    p.add_argument("--format", required=True, help="hf (a model directory) or gguf (one file + Modelfile)")
    p.add_argument("--output", required=True, help="directory (hf) or .gguf file (gguf) to write")
    p.add_argument("--adapter", help="PEFT adapter dir (default: eval.adapter, else "
                   "<train.output_dir>/final); 'none' exports model.path as is")
    p.add_argument("--gguf-type", help="GGUF weight type: f32, f16 (default), bf16, q8_0, q4_0")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set model.device=cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from finetune.config import load_config
        from finetune.export.runner import check_request, run_export

        check_request(args.format, args.gguf_type)
        cfg = load_config(args.config, overrides=list(args.overrides))
        run_export(cfg, args.format, args.output, adapter=args.adapter, gguf_type=args.gguf_type,
                   force=args.force, progress=not args.no_progress)
    except KeyboardInterrupt:  # the temporary file is already removed; an old output is untouched
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except Exception as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
