"""The evaluator behind ``eval.py``: generate answers for a split, score them, write the files.

    metrics = run_eval(cfg, adapter=None, baseline=False)   # cfg.eval holds split, limit, batch size...

Flow: rows (``finetune.data.rows``: same file, same seeded split as training) -> prompts tokenised exactly as
in training (``encode_example``: ``templates.prompt_ids``, the chat's generation prompt included, so the
model sees the very ids it was trained on) -> base model (4-bit as configured) + adapter -> batched
greedy KV-cache decoding (``llama.generate_ids``) -> ``finetune.evaluate.metrics`` -> ``predictions.jsonl``,
``metrics.json``, ``report.md``, ``plots/*.png`` in the eval output dir.

The eval loss is the training loop's own (``finetune.run.loss.eval_loss``): summed token cross-entropy over
the response tokens (+ EOS) of the split divided by their count (token-weighted, not a mean of means).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import llama
import lora
from finetune import files, preflight
from finetune import plots as P
from finetune.compiling import compiler_problem
from finetune.config import RunConfig
from finetune.data import templates
from finetune.data.examples import Example, encode_example, padding_id
from finetune.data.rows import Row, load_rows, split_rows
from finetune.errors import UserError
from finetune.evaluate import metrics as M
from finetune.evaluate import report
from finetune.evaluate.dense import maybe_densify
from finetune.modeling import load_model
from finetune.run.loss import LossSetup, eval_loss

NO_ADAPTER = "none"  # --adapter none: score model.path as it is (e.g. a merged export)


# ---------------------------------------------------------------------------------------------------
# where things are


def resolve_weights(cfg: RunConfig, adapter: str | None = None, baseline: bool = False
                    ) -> tuple[str, Path | None]:
    """(model directory, adapter directory or None) to evaluate.

    Adapter order: ``--baseline`` (none) > ``adapter`` argument > ``eval.adapter`` >
    ``<train.output_dir>/final``. ``"none"`` means no adapter: ``model.path`` is scored as it is (e.g. a
    merged export). A chosen directory that holds a whole model (``config.json``, no
    ``adapter_config.json``: a full-training run's ``final/`` or a ``lora.merge_and_export`` dir) is
    scored *instead of* ``model.path``. A requested adapter that does not exist is an error, never a
    silent fall-back to the base model.
    """
    if baseline:
        if adapter not in (None, NO_ADAPTER):
            raise UserError(f"--baseline scores the model without an adapter, but --adapter {adapter} was "
                            "also given; drop one of them")
        return cfg.model.path, None
    choice = adapter if adapter is not None else cfg.eval.adapter
    # eval.adapter: none in YAML arrives as an absolute path ending in "none" (config resolves paths)
    if choice is not None and (choice == NO_ADAPTER
                               or (Path(choice).name == NO_ADAPTER and not Path(choice).exists())):
        return cfg.model.path, None
    if choice is None:
        path = Path(cfg.train.output_dir) / "final"
        if not path.is_dir():
            raise UserError(f"no trained adapter at {path} (train.output_dir/final): train first with "
                            "train.py, pass --adapter DIR (e.g. a checkpoints/step-N dir), --adapter none "
                            "to score model.path as is (a merged export), or --baseline")
    else:
        path = Path(choice).expanduser().absolute()
        if not path.exists():
            raise UserError(f"adapter directory not found: {path}; pass --adapter with a dir holding "
                            "adapter_config.json and adapter_model.safetensors")
        if not path.is_dir():
            raise UserError(f"adapter {path} is not a directory; pass the dir holding adapter_config.json")
    if not (path / "adapter_config.json").is_file() and (path / "config.json").is_file():
        return str(path), None  # a full model directory, not an adapter
    return cfg.model.path, path


def resolve_output_dir(cfg: RunConfig, output_dir: str | None = None, baseline: bool = False) -> Path:
    """``--output`` > ``eval.output_dir`` > ``<train.output_dir>/eval`` (``eval-baseline`` for --baseline)."""
    chosen = output_dir or cfg.eval.output_dir
    if chosen:
        return Path(chosen).expanduser().absolute()
    return Path(cfg.train.output_dir) / ("eval-baseline" if baseline else "eval")


def run_dir_of(adapter_dir: Path | None) -> Path | None:
    """The training run an adapter came from (``<run>/final`` or ``<run>/checkpoints/step-N``), if any."""
    if adapter_dir is None:
        return None
    for candidate in (adapter_dir.parent, adapter_dir.parent.parent):
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------------
# data


def select_rows(cfg: RunConfig) -> list[Row]:
    """The rows of ``cfg.eval.split`` (same seeded split as training), cut to ``cfg.eval.limit``."""
    train_rows, test_rows = split_rows(load_rows(cfg.data), cfg.data)
    rows = test_rows if cfg.eval.split == "test" else train_rows
    if not rows:
        raise UserError(f"the {cfg.eval.split} split of {cfg.data.path} is empty (data.test_size="
                        f"{cfg.data.test_size}); set data.test_size > 0 or use --split train")
    limit = cfg.eval.limit
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit / eval.limit must be >= 1 (got {limit}); leave it out to score "
                            "the whole split")
        rows = rows[:limit]
    return rows


def encode_rows(tok: Any, cfg: RunConfig, rows: Sequence[Row]) -> tuple[list[Example], int]:
    """Tokenise rows as training does; rows that cannot fit ``data.max_length`` are counted, not scored."""
    examples, skipped = [], 0
    for row in rows:
        ex = encode_example(tok, cfg.data, row)
        if ex is None:
            skipped += 1
        else:
            examples.append(ex)
    if not examples:
        raise UserError(f"none of the {len(rows)} {cfg.eval.split} rows fits data.max_length="
                        f"{cfg.data.max_length}; raise data.max_length")
    return examples, skipped


def _gold_and_input(tok: Any, ex: Example) -> tuple[str, str]:
    """The reference answer and the input text; a preformatted text row's are decoded from its ids."""
    if ex.row is not None and not ex.row.is_text:
        return ex.row.output, ex.row.input
    return tok.decode(ex.input_ids[ex.prompt_len:-1]), tok.decode(ex.input_ids[1:ex.prompt_len])


# ---------------------------------------------------------------------------------------------------
# model work


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_for(cfg: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA as configured (the compute dtype training used); nothing on CPU."""
    if device.type != "cuda" or cfg.model.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, cfg.model.dtype))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_answers(model: torch.nn.Module, tok: Any, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int, batch_size: int, stop_at_eos: bool = True, progress: bool = True,
                     amp: Callable[[], contextlib.AbstractContextManager] | None = None,
                     compile: bool = False, stop_ids: Sequence[int] = ()) -> tuple[list[list[int]], float]:
    """Greedy new token ids per prompt (EOS excluded) and the wall time of the generation.

    Prompts are sorted by length before batching so each left-padded batch wastes little compute; the
    answers come back in the input order. ``stop_at_eos=False`` always generates ``max_new_tokens``.
    One ``generate_ids`` call for the whole split: every batch then shares one KV-cache length, so a
    compiled decode step (``compile``) keeps its shapes from batch to batch.
    """
    device = _device_of(model)
    # EOS ids of the tokenizer and the model, and the template's end of turn (``<|im_end|>``)
    eos = sorted({tok.eos_id, *model.config.eos_token_ids, *stop_ids} - {None}) if stop_at_eos else []
    _sync(device)
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="generating", unit="ex", disable=not progress, file=sys.stderr) as bar:
        with amp() if amp is not None else contextlib.nullcontext():
            out = llama.generate_ids(model, [list(p) for p in prompts], max_new_tokens=max_new_tokens,
                                     eos_id=eos, pad_id=padding_id(tok), batch_size=batch_size,
                                     compile=compile, progress=bar.update)
    _sync(device)
    return out, time.perf_counter() - start


def check_adapter(cfg: RunConfig, adapter_dir: Path) -> None:
    """Read and check the adapter's files (types, whole tensors, finite values, shapes against the base's
    config.json) without loading any model."""
    try:
        adapter_cfg, weights = lora.read_adapter(adapter_dir)
    except lora.LoRAError as e:
        raise UserError(f"cannot use adapter {adapter_dir}: {e}") from None
    try:
        preflight.check_adapter_shapes(weights, int(adapter_cfg["r"]), cfg.model.path)
    except UserError as e:
        raise UserError(f"cannot use adapter {adapter_dir} with the base model {cfg.model.path}: "
                        f"{e}") from None


def load_for_eval(cfg: RunConfig, model_path: str, adapter_dir: Path | None) -> torch.nn.Module:
    """Base model (quantised as configured) + the adapter, strictly; a mismatch is a one-line UserError."""
    if model_path != cfg.model.path:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model_path))
    model = load_model(cfg, for_training=False, log=print)  # stdout: stderr is for errors
    if adapter_dir is not None:
        try:
            lora.load_adapter(model, adapter_dir)
        except lora.LoRAError as e:
            raise UserError(f"cannot use adapter {adapter_dir} with the base model {cfg.model.path}: "
                            f"{e}") from None
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------------
# scoring and files


def score(golds: Sequence[str], predictions: Sequence[str], inputs: Sequence[str]) -> dict[str, Any]:
    """All text metrics of a split (no model needed): entities, ROUGE, BLEU."""
    return {"entities": M.entity_scores(golds, predictions, inputs).to_dict(),
            "rouge": M.rouge(predictions, golds), "bleu": M.bleu(predictions, golds)}


def run_eval(cfg: RunConfig, *, adapter: str | None = None, baseline: bool = False,
             output_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate one model on ``cfg.eval.split``; write the files; return the metrics dict (metrics.json).

    ``adapter``: a PEFT adapter dir, ``"none"``, or None (``eval.adapter``, else the run's ``final``);
    ``baseline``: the base model without adapter (default output ``<run>/eval-baseline``).
    """
    model_path, adapter_dir = resolve_weights(cfg, adapter, baseline)
    out = resolve_output_dir(cfg, output_dir, baseline)
    # everything that can fail in seconds fails before the (slow) model load and the generation:
    files.check_writable_dir(out, "eval output dir (--output / eval.output_dir)")
    if adapter_dir is not None:
        check_adapter(cfg, adapter_dir)
    preflight.check_max_length(cfg.data.max_length, model_path)
    preflight.check_model_weights(model_path)
    rows = select_rows(cfg)
    tok = llama.Tokenizer.from_pretrained(model_path)
    examples, skipped = encode_rows(tok, cfg, rows)
    preflight.check_token_ids(examples, model_path, cfg.data.path)
    model = load_for_eval(cfg, model_path, adapter_dir)
    device, eval_cfg = _device_of(model), cfg.eval

    loss, loss_tokens, loss_s = None, 0, 0.0
    if eval_cfg.compute_loss:  # the training loop's own eval loss, on the weights as trained (before a merge)
        setup = LossSetup(ce_chunk_size=cfg.train.ce_chunk_size, device=device,
                          autocast=lambda: autocast_for(cfg, device))
        loss, loss_tokens, loss_s = _timed_eval_loss(model, examples, pad_id=padding_id(tok),
                                                     batch_size=eval_cfg.batch_size, setup=setup)
    t0 = time.perf_counter()
    dense = maybe_densify(model, eval_cfg.dense)
    dense_s = time.perf_counter() - t0
    compiled = eval_cfg.compile and _compiler_works(device)
    prompts = [ex.input_ids[:ex.prompt_len] for ex in examples]
    new_ids, gen_s = generate_answers(model, tok, prompts, max_new_tokens=eval_cfg.max_new_tokens,
                                      batch_size=eval_cfg.batch_size, stop_at_eos=eval_cfg.stop_at_eos,
                                      progress=progress, amp=lambda: autocast_for(cfg, device),
                                      compile=compiled, stop_ids=templates.stop_ids(tok, cfg.data))
    predictions = [tok.decode(ids) for ids in new_ids]
    # tokens the decoder produced: the kept ones plus the EOS that ended a row early
    n_generated = sum(len(ids) + (eval_cfg.stop_at_eos and len(ids) < eval_cfg.max_new_tokens)
                      for ids in new_ids)
    per_s = (lambda n: n / gen_s) if gen_s > 0 else (lambda n: 0.0)

    golds, inputs = zip(*(_gold_and_input(tok, ex) for ex in examples))
    result: dict[str, Any] = {
        "model": model_path, "adapter": str(adapter_dir) if adapter_dir else None, "baseline": baseline,
        "split": eval_cfg.split, "limit": eval_cfg.limit, "n_examples": len(examples), "skipped": skipped,
        "truncated": sum(ex.truncated for ex in examples), "device": str(device),
        "generation": {"max_new_tokens": eval_cfg.max_new_tokens, "batch_size": eval_cfg.batch_size,
                       "stop_at_eos": eval_cfg.stop_at_eos, "decoding": "greedy", "dense": dense,
                       "compiled": compiled},
        **score(golds, predictions, inputs),
        "loss": {"eval_loss": loss, "perplexity": None if loss is None else M.perplexity(loss),
                 "tokens": loss_tokens},
        "timing": {"generate_s": gen_s, "per_example_s": gen_s / len(examples),
                   "generated_tokens": n_generated, "tokens_per_s": per_s(n_generated), "loss_s": loss_s,
                   "dense_s": dense_s, "examples_per_s": per_s(len(examples))},
    }
    try:
        return _write_outputs(result, out, examples=examples, predictions=predictions, golds=golds,
                              inputs=inputs, new_ids=new_ids, adapter_dir=adapter_dir)
    except OSError as e:  # the scores exist: show them rather than lose minutes of generation
        entities = result["entities"]
        raise UserError(f"could not write the evaluation files to {out}: {files.describe_os_error(e)}; free "
                        f"space or pass another --output (scores of this run: micro F1 "
                        f"{100 * entities['f1']:.2f}%, precision {100 * entities['precision']:.2f}%, "
                        f"recall {100 * entities['recall']:.2f}%)") from None


def _timed_eval_loss(model: torch.nn.Module, examples: Sequence[Example], *, pad_id: int, batch_size: int,
                     setup: LossSetup) -> tuple[float, int, float]:
    """(token-weighted CE over the response tokens + EOS, their count, seconds)."""
    _sync(setup.device)
    t0 = time.perf_counter()
    loss, n = eval_loss(model, examples, pad_id=pad_id, batch_size=batch_size, setup=setup)
    _sync(setup.device)
    return loss, n, time.perf_counter() - t0


def _compiler_works(device: torch.device) -> bool:
    """eval.compile asks for a compiled decode step; without a working compiler say so and decode eager."""
    problem = compiler_problem(device)
    if problem is not None:
        print(f"eval.compile: true, but torch.compile does not work on this machine ({problem}); "
              "decoding eager")
    return problem is None


def _write_outputs(result: dict[str, Any], out: Path, *, examples: Sequence[Example],
                   predictions: Sequence[str], golds: Sequence[str], inputs: Sequence[str],
                   new_ids: Sequence[Sequence[int]], adapter_dir: Path | None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (ex, pred, gold, source) in enumerate(zip(examples, predictions, golds, inputs)):
        parsed, gold_parsed = M.parse_entities(pred), M.parse_entities(gold)
        records.append({"index": i, "source": ex.row.source if ex.row else None, "input": source,
                        "gold": gold, "prediction": pred, "entities": [list(e) for e in parsed.entities],
                        "gold_entities": [list(e) for e in gold_parsed.entities],
                        "parse_failed": parsed.failed, "format": parsed.format,
                        "generated_tokens": len(new_ids[i]), "truncated": ex.truncated})
    # exclusive temp files, never a planted symlink; durable=False: an evaluation can be re-run
    files.write_text_atomic(out / "predictions.jsonl",
                            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), durable=False)
    if P.matplotlib_missing():  # the expensive part is done: no pictures is no reason to fail
        warnings.warn("matplotlib is not installed: no plots (pip install 'qlora-llama[plot]')", stacklevel=2)
    pngs = [P.plot_per_type_f1(result["entities"]["per_type"], out / "plots" / "per_type_f1.png")]
    run_dir = run_dir_of(adapter_dir)
    if run_dir is not None:
        pngs.append(P.plot_training_curves(report.read_metrics_jsonl(run_dir / "metrics.jsonl"),
                                           out / "plots" / "training_curves.png"))
    plots = [p for p in pngs if p is not None]
    result["run_dir"] = str(run_dir) if run_dir else None
    result["files"] = {"predictions": str(out / "predictions.jsonl"), "metrics": str(out / "metrics.json"),
                       "report": str(out / "report.md"), "plots": [str(p) for p in plots]}
    files.write_text_atomic(out / "metrics.json", json.dumps(_finite(result), indent=2, ensure_ascii=False)
                            + "\n", durable=False)
    report.write_report(result, out, plots, samples=records[:5])
    return result


def _finite(value: Any) -> Any:
    """NaN/inf -> None so metrics.json stays strict JSON (json.dumps would write NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
