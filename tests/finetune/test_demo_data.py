"""The shipped demo data and tokenizer: reproducible from their scripts, well-formed, readable by the loop.

data/emails.csv, data/emails_unlabelled.jsonl (scripts/make_demo_data.py) and models/demo/tokenizer.model
(scripts/make_demo_tokenizer.py) are committed; these tests regenerate them and compare bytes, check every
label against its email, and read the files through the training pipeline's own loaders.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from finetune.config import DataConfig, load_config
from finetune.data.rows import load_rows, split_rows
from finetune.data.templates import format_prompt
from finetune.evaluate.metrics import normalize_span, parse_entities
from llama.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
DATA_CSV = ROOT / "data" / "emails.csv"
UNLABELLED = ROOT / "data" / "emails_unlabelled.jsonl"
DEMO_DIR = ROOT / "models" / "demo"


pytest.importorskip("faker", reason="the demo data generator needs Faker (the project's `demo` extra)")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _load_script("make_demo_data")
tokscript = _load_script("make_demo_tokenizer")


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    with DATA_CSV.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _same_faker() -> bool:
    import faker

    return faker.VERSION == gen.FAKER_VERSION


needs_same_faker = pytest.mark.skipif(not _same_faker(), reason=f"committed data was made with Faker "
                                      f"{gen.FAKER_VERSION}; another release draws other names")


# ------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        gen.write_csv(gen.generate(60, seed), tmp_path / f"{name}.csv")
    a, b, c = ((tmp_path / f"{n}.csv").read_bytes() for n in "abc")
    assert a == b and a != c


def test_output_does_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    # Python salts str hashes per process: any set/dict-order dependence would show up here.
    gen.write_csv(gen.generate(300, 11), tmp_path / "here.csv")
    code = ("import sys; from pathlib import Path; sys.path.insert(0, 'scripts'); "
            "import make_demo_data as g; g.write_csv(g.generate(300, 11), Path(sys.argv[1]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there.csv")], cwd=ROOT, env=env, check=True)
    assert (tmp_path / "here.csv").read_bytes() == (tmp_path / "there.csv").read_bytes()


@needs_same_faker
def test_committed_data_files_equal_a_fresh_generation(tmp_path: Path) -> None:
    gen.main(["--out-dir", str(tmp_path)])
    for name in ("emails.csv", "emails_unlabelled.jsonl"):
        fresh, committed = tmp_path / name, ROOT / "data" / name
        assert gen.sha256(fresh) == gen.sha256(committed), f"{committed} differs from the script's output"


def test_committed_tokenizer_equals_a_fresh_training(tmp_path: Path) -> None:
    tokscript.train_tokenizer(tokscript.corpus_sentences(UNLABELLED), tmp_path)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / name, DEMO_DIR / name)]
        assert digest[0] == digest[1], f"models/demo/{name} differs from make_demo_tokenizer.py output"


# ------------------------------------------------------------------------------------------ labels
def test_every_entity_is_verbatim_in_its_email_in_order(rows: list[dict[str, str]]) -> None:
    assert len(rows) == gen.LABELLED_ROWS and list(rows[0]) == ["input_text", "output_text"]
    for i, row in enumerate(rows):
        text, lines = row["input_text"], row["output_text"].split("\n")
        assert lines and all(lines), f"row {i}: empty entity line"
        pairs = [line.rsplit(": ", 1) for line in lines]
        assert all(len(p) == 2 and p[1] in gen.TYPES for p in pairs), f"row {i}: {lines}"
        assert len({tuple(p) for p in pairs}) == len(pairs), f"row {i}: duplicate entity"
        for span, _ in pairs:
            assert span and span == span.strip() and span in text, f"row {i}: {span!r} not in the email"


def test_generator_records_where_each_entity_was_written() -> None:
    for email in gen.generate(500, 99):
        assert email.starts == sorted(email.starts)  # order of first appearance
        for (span, _), start in zip(email.entities, email.starts):
            assert email.text[start:start + len(span)] == span


def test_the_project_parser_reads_every_answer(rows: list[dict[str, str]]) -> None:
    for row in rows:
        parsed = parse_entities(row["output_text"])
        assert not parsed.failed
        expected = [(normalize_span(line.rsplit(": ", 1)[0]), line.rsplit(": ", 1)[1])
                    for line in row["output_text"].split("\n")]
        assert parsed.entities == expected


def test_variety(rows: list[dict[str, str]]) -> None:
    emails = gen.generate(3000, 5)
    assert len({(e.category, e.template) for e in emails}) >= 40
    assert len({e.category for e in emails}) >= 10
    types = Counter(line.rsplit(": ", 1)[1] for r in rows for line in r["output_text"].split("\n"))
    assert set(types) == set(gen.TYPES) and min(types.values()) >= 200, types
    words = sorted(len(r["input_text"].split()) for r in rows)
    assert 20 <= words[0] and words[-1] <= 110 and 40 <= words[len(words) // 2] <= 70, words[::500]
    assert len({r["input_text"] for r in rows}) == len(rows)


# ------------------------------------------------------------------------------------------ read by the loop
def test_labelled_csv_through_the_loader_and_the_seeds_split(rows: list[dict[str, str]]) -> None:
    cfg = DataConfig(path=str(DATA_CSV))
    loaded = load_rows(cfg)
    assert [(r.input, r.output) for r in loaded] == [(r["input_text"], r["output_text"]) for r in rows]
    train, test = split_rows(loaded, cfg)
    assert (len(train), len(test)) == (4000, 1500)


def test_unlabelled_corpus_is_text_rows_disjoint_from_the_labelled_emails(rows) -> None:
    loaded = load_rows(DataConfig(path=str(UNLABELLED), text_column="text", train_size=None, test_size=None))
    assert len(loaded) == gen.UNLABELLED_ROWS and all(r.is_text for r in loaded)
    assert not {r.text for r in loaded} & {r["input_text"] for r in rows}
    assert UNLABELLED.stat().st_size < 15e6 and DATA_CSV.stat().st_size < 5e6


# ------------------------------------------------------------------------------------------ tokenizer
def test_demo_tokenizer_has_llama2_settings_and_equals_hf(rows: list[dict[str, str]]) -> None:
    from sentencepiece import sentencepiece_model_pb2
    from transformers import LlamaTokenizer

    proto = sentencepiece_model_pb2.ModelProto.FromString((DEMO_DIR / "tokenizer.model").read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert (spec.model_type, spec.vocab_size, spec.byte_fallback, spec.split_digits) == (
        sentencepiece_model_pb2.TrainerSpec.BPE, 4096, True, True)
    assert (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) == (0, 1, 2, -1)
    assert (norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces) == ("identity", True, False)
    assert not spec.input and not spec.model_prefix  # no machine-specific paths in the committed file
    symbols = [p.piece for p in proto.pieces if p.type == p.USER_DEFINED]
    assert symbols == tokscript.USER_SYMBOLS
    ours, hf = Tokenizer.from_pretrained(DEMO_DIR), LlamaTokenizer.from_pretrained(DEMO_DIR)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    prefix = [ours.sp.piece_to_id("▁")]  # the dummy-prefix piece
    cfg = load_config(ROOT / "configs" / "demo-toy.yaml", check_paths=False).data  # the toy's template
    for row in rows[:200]:
        prompt = format_prompt(cfg, row["input_text"])
        # a whole prompt + answer (it starts with the template, not a symbol): HF agrees token for token
        assert ours.encode(prompt + row["output_text"]) == hf.encode(prompt + row["output_text"])
        for text in (row["input_text"], row["output_text"]):
            assert ours.decode(ours.encode(text)) == text
            mine, theirs = ours.encode(text, eos=True), hf.encode(text) + [hf.eos_token_id]
            if text[0] in symbols:  # HF drops the dummy prefix before an added token (module docstring)
                assert mine[:1] + mine[2:] == theirs and mine[1:2] == prefix
            else:
                assert mine == theirs


def test_tokenizer_training_is_deterministic(tmp_path: Path) -> None:
    sentences = [line for e in gen.generate(400, 21) for line in e.text.split("\n") if line.strip()]
    a = tokscript.train_tokenizer(sentences, tmp_path / "a", vocab_size=400).read_bytes()
    b = tokscript.train_tokenizer(sentences, tmp_path / "b", vocab_size=400).read_bytes()
    assert a == b


def test_corpus_sentences_are_the_lines_of_the_texts(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "Ciao,\n\nriga due\n"}) + "\n\n" + json.dumps({"text": "tre"}) + "\n")
    assert tokscript.corpus_sentences(path) == ["Ciao,", "riga due", "tre"]
