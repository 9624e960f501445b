"""Tokenizer: Llama-2's SentencePiece `tokenizer.model`, or a Hugging Face `tokenizer.json`.

One class, two backends, the same conventions:
- `tokenizer.model` (Llama-2 and its fine-tunes) goes through SentencePiece, `tokenizer.json`
  (Llama-3, SmolLM2, Mistral's and Qwen's byte-level or SentencePiece-style BPE) through HF
  `tokenizers`. When a folder has both, `tokenizer.model` wins: it is the file Llama-2 was trained
  with, and the ids below are proven against Meta's and HF's for it.
- Text is always encoded as plain text. Strings such as "<s>", "</s>", "<|im_start|>" or "[INST]"
  inside it are *not* turned into control ids, so data can never inject a turn boundary; control ids
  only come from `bos=` / `eos=` or from a chat template (`finetune.data.templates`), which asks for them
  by name through `special_tokens`.

SentencePiece backend. Ids are exactly what Meta's reference code produces (`sp.encode(text)`, BOS in
front when asked, EOS at the end when asked). SentencePiece's dummy prefix ("▁" in front of the text)
is always added, also when the text already starts with a space (" Ciao" -> "▁▁Ciao" before BPE), so
decode(encode(t)) == t. Agreement with Hugging Face (tests/llama/test_tokenizer.py proves it on the
fixture's model): transformers 5's `LlamaTokenizer` gives the same ids on every text that does not
start with a space, with `legacy` false or true (`legacy` only changes the prefix space of text that
follows a special-token *string*, and we never parse those out of text). On text that starts with a
space transformers 5 differs: its Metaspace pre-tokenizer adds no dummy prefix when the text already
begins with "▁". The pipeline of Llama-2's published tokenizer.json (normaliser Prepend("▁") +
Replace(" ", "▁")) keeps the prefix and equals our ids on every input; we follow that.

`tokenizer.json` backend. The file's own pipeline (normaliser, pre-tokenizer, BPE, decoder) runs in
`tokenizers`, so ids equal `transformers.AutoTokenizer`'s on any text without special-token strings
(tests/llama/test_tokenizer_json.py). Whether a sequence starts with BOS follows the files as
transformers does: `add_bos_token` in tokenizer_config.json when present, else what the file's
post-processor adds (Llama-3's adds `<|begin_of_text|>`, SmolLM2's nothing). `encode(text,
bos=True)` means "this text starts a sequence": it adds BOS only for a tokenizer that adds one. EOS
is only added on request (`eos=True`): the data pipeline ends each answer with it explicitly. Only
BPE models are accepted: every Llama-family tokenizer is BPE, and a WordPiece or Unigram file means
the wrong model directory.

Special tokens. Names come from the tokenizer itself (SentencePiece's unk/bos/eos), then
`tokenizer_config.json`, then `special_tokens_map.json` (the later file wins, as in transformers);
missing ids are taken from `generation_config.json`, then `config.json` (`bos_token_id`...). The
stop ids of generation are EOS plus `generation_config.json`'s `eos_token_id` (an int or a list:
Llama-3-Instruct stops at `<|eot_id|>` and `<|end_of_text|>`).

Pad id. Llama-2 defines no pad token. If the tokenizer files name one, we use it; otherwise unk, and
for a tokenizer without unk (Llama-3) EOS. Padding is always masked by position (attention_mask /
labels -100), never recognised by id, so pad == EOS is safe; pad != EOS where possible keeps any
reader of raw ids from mistaking a pad for the end of a sequence. Unk is a safe filler because with
byte fallback no text ever encodes to unk, so `decode` dropping pads loses nothing.

Vocabulary size. A tokenizer with more ids than the model's embedding (`vocab_size` in config.json
beside it) would index past the embedding mid-training: it is refused at load, naming both numbers.
A larger embedding than tokenizer (padded vocabularies) is normal and accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

MODEL_FILE = "tokenizer.model"
JSON_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # later files override earlier
ID_FILES = ("generation_config.json", "config.json")  # *_token_id fallbacks, earlier files win
SPECIAL_KEYS = ("unk_token", "bos_token", "eos_token", "pad_token")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message says what, where and how to fix it."""


class _SentencePiece:
    """`tokenizer.model` through SentencePiece (plain-text encoding; "<s>" in text is text)."""

    def __init__(self, sp: spm.SentencePieceProcessor) -> None:
        self.sp = sp
        self.size = sp.get_piece_size()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=1)

    def decode(self, ids: list[int], skip_special: bool, tok: Tokenizer) -> str:
        # Runs of ordinary ids are decoded together; control and added ids are cut out (`skip_special`) or
        # written as their pieces, as SentencePiece would never spell them.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in tok._specials or i >= self.size:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special or (i >= self.size and i not in tok._specials):
                    out.append(tok.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def piece_id(self, name: str) -> int | None:
        i = self.sp.piece_to_id(name)  # returns unk's id for unknown pieces, so check the round trip
        return i if 0 <= i < self.size and self.sp.id_to_piece(i) == name else None


class _TokenizersJson:
    """`tokenizer.json` through HF `tokenizers`, with special-token strings in text kept as text."""

    def __init__(self, hf: Any, specials: dict[str, int]) -> None:
        self.hf = hf
        self.hf.encode_special_tokens = True  # "<|im_start|>" inside data is text, never a control id
        self.size = hf.get_vocab_size(with_added_tokens=True)
        self.specials = specials

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool, tok: Tokenizer) -> str:
        # One call over the kept ids, as transformers decodes: the decoder's start-of-text rules (a
        # Metaspace prefix strip) then apply once, not after every control token.
        return self.hf.decode([i for i in ids if not (skip_special and i in tok._specials)],
                              skip_special_tokens=False)

    def piece(self, i: int) -> str:
        return self.hf.id_to_token(i)

    def piece_id(self, name: str) -> int | None:
        return self.hf.token_to_id(name)


class Tokenizer:
    """A Llama tokenizer: `encode`, `encode_batch`, `decode`, the special ids and the chat template."""

    def __init__(self, sp: spm.SentencePieceProcessor | None, *, bos_id: int | None, eos_id: int,
                 unk_id: int | None, pad_id: int, added: dict[int, str] | None = None,
                 source: str = "<memory>", backend: _SentencePiece | _TokenizersJson | None = None,
                 add_bos: bool = True, chat_template: str | None = None,
                 stop_ids: Sequence[int] = ()) -> None:
        self.backend = backend if backend is not None else _SentencePiece(sp)
        self.sp = sp  # the SentencePiece processor, None for a tokenizer.json
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos = add_bos and bos_id is not None
        self.source = source
        self.chat_template = chat_template
        # Tokens beyond the SentencePiece vocabulary (e.g. a "[PAD]" added by a fine-tune).
        self.added = dict(added or {})
        self.vocab_size = max([self.backend.size - 1, *self.added]) + 1
        self.stop_ids = sorted({eos_id, *stop_ids})
        self._specials = frozenset({bos_id, eos_id, pad_id} - {None})
        if isinstance(self.backend, _TokenizersJson):
            self._specials |= frozenset(self.backend.specials.values())

    @property
    def special_tokens(self) -> dict[str, int]:
        """Control tokens by their text ("<|im_end|>" -> 2): what a chat template may name."""
        names = {self.id_to_piece(i): i for i in self._specials}
        if isinstance(self.backend, _TokenizersJson):
            names.update(self.backend.specials)
        return names

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.id_to_piece(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self.id_to_piece(self.eos_id)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.model` or `tokenizer.json` (+ the JSON config files) from an HF directory.

        `path` may also be a `tokenizer.model` / `tokenizer.json` file (then only its own specials are
        used).
        """
        path = Path(path)
        if not path.exists():
            raise TokenizerError(f"tokenizer path {path} does not exist: pass the model directory "
                                 f"that holds {MODEL_FILE} or {JSON_FILE}")
        folder = path if path.is_dir() else None
        if folder is None:
            model_file = path
        elif (path / MODEL_FILE).is_file():
            model_file = path / MODEL_FILE
        elif (path / JSON_FILE).is_file():
            model_file = path / JSON_FILE
        else:
            raise TokenizerError(f"no {MODEL_FILE} or {JSON_FILE} in {path}: copy the tokenizer files "
                                 "from the original checkpoint into it")
        if model_file.name.endswith(".json"):
            tok = _from_json(model_file, folder)
        else:
            tok = _from_sentencepiece(model_file, folder)
        if folder is not None:
            _check_vocab_against_model(tok, folder)
        return tok

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text` (special-token strings in it stay text).

        `bos`: the text starts a sequence, so BOS goes in front if this tokenizer adds one (Llama-2 and
        Llama-3 do, SmolLM2 does not). `eos`: EOS at the end."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return self._wrap(self.backend.encode_batch([text])[0], bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        """`encode` for many texts in one backend call (its native loop, not Python's)."""
        texts = list(texts)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"Tokenizer.encode_batch expects str items, got {type(bad).__name__}")
        return [self._wrap(ids, bos, eos) for ids in self.backend.encode_batch(texts)]

    def encode_with_specials(self, text: str) -> list[int]:
        """Ids of *trusted* text whose control-token strings become control ids, as transformers
        tokenises a rendered chat template (`finetune.data.templates`). Never call it on data: there
        "<|im_end|>" must stay text. No BOS/EOS is added (a template writes its own)."""
        if not isinstance(self.backend, _TokenizersJson):
            raise TokenizerError(f"{self.source} is a SentencePiece tokenizer, which cannot read control "
                                 "tokens out of a chat template; use the 'llama2-chat' template, or the "
                                 "model's tokenizer.json")
        hf = self.backend.hf
        hf.encode_special_tokens = False
        try:
            return hf.encode(text, add_special_tokens=False).ids
        finally:
            hf.encode_special_tokens = True

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return ([self.bos_id] if bos and self.add_bos else []) + ids + ([self.eos_id] if eos else [])

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`. Control tokens (BOS/EOS/pad, chat markers) are dropped (`skip_special`) or
        written as their text."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                hint = " (-100 marks masked labels: drop those before decoding)" if i == -100 else ""
                raise TokenizerError(f"token id {i!r} is out of range [0, {self.vocab_size}) for "
                                     f"{self.source}{hint}")
        return self.backend.decode(ids, skip_special, self)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id `i` (e.g. "▁Ciao", "<0x0A>", "<s>", "Ġciao")."""
        if i in self.added:
            return self.added[i]
        if not 0 <= i < self.backend.size:
            raise TokenizerError(f"token id {i} is out of range [0, {self.vocab_size}) for {self.source}")
        return self.backend.piece(i)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, unk_id={self.unk_id})")


# ---------------------------------------------------------------------- the two loaders
def _from_sentencepiece(model_file: Path, folder: Path | None) -> Tokenizer:
    sp = _load_sentencepiece(model_file)
    backend = _SentencePiece(sp)
    names: dict[str, str | None] = {"unk_token": _piece_or_none(sp, sp.unk_id()),
                                    "bos_token": _piece_or_none(sp, sp.bos_id()),
                                    "eos_token": _piece_or_none(sp, sp.eos_id()),
                                    "pad_token": _piece_or_none(sp, sp.pad_id())}
    added, cfg = _read_configs(folder, names)
    ids = _resolve_all(backend, added, names=names, where=folder or model_file, model_name=model_file.name)
    for key in ("unk_token", "bos_token", "eos_token"):
        if ids[key] is None:
            raise TokenizerError(f"{model_file} defines no {key} and no tokenizer_config.json names one: "
                                 f"add \"{key}\" to tokenizer_config.json next to it")
    pad = ids["pad_token"] if ids["pad_token"] is not None else ids["unk_token"]  # see module docstring
    return Tokenizer(sp, bos_id=ids["bos_token"], eos_id=ids["eos_token"], unk_id=ids["unk_token"],
                     pad_id=pad, added=added, source=str(model_file), backend=backend,
                     chat_template=_chat_template(cfg, folder), stop_ids=_generation_stop_ids(folder))


def _from_json(json_file: Path, folder: Path | None) -> Tokenizer:
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:  # a dependency of ours; only a broken install gets here
        raise TokenizerError(f"{json_file} needs the `tokenizers` package: pip install tokenizers") from None
    spec = _read_json(json_file)
    model_type = (spec.get("model") or {}).get("type")
    if model_type != "BPE":
        raise TokenizerError(f"{json_file}: tokenizer model type {model_type!r} is not supported "
                             "(Llama-family tokenizers are BPE); point model.path at the right model "
                             "directory")
    try:
        hf = HFTokenizer.from_str(json.dumps(spec))
    except Exception as e:  # tokenizers raises plain Exception subclasses with its parser's message
        raise TokenizerError(f"{json_file} is not a valid tokenizer.json ({e}); copy the original file "
                             "of the checkpoint") from None
    specials = {t["content"]: int(t["id"]) for t in spec.get("added_tokens") or []
                if isinstance(t, dict) and t.get("special") and "content" in t and "id" in t}
    backend = _TokenizersJson(hf, specials)
    names: dict[str, str | None] = dict.fromkeys(SPECIAL_KEYS)
    added, cfg = _read_configs(folder, names)
    ids = _resolve_all(backend, added, names=names, where=folder or json_file, model_name=json_file.name)
    fallback = _config_ids(folder)
    for key in SPECIAL_KEYS:
        if ids[key] is None and fallback.get(key) is not None:
            ids[key] = fallback[key]
    if ids["eos_token"] is None:
        raise TokenizerError(f"{json_file}: no eos_token in tokenizer_config.json and no eos_token_id in "
                             "generation_config.json or config.json: add \"eos_token\" to "
                             "tokenizer_config.json")
    probe_plain = hf.encode("a", add_special_tokens=False).ids
    probe = hf.encode("a", add_special_tokens=True).ids
    add_bos = bool(cfg.get("add_bos_token", len(probe) > len(probe_plain) and probe[0] == ids["bos_token"]))
    pad = next(i for i in (ids["pad_token"], ids["unk_token"], ids["eos_token"]) if i is not None)
    return Tokenizer(None, bos_id=ids["bos_token"], eos_id=ids["eos_token"], unk_id=ids["unk_token"],
                     pad_id=pad, added=added, source=str(json_file), backend=backend, add_bos=add_bos,
                     chat_template=_chat_template(cfg, folder),
                     stop_ids=_generation_stop_ids(folder))


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
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: JSONDecodeError, an int of 4300+ digits
        raise TokenizerError(f"{file} is not valid JSON ({str(e)[:200]}): fix or delete it") from None
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


def _read_configs(folder: Path | None, names: dict[str, str | None]) -> tuple[dict[int, str], dict[str, Any]]:
    """Special-token names (updated in place) and added tokens from the JSON files; tokenizer_config."""
    added: dict[int, str] = {}
    first: dict[str, Any] = {}
    if folder is None:
        return added, first
    for fname in CONFIG_FILES:
        cfg = _read_json(folder / fname)
        if fname == CONFIG_FILES[0]:
            first = cfg
        added.update(_added_tokens(cfg, folder / fname))
        for key in SPECIAL_KEYS:
            if key in cfg:
                names[key] = _token_name(cfg[key], folder / fname, key)
    return added, first


def _resolve_all(backend: _SentencePiece | _TokenizersJson, added: dict[int, str], *,
                 names: dict[str, str | None], where: Path, model_name: str) -> dict[str, int | None]:
    by_name = {name: i for i, name in added.items()}
    out: dict[str, int | None] = {}
    for key in SPECIAL_KEYS:
        name = names[key]
        if name is None:
            out[key] = None
            continue
        i = backend.piece_id(name)
        if i is None:
            i = by_name.get(name)
        if i is None:
            raise TokenizerError(f"{key} {name!r} (from {where}) is not in the vocabulary of {model_name}: "
                                 f"fix {key} in tokenizer_config.json / special_tokens_map.json")
        out[key] = i
    return out


def _config_ids(folder: Path | None) -> dict[str, int | None]:
    """`bos_token_id`... from generation_config.json, then config.json (a list means: its first id)."""
    out: dict[str, int | None] = {}
    for fname in reversed(ID_FILES) if folder is not None else ():
        cfg = _read_json(folder / fname)
        for key in SPECIAL_KEYS:  # a negative id (old conversions wrote pad_token_id: -1) means none
            ids = _token_ids(cfg, key + "_id", folder / fname, negative_ok=True)
            if ids and ids[0] >= 0:
                out[key] = ids[0]
    return out


def _generation_stop_ids(folder: Path | None) -> list[int]:
    """Every `eos_token_id` of generation_config.json (int or list): the ids generation stops at."""
    if folder is None:
        return []
    return _token_ids(_read_json(folder / ID_FILES[0]), "eos_token_id", folder / ID_FILES[0])


def _token_ids(cfg: dict[str, Any], key: str, file: Path, *, negative_ok: bool = False) -> list[int]:
    """`cfg[key]` as HF writes a token id: null, an id, or a list of ids (ids are integers >= 0).
    Anything else is refused, naming the value: `[2, "x", null]` used to reach generation, where
    sorting the stop ids raised a TypeError."""
    value = cfg.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or (v < 0 and not negative_ok):
            where = f"item {i} of {key}" if isinstance(value, list) else key
            raise TokenizerError(f"{file}: {where} is {_shown(v)}, not a token id (an integer >= 0); "
                                 f"fix {key} (an id, a list of ids, or null) or restore the file from the "
                                 "original checkpoint")
    return list(values)


def _shown(value: Any, limit: int = 40) -> str:
    """A JSON value for an error line, bounded (strings cut before repr, containers by their type)."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = repr(value[:limit]) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _chat_template(cfg: dict[str, Any], folder: Path | None) -> str | None:
    """`chat_template` of tokenizer_config.json (a string, or HF's list of named templates: "default"),
    else `chat_template.jinja` beside it (where transformers 5 saves it)."""
    value = cfg.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next(iter(named.values()), None)
    if isinstance(value, str) and value:
        return value
    if folder is not None and (folder / CHAT_TEMPLATE_FILE).is_file():
        try:
            return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{folder / CHAT_TEMPLATE_FILE} is not UTF-8 text ({e}): "
                                 "fix or delete it") from None
    return None


def _check_vocab_against_model(tok: Tokenizer, folder: Path) -> None:
    model_cfg = _read_json(folder / "config.json")
    # the model's own stop ids (LlamaConfig.eos_token_ids) reach generation too: same rule as above
    _token_ids(model_cfg, "eos_token_id", folder / "config.json")
    model_vocab = model_cfg.get("vocab_size")
    if isinstance(model_vocab, int) and not isinstance(model_vocab, bool) and tok.vocab_size > model_vocab:
        raise TokenizerError(f"{tok.source} has {tok.vocab_size} tokens but the model's config.json says "
                             f"vocab_size {model_vocab}: ids past {model_vocab - 1} have no embedding; "
                             "use the tokenizer that belongs to this checkpoint")
