"""generate.py end to end (subprocess, the real CLI) on tiny models: the answer is our greedy decoding of
the config's template, --file in lines and JSONL, the interactive chat, and every bad input: a prompt
longer than the context (cut from the left, one warning; a chat drops its oldest turns first), non-UTF-8
in --file (one line naming the line), an adapter for another base, bad sampling values."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import hf_fixtures
import pytest
from export_testlib import REPO, SMOLLM2, cli_env, error_line, make_model, run_cli, save_adapter, write_config

LLAMA3_CHAT = {"template": "chat", "system": "Elenca le entità", "instruction": ""}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate_cli")
    model_dir = make_model(root, "llama-spm")
    adapter = save_adapter(model_dir, root / "adapter")
    chat_dir = make_model(root, "llama3-bpe")
    chat_adapter = save_adapter(chat_dir, root / "chat-adapter")
    return {"cfg": write_config(root / "run.yaml", model_dir, root / "run"), "adapter": adapter,
            "model": model_dir, "chat_cfg": write_config(root / "chat.yaml", chat_dir, root / "chat-run",
                                                         **LLAMA3_CHAT),
            "chat_adapter": chat_adapter, "root": root}


def _our_greedy(cfg_path, adapter, text: str, n: int) -> str:
    import llama
    from finetune.config import load_config
    from finetune.data import templates
    from finetune.evaluate.dense import densify
    from finetune.evaluate.evaluator import load_for_eval

    cfg = load_config(cfg_path)
    tok = llama.Tokenizer.from_pretrained(cfg.model.path)
    model = densify(load_for_eval(cfg, cfg.model.path, adapter))
    ids = templates.prompt_ids(tok, cfg.data, text)
    stops = sorted({*templates.stop_ids(tok, cfg.data), *model.config.eos_token_ids})
    return tok.decode(llama.generate_ids(model, [ids], max_new_tokens=n, eos_id=stops, pad_id=tok.pad_id)[0])


def test_prompt_streams_our_greedy_answer(setup):
    text = "Gentile Mario Rossi, la consegna a Milano è confermata."
    r = run_cli("generate.py", setup["cfg"], "--adapter", setup["adapter"], "--prompt", text,
                "--max-new-tokens", 12)
    assert r.returncode == 0, r.stderr
    want = _our_greedy(setup["cfg"], setup["adapter"], text, 12)
    assert r.stdout.startswith(want + "\n")


def test_file_of_lines_and_jsonl_rows_give_jsonl(setup, tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("Gentile Mario Rossi\n\nCiao Giulia, a Roma!\n", encoding="utf-8")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"input_text": "Gentile Mario Rossi"}) + "\n"
                    + json.dumps({"input_text": "Ciao Giulia, a Roma!"}) + "\n", encoding="utf-8")
    outs = []
    for f in (lines, rows):
        r = run_cli("generate.py", setup["cfg"], "--adapter", setup["adapter"], "--file", f,
                    "--max-new-tokens", 6)
        assert r.returncode == 0, r.stderr
        records = [json.loads(line) for line in r.stdout.splitlines()]
        assert [rec["input"] for rec in records] == ["Gentile Mario Rossi", "Ciao Giulia, a Roma!"]
        assert all(isinstance(rec["output"], str) and rec["truncated"] is False for rec in records)
        outs.append([rec["output"] for rec in records])
    assert outs[0] == outs[1]
    assert outs[0][0] == _our_greedy(setup["cfg"], setup["adapter"], "Gentile Mario Rossi", 6)


def test_non_utf8_file_names_the_line(setup, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_bytes("prima riga\nseconda riga è ok\n".encode() + "terza: perché\n".encode("latin-1"))
    r = run_cli("generate.py", setup["cfg"], "--adapter", setup["adapter"], "--file", f)
    assert r.returncode == 2
    line = error_line(r.stderr)
    assert "line 3 is not UTF-8" in line
    assert r.stdout == ""


def test_prompt_longer_than_the_context_is_cut_from_the_left_with_one_warning(setup):
    text = "parola " * 400  # the tiny model's context is 256 tokens
    r = run_cli("generate.py", setup["cfg"], "--adapter", setup["adapter"], "--prompt", text,
                "--max-new-tokens", 8)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: the prompt")]
    assert len(warnings) == 1 and "cut from the left" in warnings[0], r.stderr


def test_chat_session_keeps_history_and_drops_oldest_turns_first(setup):
    long = "Gentile Mario Rossi, la consegna per Acme a Milano è confermata. " * 3
    stdin = "\n".join([long, long, "/reset", "ciao", long, long, long, "/quit"]) + "\n"
    r = run_cli("generate.py", setup["chat_cfg"], "--adapter", setup["chat_adapter"], "--max-new-tokens", 24,
                stdin=stdin)
    assert r.returncode == 0, r.stderr
    dropped = [line for line in r.stderr.splitlines() if "dropped the" in line]
    assert dropped and all("oldest turn" in line for line in dropped), r.stderr
    assert "(conversation forgotten)" in r.stderr
    assert not [line for line in r.stderr.splitlines() if line.startswith("warning: the prompt")]


def test_chat_history_is_what_the_template_renders(tmp_path):
    """In process: the second turn's prompt is the template's rendering of the whole conversation."""
    from transformers import AutoTokenizer

    import llama
    from finetune import tryout
    from finetune.config import load_config

    model_dir = make_model(tmp_path, "llama3-bpe")
    cfg = load_config(write_config(tmp_path / "chat.yaml", model_dir, tmp_path / "run", **LLAMA3_CHAT))
    model, tok = llama.from_pretrained(str(model_dir)), llama.Tokenizer.from_pretrained(model_dir)
    session = tryout.Session(cfg, model, tok, tryout.Sampling(max_new_tokens=4), warn=lambda s: None)
    session.history.append(("primo", "risposta"))
    ids, cut = session.prompt_ids("secondo")
    hf = AutoTokenizer.from_pretrained(model_dir)
    msgs = [{"role": "system", "content": "Elenca le entità"}, {"role": "user", "content": "primo"},
            {"role": "assistant", "content": "risposta"}, {"role": "user", "content": "secondo"}]
    assert ids == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert not cut


BAD_SAMPLING = [(["--top-p", "2"], "--top-p"), (["--max-new-tokens", "0"], "--max-new-tokens"),
                (["--temperature", "-1"], "--temperature"), (["--top-k", "0"], "--top-k")]


@pytest.mark.parametrize("args,needle", BAD_SAMPLING)
def test_bad_sampling_values_are_one_line(setup, args, needle):
    r = run_cli("generate.py", setup["cfg"], "--adapter", setup["adapter"], "--prompt", "x", *args)
    assert r.returncode == 2
    assert needle in error_line(r.stderr)


def test_adapter_for_another_base_is_the_shape_error(setup, tmp_path):
    other = hf_fixtures.make_hf_checkpoint(tmp_path / "other", hidden_size=32, intermediate_size=64)
    adapter = save_adapter(other, tmp_path / "other-adapter")
    r = run_cli("generate.py", setup["cfg"], "--adapter", adapter, "--prompt", "ciao")
    assert r.returncode == 2
    line = error_line(r.stderr)
    assert "cannot use adapter" in line and "shape" in line


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").is_file(),
                    reason="models/SmolLM2-135M-Instruct is absent")
def test_ctrl_c_stops_one_answer_not_the_session(tmp_path):
    """SIGINT while SmolLM2 streams a long answer: the answer stops, the session reads the next line."""
    cfg = write_config(tmp_path / "chat.yaml", SMOLLM2, tmp_path / "run", template="chat", system=None,
                       instruction="")
    p = subprocess.Popen([sys.executable, str(REPO / "generate.py"), str(cfg), "--adapter", "none",
                          "--max-new-tokens", "400", "--temperature", "1.0", "--seed", "1"], cwd=REPO,
                         env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    p.stdin.write("Scrivi una lunga storia su Milano.\n")
    p.stdin.flush()
    first = p.stdout.read(1)  # the first streamed character: generation is under way
    assert first
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    out, err = p.communicate("/quit\n", timeout=120)
    assert p.returncode == 0, err
    assert "(answer stopped)" in err and "Traceback" not in err
