"""Tokenizer: Llama-2's SentencePiece `tokenizer.model` with Llama conventions.

Ids are exactly what Meta's reference code produces (`sp.encode(text)`, BOS in front when asked,
EOS at the end when asked), i.e. the tokenization Llama-2 was trained with:
- the text is encoded as plain text. Strings such as "<s>" or "</s>" inside it are *not* turned into
  BOS/EOS ids, so data can never inject control tokens; BOS/EOS only come from `bos=` / `eos=`.
- SentencePiece's dummy prefix ("▁" in front of the text) is always added, also when the text
  already starts with a space (" Ciao" -> "▁▁Ciao" before BPE), so decode(encode(t)) == t.

Agreement with Hugging Face (tests/llama/test_tokenizer.py proves it on the fixture's model):
- transformers 5's `LlamaTokenizer.from_pretrained(dir)` (a `tokenizers` BPE that HF converts from
  the same tokenizer.model) gives the same ids on every text that does not start with a space, with
  `legacy` false (what Llama-2's tokenizer_config.json says) or true. `legacy` only changes the prefix
  space of text that follows a special-token *string*, and we never parse those out of text, so both
  settings are equivalent here.
- On text that starts with a space transformers 5 differs: its Metaspace pre-tokenizer adds no dummy
  prefix when the text already begins with "▁" (see transformers PR #47862), so "  x" gets one "▁"
  fewer than with SentencePiece and Meta's code. The pipeline of Llama-2's published tokenizer.json
  (normaliser Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer; transformers 4 loads it as is)
  keeps the prefix and equals our ids on every input. We follow Llama-2's published behaviour.

Pad id. Llama-2 defines no pad token. If the tokenizer files name one, we use it; otherwise
`pad_id = unk_id` (0). Why not EOS: padding is always masked by position (attention_mask / labels
-100), never recognised by id, and keeping pad != EOS means no code path can mistake a pad for the
end of a sequence or quietly mask the EOS the model must learn. Unk is a safe filler because with
byte fallback no text ever encodes to unk, so `decode` dropping pads loses nothing.

Special token names come from the SentencePiece model (unk/bos/eos), then `tokenizer_config.json`,
then `special_tokens_map.json` (the later file wins, as in transformers); each name must be a piece of
the model or an entry of `added_tokens_decoder`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

MODEL_FILE = "tokenizer.model"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # later files override earlier
SPECIAL_KEYS = ("unk_token", "bos_token", "eos_token", "pad_token")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message says what, where and how to fix it."""


class Tokenizer:
    """A SentencePiece Llama tokenizer: `encode`, `encode_batch`, `decode` and the special ids."""

    def __init__(self, sp: spm.SentencePieceProcessor, bos_id: int, eos_id: int, unk_id: int,
                 pad_id: int, added: dict[int, str] | None = None, source: str = "<memory>") -> None:
        self.sp = sp
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.source = source
        # Tokens beyond the SentencePiece vocabulary (e.g. a "[PAD]" added by a fine-tune).
        self.added = dict(added or {})
        self.vocab_size = max([sp.get_piece_size() - 1, *self.added]) + 1
        self._specials = frozenset({bos_id, eos_id, pad_id})

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.model` (+ tokenizer_config.json / special_tokens_map.json) from an HF dir.

        `path` may also be the `tokenizer.model` file itself (then only its own specials are used).
        """
        path = Path(path)
        if not path.exists():
            raise TokenizerError(f"tokenizer path {path} does not exist: pass the model directory "
                                 f"that holds {MODEL_FILE}")
        model_file = path / MODEL_FILE if path.is_dir() else path
        folder = path if path.is_dir() else None
        if not model_file.is_file():
            hint = (" (it has tokenizer.json only, a HF `tokenizers` file as in Llama-3: only SentencePiece "
                    "Llama tokenizers are supported)" if (path / "tokenizer.json").is_file()
                    else f": copy {MODEL_FILE} from the original checkpoint into it")
            raise TokenizerError(f"no {MODEL_FILE} in {path}{hint}")
        sp = _load_sentencepiece(model_file)
        names: dict[str, str | None] = {"unk_token": _piece_or_none(sp, sp.unk_id()),
                                        "bos_token": _piece_or_none(sp, sp.bos_id()),
                                        "eos_token": _piece_or_none(sp, sp.eos_id()),
                                        "pad_token": _piece_or_none(sp, sp.pad_id())}
        added: dict[int, str] = {}
        if folder is not None:
            for fname in CONFIG_FILES:
                cfg = _read_json(folder / fname)
                added.update(_added_tokens(cfg, folder / fname))
                for key in SPECIAL_KEYS:
                    if key in cfg:
                        names[key] = _token_name(cfg[key], folder / fname, key)
        by_name = {name: i for i, name in added.items()}
        ids: dict[str, int | None] = {}
        for key in SPECIAL_KEYS:
            name = names[key]
            ids[key] = None if name is None else _resolve(sp, by_name, name, key, folder or model_file)
        for key in ("unk_token", "bos_token", "eos_token"):
            if ids[key] is None:
                raise TokenizerError(f"{model_file} defines no {key} and no tokenizer_config.json names one: "
                                     f"add \"{key}\" to tokenizer_config.json next to it")
        pad = ids["pad_token"] if ids["pad_token"] is not None else ids["unk_token"]  # see module docstring
        return cls(sp, bos_id=ids["bos_token"], eos_id=ids["eos_token"], unk_id=ids["unk_token"],
                   pad_id=pad, added=added, source=str(model_file))

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text` (special-token strings in it stay text); BOS once in front if `bos`."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return self._wrap(self.sp.encode(text), bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        """`encode` for many texts in one SentencePiece call (its C++ loop, not Python's)."""
        texts = list(texts)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"Tokenizer.encode_batch expects str items, got {type(bad).__name__}")
        return [self._wrap(ids, bos, eos) for ids in self.sp.encode(texts, num_threads=1)]

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`. BOS/EOS/pad are dropped (`skip_special`) or written as their pieces."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        n_sp = self.sp.get_piece_size()
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                hint = " (-100 marks masked labels: drop those before decoding)" if i == -100 else ""
                raise TokenizerError(f"token id {i!r} is out of range [0, {self.vocab_size}) for "
                                     f"{self.source}{hint}")
        out: list[str] = []
        run: list[int] = []  # consecutive ordinary SentencePiece ids, decoded together
        for i in ids:
            if i in self._specials or i >= n_sp:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special or (i >= n_sp and i not in self._specials):
                    out.append(self.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id `i` (e.g. "▁Ciao", "<0x0A>", "<s>")."""
        if i in self.added:
            return self.added[i]
        if not 0 <= i < self.sp.get_piece_size():
            raise TokenizerError(f"token id {i} is out of range [0, {self.vocab_size}) for {self.source}")
        return self.sp.id_to_piece(i)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, unk_id={self.unk_id})")


# ---------------------------------------------------------------------- helpers
def _load_sentencepiece(model_file: Path) -> spm.SentencePieceProcessor:
    data = model_file.read_bytes()
    why = "it is empty" if not data else None
    if data[:1] in (b"{", b"["):
        why = "it looks like JSON (a tokenizer.json saved under the wrong name?)"
    sp = spm.SentencePieceProcessor()
    if why is None:
        try:
            sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError):
            why = "it does not parse as a SentencePiece model proto (truncated or another format)"
    if why is None and sp.get_piece_size() == 0:
        why = "it holds no vocabulary"
    if why is not None:
        raise TokenizerError(f"{model_file} is not a SentencePiece model: {why}; copy the original "
                             f"{MODEL_FILE} of the checkpoint")
    return sp


def _piece_or_none(sp: spm.SentencePieceProcessor, i: int) -> str | None:
    return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{file} is not valid JSON ({e}): fix or delete it") from None
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{file} should hold a JSON object, got {type(cfg).__name__}: fix or delete it")
    return cfg


def _token_name(value: Any, file: Path, key: str) -> str | None:
    """A special token as HF writes it: a string, an AddedToken dict {"content": ...}, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerError(f"{file}: {key} should be a string or {{\"content\": ...}}, got {value!r}")


def _added_tokens(cfg: dict[str, Any], file: Path) -> dict[int, str]:
    """`added_tokens_decoder` of tokenizer_config.json: {"32000": {"content": "[PAD]", ...}, ...}."""
    out: dict[int, str] = {}
    for key, value in (cfg.get("added_tokens_decoder") or {}).items():
        name = _token_name(value, file, f"added_tokens_decoder[{key}]")
        if not str(key).isdigit() or name is None:
            raise TokenizerError(f"{file}: added_tokens_decoder entry {key!r}: {value!r} is not id -> token")
        out[int(key)] = name
    return out


def _resolve(sp: spm.SentencePieceProcessor, added: dict[str, int], name: str, key: str,
             where: Path) -> int:
    i = sp.piece_to_id(name)  # returns unk's id for unknown pieces, so check the round trip
    if 0 <= i < sp.get_piece_size() and sp.id_to_piece(i) == name:
        return i
    if name in added:
        return added[name]
    raise TokenizerError(f"{key} {name!r} (from {where}) is not in the vocabulary of {MODEL_FILE}: "
                         f"fix {key} in tokenizer_config.json / special_tokens_map.json")
