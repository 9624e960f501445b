"""llama.tokenizer against Hugging Face: ids, specials and decoding equal HF's Llama tokenizer.

Oracles (all built from the fixture's own tokenizer.model):
- `hf_fast`: transformers 5's `LlamaTokenizer.from_pretrained(dir)` (a `tokenizers` BPE converted by HF),
  with `legacy` false (the tokenizer_config.json setting) and true.
- `hf_published`: the `tokenizers` pipeline of Llama-2's published tokenizer.json (normaliser
  Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer) over HF's vocab/merges of the same model. It is
  the only HF pipeline that keeps the dummy prefix on text that already starts with a space.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import hf_fixtures
import pytest
from transformers import LlamaTokenizer

from llama.tokenizer import Tokenizer, TokenizerError

TEXTS = [
    "Gentile Niccolò Galli, le confermo l'ordine n. 4521 per Acme S.p.A. con consegna a Forlì il 12/03/2024.",
    "Buongiorno, perché la fattura FT-2024/0193 non è ancora stata pagata? Importo: € 1.234,56 (IVA)",
    "Scrivete a mario.rossi@example.it o a ufficio-acquisti@ferrari-logistica.com, tel. +39 02 1234 5678.",
    "Caro Andrea,\nla riunione è spostata a giovedì alle 14:30.\n\nCordiali saluti,\nGiulia",
    "Pagamento di 25000 euro entro il 31.12.2025; IBAN IT60 X054 2811 1010 0000 0123 456.",
    "Due  spazi,   tre spazi e\ttab, e uno spazio finale ",
    "Città di Castello è più vicina di Cantù? Sì, però… «forse».",
    "Grazie mille! 😀👍 A presto 🇮🇹",
    "È già ora: Über, naïve, façade, 東京, Ελλάδα.",
    "<s> e </s> sono testo qui, non token speciali",
    "",
    "x",
    "1234567890",
    "\nRiga nuova dopo un a capo",
    "\tTab iniziale",
] + [t for t in hf_fixtures.italian_corpus(120, seed=5) if not t.startswith(" ")]
# Text that starts with a space: the one place where transformers 5's fast tokenizer leaves Llama-2.
LEADING_WS = [" Ciao", "  due spazi iniziali", " ", "   ", " \n", " \tx", "  Spett.le Acme S.p.A."]


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module", params=[False, True], ids=["legacy=False", "legacy=True"])
def hf_fast(request: pytest.FixtureRequest, tokenizer_dir: Path) -> LlamaTokenizer:
    hf = LlamaTokenizer.from_pretrained(tokenizer_dir, legacy=request.param)
    assert hf.legacy is request.param
    return hf


@pytest.fixture(scope="module")
def hf_published(tokenizer_dir: Path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import normalizers

    rust = RustTokenizer.from_str(LlamaTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer.to_str())
    rust.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    rust.pre_tokenizer = None
    rust.encode_special_tokens = True  # "<s>" inside data is text, as in our encode
    return rust


def test_oracle_is_hf_llama_on_the_same_model(tok: Tokenizer, hf_fast: LlamaTokenizer) -> None:
    # Same vocabulary piece by piece (so both read the same tokenizer.model), same special ids.
    assert type(hf_fast).__module__.startswith("transformers.")
    assert len(hf_fast) == tok.vocab_size == 512
    assert hf_fast.convert_ids_to_tokens(list(range(len(hf_fast)))) == [
        tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (
        hf_fast.bos_token_id, hf_fast.eos_token_id, hf_fast.unk_token_id) == (1, 2, 0)
    assert hf_fast.pad_token_id is None and tok.pad_id == tok.unk_id  # our documented choice


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_hf_llama_tokenizer(tok: Tokenizer, hf_fast: LlamaTokenizer, text: str) -> None:
    # split_special_tokens: "<s>" in data is text for HF too (we never parse specials out of text).
    ids = hf_fast.encode(text, split_special_tokens=True)
    assert tok.encode(text) == ids
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.encode(text, bos=False) == hf_fast.encode(text, add_special_tokens=False,
                                                         split_special_tokens=True)


def test_eos_on_request_equals_hf_add_eos_token(tok: Tokenizer, tokenizer_dir: Path) -> None:
    hf = LlamaTokenizer.from_pretrained(tokenizer_dir, add_eos_token=True)
    for text in TEXTS[:10]:
        assert tok.encode(text, bos=True, eos=True) == hf.encode(text, split_special_tokens=True)
        assert tok.encode(text, eos=True)[-1] == tok.eos_id


@pytest.mark.parametrize("text", TEXTS + LEADING_WS)
def test_ids_equal_published_llama2_pipeline(tok: Tokenizer, hf_published, text: str) -> None:
    assert tok.encode(text, bos=False) == hf_published.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", LEADING_WS)
def test_leading_whitespace_keeps_the_dummy_prefix(tok: Tokenizer, hf_fast: LlamaTokenizer,
                                                   text: str) -> None:
    # transformers 5's Metaspace adds no "▁" when the text already starts with one (a space); SentencePiece,
    # Meta's code and the published pipeline always do. So HF-fast only agrees once given that space.
    # If this fails, transformers changed its Metaspace: update the docstring of llama/tokenizer.py.
    ours = tok.encode(text, bos=False)
    assert ours != hf_fast.encode(text, add_special_tokens=False)
    assert ours == hf_fast.encode(" " + text, add_special_tokens=False)
    assert tok.decode(ours) == text


def test_emoji_uses_byte_fallback(tok: Tokenizer, hf_fast: LlamaTokenizer) -> None:
    text = "Ok 😀"
    pieces = [tok.id_to_piece(i) for i in tok.encode(text, bos=False)]
    emoji = [f"<0x{b:02X}>" for b in "😀".encode()]  # <0xF0> <0x9F> <0x98> <0x80>
    assert any(pieces[i:i + 4] == emoji for i in range(len(pieces)))
    assert pieces == hf_fast.convert_ids_to_tokens(hf_fast.encode(text, add_special_tokens=False))
    assert tok.unk_id not in tok.encode("".join(TEXTS))


@pytest.mark.parametrize("text", TEXTS + LEADING_WS)
def test_decode_round_trips(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True) + [tok.pad_id] * 3) == text


@pytest.mark.parametrize("text", TEXTS)
def test_decode_equals_hf(tok: Tokenizer, hf_fast: LlamaTokenizer, text: str) -> None:
    ids = tok.encode(text, eos=True)
    assert tok.decode(ids) == hf_fast.decode(ids, skip_special_tokens=True)


def test_decode_keeps_specials_on_request(tok: Tokenizer) -> None:
    ids = tok.encode("Ciao Mario", bos=True, eos=True)
    assert tok.decode(ids, skip_special=False) == "<s>Ciao Mario</s>"
    assert tok.decode(ids[1:-1]) == "Ciao Mario"


def test_encode_batch_equals_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(TEXTS, bos=True, eos=True) == [tok.encode(t, eos=True) for t in TEXTS]
    assert tok.encode_batch([]) == []


def test_decode_accepts_tensors_and_rejects_bad_ids(tok: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    ids = tok.encode("Fattura n. 12")
    assert tok.decode(torch.tensor(ids)) == "Fattura n. 12"
    with pytest.raises(TokenizerError, match="-100 marks masked labels"):
        tok.decode(ids + [-100])
    with pytest.raises(TokenizerError, match=r"out of range \[0, 512\)"):
        tok.decode([512])
    with pytest.raises(TypeError):
        tok.encode(None)  # type: ignore[arg-type]


def test_from_model_file_path(tokenizer_dir: Path, tok: Tokenizer) -> None:
    direct = Tokenizer.from_pretrained(tokenizer_dir / "tokenizer.model")
    assert (direct.bos_id, direct.eos_id, direct.pad_id, direct.vocab_size) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)
    assert direct.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def _copy(tokenizer_dir: Path, tmp_path: Path, config: dict | None = None,
          special_map: dict | None = None) -> Path:
    out = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, out)
    if config is not None:
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        cfg.update(config)
        (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    if special_map is not None:
        (out / "special_tokens_map.json").write_text(json.dumps(special_map))
    return out


def test_special_tokens_from_config_files_equal_hf(tokenizer_dir: Path, tmp_path: Path) -> None:
    # eos renamed to the newline byte piece (as an AddedToken dict, the form of Llama-2's published
    # tokenizer_config.json), a pad added as a
    # new token beyond the SentencePiece vocabulary, as fine-tunes that add "[PAD]" do.
    d = _copy(tokenizer_dir, tmp_path,
              config={"eos_token": {"__type": "AddedToken", "content": "<0x0A>", "lstrip": False,
                                    "normalized": False, "rstrip": False, "single_word": False},
                      "pad_token": "[PAD]",
                      "added_tokens_decoder": {"512": {"content": "[PAD]", "special": True}}},
              special_map={"bos_token": "<s>", "eos_token": "<0x0A>", "unk_token": "<unk>",
                           "pad_token": "[PAD]"})
    ours, hf = Tokenizer.from_pretrained(d), LlamaTokenizer.from_pretrained(d)
    assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.pad_id) == (
        hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 13, 0, 512)
    assert ours.vocab_size == len(hf) == 513 and ours.id_to_piece(512) == "[PAD]"
    ids = ours.encode("Ciao", eos=True) + [ours.pad_id]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "Ciao"


def test_special_tokens_map_overrides_tokenizer_config(tokenizer_dir: Path, tmp_path: Path) -> None:
    d = _copy(tokenizer_dir, tmp_path, config={"eos_token": "</s>"},
              special_map={"bos_token": "<s>", "eos_token": "<0x0A>", "unk_token": "<unk>"})
    assert Tokenizer.from_pretrained(d).eos_id == LlamaTokenizer.from_pretrained(d).eos_token_id == 13


def _one_line_error(path: Path, match: str) -> str:
    with pytest.raises(TokenizerError, match=match) as info:
        Tokenizer.from_pretrained(path)
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, ValueError)
    return msg


def test_errors_missing_dir_and_model(tmp_path: Path) -> None:
    assert str(tmp_path / "nope") in _one_line_error(tmp_path / "nope", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "copy the tokenizer files" in _one_line_error(empty, "no tokenizer.model or tokenizer.json in")
    (empty / "tokenizer.json").write_text("{}")
    _one_line_error(empty, "tokenizer model type None is not supported")


@pytest.mark.parametrize("content, why", [
    (b"", "it is empty"),
    (b"this is not a model", "does not parse"),
    (b'{"version": "1.0", "model": {}}', "looks like JSON"),
    ("truncated", "does not parse"),
])
def test_errors_not_a_sentencepiece_model(tokenizer_dir: Path, tmp_path: Path, content, why: str) -> None:
    d = _copy(tokenizer_dir, tmp_path)
    data = (d / "tokenizer.model").read_bytes()
    (d / "tokenizer.model").write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    assert "is not a SentencePiece model" in _one_line_error(d, why)


def test_errors_bad_config_files(tokenizer_dir: Path, tmp_path: Path) -> None:
    d = _copy(tokenizer_dir, tmp_path)
    (d / "tokenizer_config.json").write_text("{not json")
    _one_line_error(d, "tokenizer_config.json is not valid JSON")
    d2 = _copy(tokenizer_dir, tmp_path / "b", special_map={"eos_token": "<|eot_id|>"})
    _one_line_error(d2, re.escape("eos_token '<|eot_id|>'") + ".* is not in the vocabulary")
