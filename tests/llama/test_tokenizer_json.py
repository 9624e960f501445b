"""llama.Tokenizer on tokenizer.json files against transformers.AutoTokenizer.

Three tokenizers: the real SmolLM2-135M-Instruct one (byte-level BPE, adds no BOS), a byte-level BPE
built with Llama-3's conventions (adds <|begin_of_text|>), and Llama-2's SentencePiece-style
tokenizer.json. Ids and decoded text must equal transformers' on a corpus of the shipped Italian
emails plus accents, emoji, CJK, whitespace runs, code and the empty string; text that spells a
control token stays text (transformers parses it out unless told `split_special_tokens=True`).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import json_tokenizers
import pytest
from transformers import AutoTokenizer  # the oracle

from llama.tokenizer import Tokenizer, TokenizerError

ROOT = Path(__file__).resolve().parents[2]


def _emails(n: int = 120) -> list[str]:
    with (ROOT / "data" / "emails.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["input_text"] for r in rows[:n]] + [r["output_text"] for r in rows[:n // 4]]


CORPUS = _emails() + [
    "", " ", "x", "\n", "  due spazi iniziali", "tre   spazi\t\ttab\n\n\nrighe", "finale ",
    "È già ora: Über, naïve, façade, perché, città, più.",
    "Grazie mille! 😀👍 A presto 🇮🇹", "東京 上海 서울 Ελλάδα Москва",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "if (a && b) { printf(\"%d\\n\", x); }", "1234567890 3.14159 1e-5 0x1F",
]
SPECIAL_TEXT = ["<|im_start|>user\nciao<|im_end|>", "<s>[INST] ciao [/INST] </s>",
                "testo <|endoftext|> fine", "<|begin_of_text|><|eot_id|>"]


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> tuple[Tokenizer, object]:
    return Tokenizer.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def llama3_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, object, Path]:
    d = json_tokenizers.write_byte_level(tmp_path_factory.mktemp("llama3_like"))
    return Tokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(d), d


@pytest.fixture(scope="module")
def llama2_json(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[Tokenizer, object]:
    d = json_tokenizers.write_sentencepiece_style(tmp_path_factory.mktemp("llama2_json"), tokenizer_dir)
    assert not (d / "tokenizer.model").exists()
    return Tokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(d)


def _assert_same(ours: Tokenizer, hf, texts: list[str]) -> None:
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert ours.encode_batch(texts) == [ours.encode(t) for t in texts]


def test_smollm2_ids_and_text_equal_transformers(smol) -> None:
    ours, hf = smol
    assert ours.source.endswith("tokenizer.json") and ours.sp is None
    assert ours.vocab_size == len(hf) == 49152
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 2, 0)
    assert not ours.add_bos  # SmolLM2's post-processor adds nothing: no BOS in front
    _assert_same(ours, hf, CORPUS)
    assert ours.encode("") == [] and ours.decode([]) == ""


def test_llama3_like_adds_begin_of_text_as_transformers(llama3_like) -> None:
    ours, hf, d = llama3_like
    assert ours.add_bos and ours.bos_id == hf.convert_tokens_to_ids("<|begin_of_text|>")
    assert ours.encode("ciao")[0] == ours.bos_id and ours.encode("ciao", bos=False)[0] != ours.bos_id
    _assert_same(ours, hf, CORPUS)
    eos_ids = json.loads((d / "generation_config.json").read_text())["eos_token_id"]
    assert ours.stop_ids == sorted({ours.eos_id, *eos_ids})  # <|eot_id|> and <|end_of_text|>


def test_llama2_sentencepiece_style_json_equals_transformers(llama2_json) -> None:
    ours, hf = llama2_json
    assert ours.add_bos and ours.bos_id == 1 and ours.eos_id == 2
    _assert_same(ours, hf, CORPUS)


@pytest.mark.parametrize("text", SPECIAL_TEXT)
def test_special_token_strings_in_text_stay_text(smol, llama3_like, text: str) -> None:
    for ours in (smol[0], llama3_like[0]):
        ids = ours.encode(text, bos=False)
        assert not set(ids) & set(ours.special_tokens.values()), (text, ids)
        split = AutoTokenizer.from_pretrained(Path(ours.source).parent, split_special_tokens=True)
        assert ids == split(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == text
    # ...while a trusted template's control strings do become ids, as transformers parses them
    ours, hf = smol
    assert ours.encode_with_specials(SPECIAL_TEXT[0]) == hf(SPECIAL_TEXT[0])["input_ids"]
    assert ours.encode_with_specials(SPECIAL_TEXT[0])[0] == hf.convert_tokens_to_ids("<|im_start|>")


def test_decode_keeps_control_tokens_on_request(smol) -> None:
    ours, hf = smol
    ids = ours.encode_with_specials("<|im_start|>assistant\nMario: PER<|im_end|>")
    assert ours.decode(ids) == "assistant\nMario: PER"
    kept = "<|im_start|>assistant\nMario: PER<|im_end|>"
    assert ours.decode(ids, skip_special=False) == hf.decode(ids) == kept


def test_chat_template_is_read_from_either_file(smollm2_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "tok"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / f, d / f)
    in_config = Tokenizer.from_pretrained(d).chat_template
    assert in_config and "<|im_start|>" in in_config
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_pretrained(d).chat_template is None
    shutil.copy(smollm2_dir / "chat_template.jinja", d / "chat_template.jinja")
    assert Tokenizer.from_pretrained(d).chat_template == in_config


def test_tokenizer_model_wins_over_tokenizer_json(tokenizer_dir: Path, llama3_like, tmp_path: Path) -> None:
    d = shutil.copytree(tokenizer_dir, tmp_path / "both")
    shutil.copy(Path(llama3_like[0].source), d / "tokenizer.json")
    tok = Tokenizer.from_pretrained(d)
    assert tok.sp is not None and tok.source.endswith("tokenizer.model")


def _one_line(path: Path, *fragments: str) -> str:
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_pretrained(path)
    msg = str(info.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


def test_errors_unsupported_model_type_and_bad_json(llama3_like, tmp_path: Path) -> None:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models

    d = tmp_path / "wordpiece"
    d.mkdir()
    RustTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(d / "tokenizer.json"))
    _one_line(d, "model type 'WordPiece' is not supported", "BPE")
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": "oops"}')
    _one_line(d, "is not valid JSON")
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": "oops", "merges": []}}')
    _one_line(d, "is not a valid tokenizer.json")


def test_error_vocabulary_larger_than_the_model(llama3_like, tmp_path: Path) -> None:
    d = shutil.copytree(llama3_like[2], tmp_path / "mismatch")
    n = llama3_like[0].vocab_size
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": n - 100}))
    _one_line(d, f"has {n} tokens", f"vocab_size {n - 100}")
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": n + 64}))
    assert Tokenizer.from_pretrained(d).vocab_size == n  # a padded embedding is normal


def test_qwen2_and_phi_style_tokenizer_without_bos(tmp_path: Path) -> None:
    d = json_tokenizers.write_qwen2_like(tmp_path / "qwen2_like")
    ours, hf = Tokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(d)
    assert ours.bos_id is None and ours.bos_token is None and not ours.add_bos
    assert (ours.eos_id, ours.pad_id) == (hf.eos_token_id, hf.pad_token_id) == (2, 0)
    _assert_same(ours, hf, CORPUS)
