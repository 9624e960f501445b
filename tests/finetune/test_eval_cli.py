"""eval.py end to end on the tiny fixture Llama: files, determinism, oracles (transformers + peft), errors."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import eval as eval_cli
import train as train_cli
from finetune import plots
from finetune.evaluate import report
from finetune.evaluate.evaluator import score

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_PEOPLE = ["Mario Rossi", "Giulia Bianchi", "Luca Ferrari", "Chiara Romano", "Sofia Ricci"]
_CITIES = ["Milano", "Roma", "Torino", "Forlì", "Cantù"]
_ORGS = ["Acme S.p.A.", "Banca Intesa", "Poste Italiane"]


def write_csv(path: Path, n: int = 20) -> Path:
    """Tiny Italian entity data in the training format (one ``span: TYPE`` per line)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["input_text", "output_text"])
        for i in range(n):
            person, city, org = _PEOPLE[i % 5], _CITIES[(i * 2) % 5], _ORGS[i % 3]
            if i % 4 == 3:  # some rows without entities: the target is just EOS
                w.writerow([f"Grazie mille, a presto ({i}).", ""])
            else:
                w.writerow([f"Gentile {person}, la consegna per {org} a {city} è confermata.",
                            f"{person}: PER\n{org}: ORG\n{city}: LOC"])
    return path


def write_config(path: Path, model_dir: Path, data: Path, run_dir: Path, **sections) -> Path:
    cfg = {
        "model": {"path": str(model_dir), "device": "cpu", "dtype": "float32"},
        "quant": {"enabled": False},
        "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        "data": {"path": str(data), "template": "Testo: {input}\nEntità:\n{output}", "max_length": 96,
                 "train_size": 12, "test_size": 8},
        "train": {"output_dir": str(run_dir)},
        "eval": {"max_new_tokens": 8, "batch_size": 4},
    }
    for name, values in sections.items():
        cfg[name].update(values)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def save_random_adapter(model_dir: Path, out: Path, seed: int = 1, **inject) -> Path:
    """An adapter as training would leave it: lora.inject, then non-zero A and B, lora.save_adapter."""
    import llama
    import lora

    model = llama.from_pretrained(str(model_dir))
    lora.inject(model, **({"targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8, "dropout": 0.0} | inject))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sorted(lora.lora_modules(model).items()):
            for p in (m.lora_A.weight, m.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    lora.save_adapter(model, out, base_model_name_or_path=str(model_dir))
    return out


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test's own setup printed (e.g. transformers' progress bars)
    rc = eval_cli.main([str(a) for a in args] + ["--no-progress"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def hf_response_loss(hf, tok, cfg, rows) -> tuple[float, int]:
    """Oracle: token-weighted response loss from a transformers/peft model, one example at a time."""
    from finetune.data.examples import encode_example

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ex = encode_example(tok, cfg.data, row)
            labels = torch.tensor([ex.labels])
            n = int((labels[:, 1:] != -100).sum())  # HF shifts: logits[t] predict labels[t + 1]
            total += hf(input_ids=torch.tensor([ex.input_ids]), labels=labels).loss.item() * n
            count += n
    return total / count, count


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_env")
    data = write_csv(root / "entities.csv")
    run = root / "run"
    save_random_adapter(tiny_model_dir, run / "final")
    lines = [{"step": s, "loss": 3.0 / s, "lr": 1e-4 * (1 - s / 10), "grad_norm": 1.0 / s,
              "tokens_per_s": 900.0} for s in range(1, 9)]
    lines += [{"step": 4, "eval_loss": 2.0}, {"step": 8, "eval_loss": 1.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9, "lo')
    cfg = write_config(root / "cfg.yaml", tiny_model_dir, data, run)
    return {"root": root, "data": data, "run": run, "cfg": cfg, "model": tiny_model_dir}


# ---------------------------------------------------------------------------------------------------
# end to end


def test_eval_end_to_end_matches_transformers_and_peft(env, capsys) -> None:
    out1, out2 = env["root"] / "e2e-1", env["root"] / "e2e-2"
    rc, stdout, err = run_cli([env["cfg"], "--output", out1, "--limit", 6], capsys)
    assert rc == 0, err
    assert "micro F1" in stdout and "ROUGE-L" in stdout and "tokens/s" in stdout
    for name in ("predictions.jsonl", "metrics.json", "report.md", "plots/per_type_f1.png",
                 "plots/training_curves.png"):
        assert (out1 / name).is_file(), name
    for png in (out1 / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    m = json.loads((out1 / "metrics.json").read_text())
    preds = [json.loads(line) for line in (out1 / "predictions.jsonl").read_text().splitlines()]
    assert m["n_examples"] == len(preds) == 6 and m["adapter"] == str(env["run"] / "final")
    assert {"input", "gold", "prediction", "entities", "parse_failed"} <= preds[0].keys()
    assert m["timing"]["generated_tokens"] > 0 and m["timing"]["tokens_per_s"] > 0
    assert math.isfinite(m["loss"]["eval_loss"]) and m["loss"]["perplexity"] == pytest.approx(
        math.exp(m["loss"]["eval_loss"]))
    # the stored scores are the metric functions applied to the stored answers
    again = score([p["gold"] for p in preds], [p["prediction"] for p in preds], [p["input"] for p in preds])
    assert again["entities"] == m["entities"] and again["rouge"] == m["rouge"]

    # greedy decoding is deterministic: a second run writes the same answers
    assert run_cli([env["cfg"], "--output", out2, "--limit", 6], capsys)[0] == 0
    assert [json.loads(x)["prediction"] for x in (out2 / "predictions.jsonl").read_text().splitlines()] == [
        p["prediction"] for p in preds]

    # Oracle: transformers + peft on the same prompt ids give the same greedy answers and the same
    # token-weighted response loss (our run batched 4 left-padded prompts; the oracle runs one by one).
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    import llama
    from finetune.config import load_config
    from finetune.data.examples import encode_example
    from finetune.data.rows import load_rows, split_rows

    cfg = load_config(env["cfg"])
    tok = llama.Tokenizer.from_pretrained(str(env["model"]))
    rows = split_rows(load_rows(cfg.data), cfg.data)[1][:6]
    hf = LlamaForCausalLM.from_pretrained(env["model"])
    hf = PeftModel.from_pretrained(hf, env["run"] / "final").eval()
    with torch.no_grad():
        for row, pred in zip(rows, preds):
            ex = encode_example(tok, cfg.data, row)
            prompt = torch.tensor([ex.input_ids[:ex.prompt_len]])
            gen = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                              do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
            new = gen[0, ex.prompt_len:].tolist()
            new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
            assert tok.decode(new) == pred["prediction"]
            assert pred["gold"] == row.output and pred["input"] == row.input
    loss, count = hf_response_loss(hf, tok, cfg, rows)
    assert m["loss"]["tokens"] == count
    assert m["loss"]["eval_loss"] == pytest.approx(loss, rel=1e-5)


def test_baseline_differs_from_adapter_and_uses_its_own_dir(env, capsys) -> None:
    rc, _, err = run_cli([env["cfg"], "--baseline", "--limit", 4], capsys)
    assert rc == 0, err
    base = env["run"] / "eval-baseline"
    m = json.loads((base / "metrics.json").read_text())
    assert m["adapter"] is None and m["baseline"] is True
    assert not (base / "plots" / "training_curves.png").exists()  # no run behind a bare base model
    rc, _, err = run_cli([env["cfg"], "--limit", 4], capsys)  # default adapter: <run>/final
    assert rc == 0, err
    tuned = json.loads((env["run"] / "eval" / "metrics.json").read_text())
    assert tuned["loss"]["eval_loss"] != pytest.approx(m["loss"]["eval_loss"])  # the adapter is applied


# ---------------------------------------------------------------------------------------------------
# user errors: one line on stderr, exit code 2


def _assert_user_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_missing_adapter_dir(env, capsys) -> None:
    rc, _, err = run_cli([env["cfg"], "--adapter", env["root"] / "nope"], capsys)
    _assert_user_error(rc, err, "adapter directory not found", "nope")


def test_no_trained_run_yet(env, capsys) -> None:
    rc, _, err = run_cli([env["cfg"], "--set", f"train.output_dir={env['root'] / 'fresh'}"], capsys)
    _assert_user_error(rc, err, "no trained adapter", "--baseline")


def test_adapter_for_another_base(env, capsys, tmp_path: Path) -> None:
    import hf_fixtures

    other = hf_fixtures.make_hf_checkpoint(tmp_path / "wide", hidden_size=96, num_attention_heads=4)
    adapter = save_random_adapter(other, tmp_path / "wide_adapter")
    rc, _, err = run_cli([env["cfg"], "--adapter", adapter], capsys)
    _assert_user_error(rc, err, "cannot use adapter", "shape")
    not_an_adapter = tmp_path / "empty"
    not_an_adapter.mkdir()
    rc, _, err = run_cli([env["cfg"], "--adapter", not_an_adapter], capsys)
    _assert_user_error(rc, err, "adapter_config.json")


def test_limit_zero_and_empty_split(env, capsys) -> None:
    rc, _, err = run_cli([env["cfg"], "--limit", 0], capsys)
    _assert_user_error(rc, err, "--limit must be >= 1")
    rc, _, err = run_cli([env["cfg"], "--set", "data.test_size=0", "data.train_size=null"], capsys)
    _assert_user_error(rc, err, "test split", "empty")
    rc, _, err = run_cli([env["cfg"], "--baseline", "--adapter", env["run"] / "final"], capsys)
    _assert_user_error(rc, err, "--baseline")
    rc, _, err = run_cli([env["root"] / "missing.yaml"], capsys)
    _assert_user_error(rc, err, "config file not found")


def test_cli_entry_point_exit_code(env) -> None:
    cmd = [sys.executable, "eval.py", str(env["cfg"]), "--adapter", str(env["root"] / "nope")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    _assert_user_error(proc.returncode, proc.stderr, "adapter directory not found")


def test_real_bugs_keep_their_traceback() -> None:
    import lora

    assert eval_cli.is_user_error(lora.LoRAError("x"))
    assert not eval_cli.is_user_error(ValueError("x"))      # a plain ValueError is a bug, not user input
    assert not eval_cli.is_user_error(KeyError("x"))


def test_both_clis_print_a_user_error_as_one_line() -> None:
    from finetune.errors import error_line

    assert error_line(ValueError("bad value\n  in line 2\t(fix it)")) == "error: bad value in line 2 (fix it)"
    assert train_cli.is_user_error is eval_cli.is_user_error  # one rule for what is the user's mistake


# ---------------------------------------------------------------------------------------------------
# report pieces without a model


def _fake_metrics() -> dict:
    golds = ["Mario Rossi: PER\nRoma: LOC", "Acme: ORG", ""]
    preds = ["Mario Rossi: PER\nRoma: ORG", "Acme: ORG", "sure!"]
    m = score(golds, preds, ["Mario Rossi a Roma", "Acme", "ciao"])
    m.update(model="m", adapter=None, split="test", n_examples=3,
             generation={"max_new_tokens": 8, "batch_size": 2, "stop_at_eos": True},
             loss={"eval_loss": math.nan, "perplexity": math.nan, "tokens": 0},
             timing={"generate_s": 1.5, "per_example_s": 0.5, "generated_tokens": 30, "tokens_per_s": 20.0})
    return m


def test_table_report_and_plots(tmp_path: Path) -> None:
    m = _fake_metrics()
    table = report.format_table(m)
    assert "micro F1" in table and " 66.67" in table   # 2 of 3 predicted correct, 2 of 3 gold
    assert "n/a" in table                              # NaN loss shown as n/a, not as a crash
    bars = plots.plot_per_type_f1(m["entities"]["per_type"], tmp_path / "plots" / "f1.png")
    path = report.write_report(m, tmp_path, [bars], samples=[{"input": "a", "gold": "b", "prediction": "c"}])
    text = path.read_text()
    assert "| ORG | 50.00 | 100.00 | 66.67 | 1 | 2 |" in text and "](plots/f1.png)" in text
    assert bars.read_bytes()[:8] == PNG_MAGIC


def test_training_curves_from_metrics_jsonl(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0, "lr": 0.001, "grad_norm": 1.0, "tokens_per_s": 10}\n'
                   '{"step": 2, "loss": 1.5, "lr": 0.001, "grad_norm": 0.5, "tokens_per_s": 12}\n'
                   '{"step": 2, "eval_loss": 1.7}\n'
                   "not json\n"
                   '{"step": 3, "loss": 1.')  # a line cut by a crash
    records = report.read_metrics_jsonl(log)
    assert [r["step"] for r in records] == [1, 2, 2]
    png = plots.plot_training_curves(records, tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:8] == PNG_MAGIC
    assert plots.plot_training_curves([{"step": 1}], tmp_path / "none.png") is None


def test_merged_export_scores_like_base_plus_adapter(env, capsys, tmp_path: Path) -> None:
    """A lora.merge_and_export dir, given as --adapter or as model.path + --adapter none, gives the
    same greedy answers as the base with the adapter (fp32: merging changes nothing but rounding)."""
    import llama
    import lora

    model = llama.from_pretrained(str(env["model"]))
    lora.load_adapter(model, env["run"] / "final")
    merged = lora.merge_and_export(model, tmp_path / "merged", env["model"])
    answers = {}
    for name, args in {"adapter": [], "merged-as-adapter": ["--adapter", merged],
                       "merged-as-model": ["--adapter", "none", "--set", f"model.path={merged}"]}.items():
        rc, _, err = run_cli([env["cfg"], "--limit", 4, "--output", tmp_path / name, *args], capsys)
        assert rc == 0, err
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        assert m["adapter"] is None if name != "adapter" else m["adapter"] == str(env["run"] / "final")
        assert name == "adapter" or m["model"] == str(merged)
        answers[name] = [json.loads(x)["prediction"]
                         for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        answers[name + " loss"] = m["loss"]["eval_loss"]
    assert answers["adapter"] == answers["merged-as-adapter"] == answers["merged-as-model"]
    assert answers["merged-as-model loss"] == pytest.approx(answers["adapter loss"], rel=1e-5)


def test_4bit_base_with_adapter_matches_transformers_bnb_peft(env, capsys, tmp_path: Path) -> None:
    """quant.enabled: the base loads as NF4 (bitsandbytes on CPU) with the adapter on top; the eval loss
    equals transformers' own bitsandbytes 4-bit load (NF4, double quant, lm_head kept) + peft."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    import llama
    from finetune.config import load_config
    from finetune.data.rows import load_rows, split_rows

    rc, out, err = run_cli([env["cfg"], "--limit", 4, "--output", tmp_path, "--set", "quant.enabled=true"],
                           capsys)
    assert rc == 0, err
    assert "4-bit" in out  # modeling logs quant's memory report
    m = json.loads((tmp_path / "metrics.json").read_text())

    cfg = load_config(env["cfg"])
    tok = llama.Tokenizer.from_pretrained(str(env["model"]))
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(env["model"], quantization_config=bnb, device_map="cpu",
                                          dtype=torch.float32)
    hf = PeftModel.from_pretrained(hf, env["run"] / "final").eval()
    loss, count = hf_response_loss(hf, tok, cfg, split_rows(load_rows(cfg.data), cfg.data)[1][:4])
    assert m["loss"]["tokens"] == count
    assert m["loss"]["eval_loss"] == pytest.approx(loss, rel=1e-5)


def test_eval_after_a_real_training_run(capsys, tmp_path: Path, tiny_model_dir: Path) -> None:
    """train.py then eval.py: the default adapter is <run>/final, the eval loss equals the loss the loop
    logged for the same adapter, a checkpoint dir scores as its step did, and the run's curves are plotted."""
    import train as train_cli

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, write_csv(tmp_path / "d.csv"), run,
                       train={"max_steps": 4, "logging_steps": 1, "eval_steps": 2, "save_steps": 2,
                              "micro_batch_size": 4, "gradient_accumulation_steps": 1, "lr": 3e-2},
                       lora={"dropout": 0.0})
    assert train_cli.main([str(cfg), "--no-progress"]) == 0
    logged = {r["step"]: r["eval_loss"] for r in report.read_metrics_jsonl(run / "metrics.jsonl")
              if "eval_loss" in r}
    assert set(logged) == {2, 4}
    rc, _, err = run_cli([cfg], capsys)
    assert rc == 0, err
    final = json.loads((run / "eval" / "metrics.json").read_text())
    assert final["adapter"] == str(run / "final") and final["run_dir"] == str(run)
    assert final["loss"]["eval_loss"] == pytest.approx(logged[4], rel=1e-6)
    assert (run / "eval" / "plots" / "training_curves.png").read_bytes()[:8] == PNG_MAGIC
    step_dir = run / "checkpoints" / "step-2"
    rc, _, err = run_cli([cfg, "--adapter", step_dir, "--output", tmp_path / "e2"], capsys)
    assert rc == 0, err
    step2 = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert step2["loss"]["eval_loss"] == pytest.approx(logged[2], rel=1e-6)
    assert step2["run_dir"] == str(run)
