"""finetune.data.rows: reading, templates, tokenisation and labels, truncation, collation, data errors.

Token ids are checked against transformers' LlamaTokenizer over the same SentencePiece model (the
reference the seeds used), so "the prompt ids are what a standard Llama tokenizer gives" is proven,
not assumed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import hf_fixtures
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.config import DataConfig
from finetune.data.examples import IGNORE_INDEX, collate, encode_example, prepare
from finetune.data.rows import Row, load_rows, read_rows, split_rows, tags_to_entities
from finetune.data.templates import ALPACA_TEMPLATE, format_prompt
from finetune.errors import UserError

# MultiNERD's label list (the dataset card's order): ner_tags index into it.
MULTINERD_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-ANIM", "I-ANIM", "B-BIO",
                    "I-BIO", "B-CEL", "I-CEL", "B-DIS", "I-DIS", "B-EVE", "I-EVE", "B-FOOD", "I-FOOD",
                    "B-INST", "I-INST", "B-MEDIA", "I-MEDIA", "B-MYTH", "I-MYTH", "B-PLANT", "I-PLANT",
                    "B-TIME", "I-TIME", "B-VEHI", "I-VEHI"]

SHORT = "Testo: {input}\nEntità:\n{output}"  # a custom template short enough for the tiny vocabulary


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from llama import Tokenizer

    return Tokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(str(tokenizer_dir))


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def email_rows(n: int) -> list[dict]:
    texts = hf_fixtures.italian_corpus(n, seed=1)
    return [{"input_text": t, "output_text": "Mario Rossi: PER\nMilano: LOC" if i % 3 else ""}
            for i, t in enumerate(texts)]


def cfg_for(path: Path, **kw) -> DataConfig:
    defaults = dict(path=str(path), template=SHORT, max_length=256, train_size=None, test_size=0)
    return DataConfig(**{**defaults, **kw})


def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------
# labels: prompt masked, EOS trained, BOS once


@pytest.mark.parametrize("template", ["alpaca", "llama2-chat", SHORT])
def test_labels_mask_the_prompt_train_eos_and_match_the_reference_tokenizer(tmp_path, tok, hf_tok, template):
    row = Row("Gentile Mario Rossi, la riunione è a Milano.", "Mario Rossi: PER\nMilano: LOC")
    cfg = cfg_for(tmp_path / "x.csv", template=template, max_length=400)
    ex = encode_example(tok, cfg, row)
    ids, labels, n = ex.input_ids, ex.labels, ex.prompt_len
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids[-1] == tok.eos_id and labels[-1] == tok.eos_id           # EOS is a target
    assert labels[:n] == [IGNORE_INDEX] * n                              # prompt carries no loss
    assert labels[n:] == ids[n:]                                         # response + EOS do
    # the reference: HF's Llama tokenizer on the prompt text (it adds BOS) and on the response alone
    prompt = format_prompt(cfg, row.input)
    assert ids[:n] == hf_tok(prompt)["input_ids"]
    assert ids[n:-1] == hf_tok(row.output, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[n:-1]) == row.output   # what the evaluator decodes from generated ids
    assert "<s>" not in prompt and "</s>" not in prompt


def test_loss_gradient_reaches_exactly_the_response_and_eos(tmp_path, tok):
    """With the loop's HF-style shift, only positions predicting response tokens or EOS get gradient."""
    cfg = cfg_for(tmp_path / "x.csv")
    ex = encode_example(tok, cfg, Row("Ciao Luca Ferrari", "Luca Ferrari: PER"))
    labels = torch.tensor(ex.labels)
    logits = torch.randn(len(labels), 512, requires_grad=True)
    F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum").backward()
    has_grad = logits.grad.abs().sum(-1) > 0
    expected = torch.zeros(len(labels), dtype=torch.bool)
    expected[ex.prompt_len - 1:-1] = True   # last prompt position predicts the 1st response token ...
    assert torch.equal(has_grad, expected)  # ... and the one before EOS predicts EOS


def test_train_on_prompt_reproduces_the_seeds(tmp_path, tok):
    cfg = cfg_for(tmp_path / "x.csv", train_on_prompt=True, template="alpaca", max_length=400)
    ex = encode_example(tok, cfg, Row("Ciao Luca", "Luca: PER"))
    assert ex.labels == [IGNORE_INDEX] + ex.input_ids[1:]  # everything but BOS (nothing predicts it)


def test_prompt_text_of_each_template():
    cfg = DataConfig(path="x")
    expected = ALPACA_TEMPLATE.split("{output}")[0].format(instruction=cfg.instruction, input="abc")
    assert format_prompt(cfg, "abc") == expected
    assert expected.endswith("### Input:\nabc\n### Response:\n")
    assert expected.startswith("Below is an instruction that describes a task, paired with an input")
    chat = DataConfig(path="x", template="llama2-chat")
    assert format_prompt(chat, "abc") == "[INST] Extract entity from the given input: abc [/INST]"
    custom = DataConfig(path="x", template="{{raw}} {input} ->")   # no {output}: the prompt is all of it
    assert format_prompt(custom, "a {b} c") == "{raw} a {b} c ->"  # braces in the data are safe
    assert "must contain {input}" in user_error(format_prompt, DataConfig(path="x", template="Q: {output}"),
                                                "abc")


def test_llama2_chat_response_starts_with_a_word_token(tmp_path, tok, hf_tok):
    """The space of '[/INST] {output}' is carried by the response's dummy prefix, not left in the prompt."""
    cfg = cfg_for(tmp_path / "x.csv", template="llama2-chat", max_length=400)
    ex = encode_example(tok, cfg, Row("Ciao", "Milano: LOC"))
    first = hf_tok.convert_ids_to_tokens(ex.input_ids[ex.prompt_len])
    last_prompt = hf_tok.convert_ids_to_tokens(ex.input_ids[ex.prompt_len - 1])
    assert first.startswith("▁") and last_prompt != "▁"


# ---------------------------------------------------------------------------------------------------
# collation


def test_collate_right_pads_and_masks_by_position(tmp_path, tok):
    cfg = cfg_for(tmp_path / "x.csv")
    rows = [Row("Ciao", "x: PER"), Row("Buongiorno, la fattura di Acme", "")]
    examples = [encode_example(tok, cfg, r) for r in rows]
    lengths = [len(e.input_ids) for e in examples]
    pad = tok.eos_id  # Llama-2 has no pad token; pad == EOS must not hide EOS from the loss
    batch = collate(examples, pad)
    assert batch["input_ids"].shape == (2, max(lengths)) and batch["input_ids"].dtype == torch.long
    for i, e in enumerate(examples):
        n = lengths[i]
        assert batch["input_ids"][i, :n].tolist() == e.input_ids
        assert (batch["input_ids"][i, n:] == pad).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["labels"][i, :n].tolist() == e.labels
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["labels"][i, n - 1] == tok.eos_id
    empty = examples[1]  # an empty output: the response is EOS alone, and it is a target
    assert empty.labels[-1] == tok.eos_id and empty.input_ids[empty.prompt_len:] == [tok.eos_id]


# ---------------------------------------------------------------------------------------------------
# truncation


def test_long_input_is_cut_from_its_end_keeping_template_tail_and_whole_response(tmp_path, tok):
    long_input = " ".join(hf_fixtures.italian_corpus(12, seed=3))
    row = Row(long_input, "Mario Rossi: PER\nAcme S.p.A.: ORG")
    cfg = cfg_for(tmp_path / "x.csv", max_length=64)
    ex = encode_example(tok, cfg, row)
    assert ex.truncated and len(ex.input_ids) <= 64
    response = tok.encode(row.output, bos=False) + [tok.eos_id]
    assert ex.input_ids[ex.prompt_len:] == response                  # the whole response survives
    prompt = tok.decode(ex.input_ids[1:ex.prompt_len])
    assert prompt.startswith("Testo: ") and prompt.endswith("\nEntità:\n")  # template tail kept
    kept = prompt.removeprefix("Testo: ").removesuffix("\nEntità:\n")
    assert kept and long_input.startswith(kept)                      # a prefix of the input
    assert ex.input_ids[:ex.prompt_len] == tok.encode(format_prompt(cfg, kept), bos=True)
    assert len(ex.input_ids) >= 64 - 3                               # cut no more than needed


def test_a_cut_inside_a_multibyte_character_leaves_no_replacement_char(tmp_path, tok):
    """Emoji are byte-fallback tokens (4 per character): most cuts land mid-character."""
    cfg = cfg_for(tmp_path / "x.csv", max_length=40)
    for extra in range(8):
        row = Row("ok " * extra + "🙂🚀🎉" * 10, "x: PER")
        ex = encode_example(tok, cfg, row)
        assert ex.truncated and len(ex.input_ids) <= 40
        prompt = tok.decode(ex.input_ids[1:ex.prompt_len])
        assert "\ufffd" not in prompt and row.input.startswith(prompt[len("Testo: "):-len("\nEntità:\n")])


@settings(max_examples=40, deadline=None)
@given(n_input=st.integers(0, 40), n_output=st.integers(0, 25), max_length=st.integers(16, 90))
def test_truncation_never_drops_the_response(tok, n_input, n_output, max_length):
    words = hf_fixtures.italian_corpus(8, seed=5)[0].split() * 10
    row = Row(" ".join(words[:n_input]) or "x", " ".join(words[:n_output]))
    cfg = DataConfig(path="x", template=SHORT, max_length=max_length)
    ex = encode_example(tok, cfg, row)
    response = (tok.encode(row.output, bos=False) if row.output else []) + [tok.eos_id]
    minimal_prompt = len(tok.encode(format_prompt(cfg, ""), bos=True))
    if ex is None:  # only when even an (almost) empty input cannot fit next to the response
        assert minimal_prompt + len(response) > max_length - 2
    else:
        assert len(ex.input_ids) <= max_length
        assert ex.input_ids[ex.prompt_len:] == response and ex.input_ids.count(tok.bos_id) == 1
        full = len(tok.encode(format_prompt(cfg, row.input), bos=True)) + len(response)
        assert ex.truncated == (full > max_length)


def test_rows_that_cannot_fit_are_skipped_counted_and_warned(tmp_path, tok):
    long_input = " ".join(hf_fixtures.italian_corpus(10))
    path = write_csv(tmp_path / "d.csv", ["input_text", "output_text"], [
        ["Ciao Mario", "Mario: PER"],
        [long_input, "Milano: LOC"],                                        # input gets cut
        ["Ciao", "\n".join(f"Persona {i}: PER" for i in range(40))],        # response alone too long
    ])
    line = 3 + long_input.count("\n") + 1  # the line where the third record starts (quoted newlines)
    expected = rf"skipped 1 rows whose response does not fit .*\(e\.g\. line {line}\)"
    with pytest.warns(UserWarning, match=expected):
        ds = prepare(cfg_for(path, max_length=48), tok)
    assert ds.stats.too_long_skipped == 1 and ds.stats.truncated == 1 and ds.stats.train_examples == 2
    assert ds.stats.max_tokens <= 48 and "1 too long skipped" in ds.stats.summary()


def test_max_length_too_small_for_the_template(tmp_path, tok):
    path = write_csv(tmp_path / "d.csv", ["input_text", "output_text"], [["Ciao", "x"]])
    msg = user_error(prepare, cfg_for(path, template="alpaca", max_length=32), tok)
    assert "data.max_length=32 is too small for the template" in msg


# ---------------------------------------------------------------------------------------------------
# formats


def test_csv_jsonl_json_give_the_same_rows(tmp_path):
    records = email_rows(20)
    records.append({"input_text": 'virgole, "virgolette"\ne a capo', "output_text": "x: PER"})
    write_csv(tmp_path / "d.csv", ["input_text", "output_text"],
              [[r["input_text"], r["output_text"]] for r in records])
    write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "d.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    strip = [(r.input, r.output) for r in load_rows(cfg_for(tmp_path / "d.csv"))]
    assert strip == [(r["input_text"], r["output_text"]) for r in records]
    for name in ("d.jsonl", "d.json"):
        assert [(r.input, r.output) for r in load_rows(cfg_for(tmp_path / name))] == strip
    # a UTF-8 byte-order mark (spreadsheet export) and CRLF line ends are fine
    raw = (tmp_path / "d.csv").read_text(encoding="utf-8").replace("\r\n", "\n").replace("\n", "\r\n")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + raw.encode())
    assert [(r.input, r.output) for r in load_rows(cfg_for(tmp_path / "bom.csv"))] == strip
    # forced format for an unusual extension
    (tmp_path / "d.txt").write_text((tmp_path / "d.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    assert len(load_rows(cfg_for(tmp_path / "d.txt", format="jsonl"))) == 21


def test_configurable_columns_and_sources(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"mail": "Ciao Mario", "ents": "Mario: PER", "id": 1}])
    rows = load_rows(cfg_for(path, input_column="mail", output_column="ents"))
    assert rows == [Row("Ciao Mario", "Mario: PER", source="line 1")]


def test_empty_rows_skipped_and_counted_empty_outputs_kept(tmp_path, tok):
    path = write_csv(tmp_path / "d.csv", ["input_text", "output_text"],
                     [["Ciao Mario", "Mario: PER"], ["", "x: PER"], ["   ", ""], ["Nessuno qui", ""]])
    rows, stats = read_rows(cfg_for(path))
    assert (stats.rows, stats.empty_skipped, stats.empty_outputs, len(rows)) == (4, 2, 1, 2)
    with pytest.warns(UserWarning, match="skipped 2 empty rows"):
        ds = prepare(cfg_for(path), tok)
    no_entities = [e for e in ds.train if e.row.output == ""][0]
    assert no_entities.input_ids[no_entities.prompt_len:] == [tok.eos_id]  # learns to stop at once


def test_preformatted_text_column_guanaco_style(tmp_path, tok, hf_tok):
    records = [{"text": "<s>[INST] Chi è Mario? [/INST] Un cliente di Milano. </s>"},
               {"text": "<s>[INST] Dove? [/INST] \\n Roma </s>"},  # nerdLLama's '[/INST] \n {output}'
               {"text": "Solo testo, senza marcatore."}]
    path = write_jsonl(tmp_path / "g.jsonl", records)
    with pytest.warns(UserWarning, match="1 text rows have no response marker"):
        ds = prepare(cfg_for(path, text_column="text", shuffle_seed=0), tok)
    by_text = {tok.decode(e.input_ids[1:e.prompt_len]): e for e in ds.train}
    ex = by_text["[INST] Chi è Mario? [/INST]"]
    assert ex.input_ids[:ex.prompt_len] == hf_tok("[INST] Chi è Mario? [/INST]")["input_ids"]
    assert ex.input_ids.count(tok.bos_id) == 1 and ex.input_ids[-1] == tok.eos_id
    assert tok.decode(ex.input_ids[ex.prompt_len:-1]) == "Un cliente di Milano."
    assert ex.labels[:ex.prompt_len] == [IGNORE_INDEX] * ex.prompt_len
    whole = by_text[""]  # no marker: the whole text carries loss (and is counted)
    assert whole.prompt_len == 1 and whole.labels == [IGNORE_INDEX] + whole.input_ids[1:]
    assert ds.stats.unmasked_text_rows == 1
    # an explicit marker that a row lacks: that row is skipped and counted
    with pytest.warns(UserWarning, match="without data.response_marker"):
        ds = prepare(cfg_for(path, text_column="text", response_marker="[/INST]"), tok)
    assert ds.stats.marker_missing_skipped == 1 and ds.stats.train_examples == 2


# ---------------------------------------------------------------------------------------------------
# token/tag rows (MultiNERD)


def test_tags_to_entities():
    # the seeds' example: {"tokens": ["Each", "included", "ginseng", "."], "ner_tags": [0, 0, 25, 0]}
    assert tags_to_entities(["Each", "included", "ginseng", "."], [0, 0, 25, 0], MULTINERD_LABELS) \
        == "ginseng: PLANT"
    tokens = ["Mario", "Rossi", "e", "Luca", "Bianchi", "di", "Banca", "Intesa", "a", "Milano"]
    tags = ["B-PER", "I-PER", "O", "B-PER", "I-PER", "O", "B-ORG", "I-ORG", "O", "B-LOC"]
    assert tags_to_entities(tokens, tags) == \
        "Mario Rossi: PER\nLuca Bianchi: PER\nBanca Intesa: ORG\nMilano: LOC"
    ints = [MULTINERD_LABELS.index(t) for t in tags]
    assert tags_to_entities(tokens, ints, MULTINERD_LABELS) == tags_to_entities(tokens, tags)
    # adjacent B- of the same type are two spans; a type change inside I- splits; I- after O opens
    assert tags_to_entities(["A", "B", "C", "D"], ["B-PER", "B-PER", "I-ORG", "I-ORG"]) \
        == "A: PER\nB: PER\nC D: ORG"
    assert tags_to_entities(["x", "Roma"], ["O", "I-LOC"]) == "Roma: LOC"
    # BIOES and bare types
    assert tags_to_entities(["a", "b", "c", "d"], ["S-LOC", "B-PER", "E-PER", "PER"]) \
        == "a: LOC\nb c: PER\nd: PER"
    assert tags_to_entities(["a"], ["O"]) == ""
    with pytest.raises(ValueError, match="tag 31 is outside data.tag_labels"):
        tags_to_entities(["a"], [31], MULTINERD_LABELS)


def test_multinerd_rows_end_to_end(tmp_path, tok):
    records = [
        {"tokens": ["Each", "included", "ginseng", "."], "ner_tags": [0, 0, 25, 0], "lang": "en"},
        {"tokens": ["Mario", "Rossi", "lives", "in", "Rome", "."], "ner_tags": [1, 2, 0, 0, 5, 0]},
        {"tokens": ["Nothing", "here", "."], "ner_tags": [0, 0, 0], "lang": "en"},
        {"tokens": [], "ner_tags": [], "lang": "en"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", records)
    rows, stats = read_rows(cfg_for(path, tag_labels=MULTINERD_LABELS))
    assert [(r.input, r.output) for r in rows] == [
        ("Each included ginseng .", "ginseng: PLANT"),
        ("Mario Rossi lives in Rome .", "Mario Rossi: PER\nRome: LOC"),
        ("Nothing here .", "")]
    assert stats.empty_skipped == 1 and stats.empty_outputs == 1
    # string tags need no label list; CSV cells may hold JSON lists
    csv_path = write_csv(tmp_path / "m.csv", ["tokens", "ner_tags"], [['["Roma", "!"]', '["B-LOC", "O"]']])
    assert load_rows(cfg_for(csv_path))[0].output == "Roma: LOC"
    msg = user_error(load_rows, cfg_for(path))
    assert f"{path}: line 1: tags are integers but data.tag_labels is not set" in msg
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["a", "b"], "ner_tags": [0]}])
    assert "line 1: 2 tokens but 1 tags" in user_error(load_rows, cfg_for(bad, tag_labels=["O"]))


# ---------------------------------------------------------------------------------------------------
# split


def test_split_is_seeded_disjoint_and_sized(tmp_path):
    rows = [Row(str(i), "") for i in range(50)]
    cfg = DataConfig(path="d.csv", train_size=30, test_size=15, shuffle_seed=42)
    train, test = split_rows(rows, cfg)
    assert (len(train), len(test)) == (30, 15)
    assert not {r.input for r in train} & {r.input for r in test}
    assert split_rows(rows, cfg) == (train, test)
    other_seed = DataConfig(path="d.csv", train_size=30, test_size=15, shuffle_seed=1)
    assert split_rows(rows, other_seed) != (train, test)
    # a different train_size leaves the test set alone (test = the tail of the shuffle)
    assert split_rows(rows, DataConfig(path="d.csv", train_size=10, test_size=15))[1] == test
    train, test = split_rows(rows, DataConfig(path="d.csv", train_size=None, test_size=15))
    assert (len(train), len(test)) == (35, 15)
    train, test = split_rows(rows, DataConfig(path="d.csv", train_size=None, test_size=None))
    assert (len(train), len(test)) == (50, 0)


def test_split_errors():
    rows = [Row(str(i), "") for i in range(10)]
    msg = user_error(split_rows, rows, DataConfig(path="d.csv", test_size=11))
    assert "data.test_size=11 is larger than the data: d.csv has 10 usable rows" in msg
    msg = user_error(split_rows, rows, DataConfig(path="d.csv", train_size=8, test_size=5))
    assert "data.train_size + data.test_size = 8 + 5 is larger than the data" in msg
    assert "no rows left for training" in user_error(split_rows, rows,
                                                     DataConfig(path="d.csv", train_size=None, test_size=10))


def test_prepare_end_to_end_with_the_seeds_split(tmp_path, tok):
    records = email_rows(60)
    path = write_csv(tmp_path / "d.csv", ["input_text", "output_text"],
                     [[r["input_text"], r["output_text"]] for r in records])
    ds = prepare(DataConfig(path=str(path), max_length=400, train_size=40, test_size=15), tok)
    assert (len(ds.train), len(ds.test)) == (40, 15)
    assert ds.stats.train_tokens == sum(len(e.input_ids) for e in ds.train)
    assert ds.stats.train_target_tokens == sum(sum(x != IGNORE_INDEX for x in e.labels) for e in ds.train)
    for e in ds.test:  # the evaluator's prompt is exactly the encoded prompt text
        assert e.input_ids[:e.prompt_len] == tok.encode(format_prompt(ds_cfg(path), e.row.input), bos=True)


def ds_cfg(path: Path) -> DataConfig:
    return DataConfig(path=str(path))


# ---------------------------------------------------------------------------------------------------
# data errors


def test_data_errors(tmp_path):
    def err(name: str, content: bytes | str, **kw) -> str:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return user_error(load_rows, cfg_for(path, **kw))

    assert "data file" in err("e.csv", "") and "is empty" in err("e2.csv", "\n\n")
    assert "has no data rows" in err("h.csv", "input_text,output_text\n")
    msg = err("cols.csv", "text,label\nciao,x\n")
    assert "no columns 'input_text'/'output_text' (columns found: text, label)" in msg
    assert "no column 'output_text'; columns found: input_text, label" in err("half.csv",
                                                                             "input_text,label\nciao,x\n")
    msg = err("bad.csv", "input_text,output_text\nciao,x\nciao,\xe8\n".encode("latin-1"))
    assert msg.startswith(f"{tmp_path}/bad.csv: line 3: bytes b'\\xe8'") and "not valid UTF-8" in msg
    assert "line 3: 3 fields but the header has 2" in err("f.csv", "input_text,output_text\na,b\na,b,c\n")
    assert "line 2: invalid JSON" in err("j.jsonl", '{"input_text": "a", "output_text": "b"}\n{oops\n')
    assert "line 1: expected a JSON object per line, got list" in err("l.jsonl", "[1, 2]\n")
    assert "expected a JSON list of objects, got dict" in err("d.json", '{"input_text": "a"}')
    assert "item 1: expected a JSON object, got int" in err("i.json",
                                                            '[{"input_text": "a", "output_text": ""}, 3]')
    assert "line 2: no column 'output_text'; columns found: input_text" in err(
        "m.jsonl", '{"input_text": "a", "output_text": "b"}\n{"input_text": "c"}\n')
    assert "column 'input_text' must hold text, got dict" in err(
        "t.jsonl", '{"input_text": {"a": 1}, "output_text": "b"}\n')
    assert "cannot tell the format of" in err("d.parquet", "x")
    assert "no column 'body' (data.text_column); columns found: text" in err("g.jsonl", '{"text": "a"}\n',
                                                                             text_column="body")
    assert "data file not found" in user_error(load_rows, cfg_for(tmp_path / "missing.csv"))
    assert "all 1 rows are empty" in err("blank.csv", "input_text,output_text\n,\n")
