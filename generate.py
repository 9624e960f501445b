"""Try the fine-tuned model: answers streamed token by token, prompts laid out as in training.

    python generate.py CONFIG.yaml [--adapter DIR|none] [--prompt TEXT | --file FILE]
                       [--max-new-tokens N] [--temperature T --top-k K --top-p P] [--seed S]

The prompt is rendered with the config's own template (alpaca, llama2-chat, the model's chat template, a
custom string). Greedy unless --temperature > 0. Entity answers are followed by the entities read from
them. Without --prompt/--file: an interactive session (chat templates keep the conversation; /reset,
/quit; Ctrl-C stops one answer). --file: one prompt per line, or a JSONL of rows (the data.input_column,
"input" or "prompt" field); writes one JSON line per prompt to stdout. A prompt longer than the context is
cut from the left with one warning line. Mistakes a user can fix print one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import sys

from finetune.errors import report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run config YAML (the one used for training)")
    p.add_argument("--adapter", help="PEFT adapter dir (default: eval.adapter, else "
                   "<train.output_dir>/final); 'none' uses model.path as is")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="one prompt (the input text, laid out by the template)")
    source.add_argument("--file", help="prompts, one per line, or a .jsonl of rows; JSONL answers on "
                        "stdout")
    p.add_argument("--max-new-tokens", type=int, help="answer length limit (default: eval.max_new_tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the smallest set holding this probability")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set model.device=cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from finetune import tryout
        from finetune.config import load_config

        cfg = load_config(args.config, overrides=list(args.overrides))
        n = cfg.eval.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
        sampling = tryout.Sampling(max_new_tokens=n,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   seed=args.seed)
        sampling.check()
        prompts = list(tryout.read_prompts(args.file, cfg.data.input_column)) if args.file else None
        if prompts is not None and not prompts:
            raise tryout.UserError(f"--file {args.file} holds no prompts")
        model, tok = tryout.load(cfg, args.adapter)
        session = tryout.Session(cfg, model, tok, sampling)
        if args.file:
            tryout.run_file(session, args.file, sys.stdout)
        elif args.prompt is not None:
            answer = session.answer(args.prompt, sys.stdout)
            tryout.show_entities(answer, sys.stdout)
        else:
            tryout.interactive(session)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except Exception as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
