"""Rows -> prompt template -> token ids + labels, ready for the loop and the evaluator; the collator.

Pipeline: ``encode_example`` per row (tokenise once, truncate the input if needed) -> ``collate`` (right
padding, masked by position); ``prepare`` runs the whole data stage (read, split, encode) and counts.

Labels follow the Hugging Face convention: ``labels`` is aligned with ``input_ids`` and the loss at
position t compares ``logits[t]`` with ``labels[t + 1]`` (the loop shifts); ``-100`` means "no loss".
``labels[0]`` (BOS) is always -100: nothing predicts the first token.

Tokenisation, and why prompt and response are encoded separately:
``input_ids = [BOS] + encode(prompt) + encode(response) + [EOS]``. Encoding the two texts apart makes the
boundary exact: no SentencePiece merge can straddle it, the prompt ids are *exactly* the ids the
evaluator feeds to generation (``ex.input_ids[:ex.prompt_len]``), and the loss mask falls on a token
edge. SentencePiece (Llama's ``add_dummy_prefix``) starts every encoded text with a "▁", so the
response's first token is the word-initial form (``▁Mario``, as after a space in running text) rather
than whatever a joint encoding after ``\\n`` would give. We train on that form consistently; a model
trained so generates ``▁Mario``, and decoding the generated ids alone drops the leading "▁", so the
evaluator's text equals the reference. Hence also: a template's *spaces* right before ``{output}`` are
removed from the prompt (the dummy prefix stands for that space: llama2-chat's ``[/INST] {output}``),
while a *newline* there stays in the prompt (alpaca's ``### Response:\\n``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from finetune.config import DataConfig
from finetune.data.rows import DataStats, Row, read_rows, split_rows
from finetune.data.templates import prompt_ids, response_ids
from finetune.errors import UserError

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index

# Where the answer starts in a preformatted `text` row when data.response_marker is null (checked in order).
AUTO_RESPONSE_MARKERS = ("[/INST]", "### Response:\n", "### Response:")


class TokenizerLike(Protocol):
    """What this module needs from `llama.Tokenizer` (SentencePiece or tokenizer.json)."""

    bos_id: int
    eos_id: int
    pad_id: int | None               # None (or -1 from SentencePiece) when the model has no pad token

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class Example:
    """One tokenised row. ``input_ids[:prompt_len]`` is the prompt (BOS included) to generate from."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int = 0
    truncated: bool = False          # the input text was cut to fit max_length
    row: Row | None = None           # the source row (reference output, input text) for the evaluator


@dataclass
class PreparedData:
    train: list[Example]
    test: list[Example]
    stats: DataStats = field(default_factory=DataStats)


def encode_prompt(tok: TokenizerLike, cfg: DataConfig, input_text: str, *,
                  max_tokens: int) -> tuple[list[int], bool] | None:
    """The prompt ids (``templates.prompt_ids``) in at most ``max_tokens`` ids, cutting the *input* if needed.

    The input is cut token-wise from its end and the prompt re-formatted around it, so the template's
    tail (``### Response:``, ``[/INST]``, the chat's generation prompt) is always kept and the ids are
    exactly ``prompt_ids(cfg, prefix_of_input)``. Returns ``(ids, truncated)``, or None if not even
    one input token fits. The evaluator may call it too (budget = max_length - max_new_tokens)."""
    ids = prompt_ids(tok, cfg, input_text)
    if len(ids) <= max_tokens:
        return ids, False
    input_ids = tok.encode(input_text, bos=False, eos=False)
    keep = len(input_ids) - (len(ids) - max_tokens)
    while keep > 0:  # decode/re-encode may shift a token or two at the cut; shrink until it fits
        # a cut inside a multi-byte character decodes to U+FFFD: drop it rather than invent a character
        kept = tok.decode(input_ids[:keep]).rstrip("\ufffd")
        ids = prompt_ids(tok, cfg, kept)
        if len(ids) <= max_tokens:
            return ids, True
        keep -= len(ids) - max_tokens
    return None


def encode_example(tok: TokenizerLike, cfg: DataConfig, row: Row) -> Example | None:
    """Tokenise one row: ``[BOS] prompt | response [EOS]`` (chat: ``prompt | answer <end-of-turn>``);
    None if it cannot fit ``cfg.max_length``.

    Prompt tokens get label -100 unless ``cfg.train_on_prompt``; BOS never carries loss; the answer's
    end (EOS or end-of-turn) always does.
    """
    if row.is_text:
        split = _split_text_row(cfg, row.text)
        if split is None:
            return None
        prompt_text, response = split
    else:
        prompt_text, response = None, row.output
    if prompt_text is None:
        answer = response_ids(tok, cfg, response)
    else:  # a preformatted text row brings its own layout: the answer ends with EOS
        answer = (tok.encode(response, bos=False, eos=False) if response else []) + [tok.eos_id]
    budget = cfg.max_length - len(answer)
    if prompt_text is None:
        fitted = encode_prompt(tok, cfg, row.input, max_tokens=budget)
    else:  # a preformatted text has no separate input to cut
        ids = tok.encode(prompt_text, bos=True, eos=False)
        fitted = (ids, False) if len(ids) <= budget else None
    if fitted is None:
        return None
    prompt, truncated = fitted
    input_ids = prompt + answer
    if cfg.train_on_prompt or prompt_text == "":  # "" = a text row without a response marker
        labels = [IGNORE_INDEX] + input_ids[1:]
    else:
        labels = [IGNORE_INDEX] * len(prompt) + answer
    return Example(input_ids, labels, prompt_len=len(prompt), truncated=truncated, row=row)


def _split_text_row(cfg: DataConfig, text: str) -> tuple[str, str] | None:
    """A preformatted text -> (prompt, response) at the response marker (last occurrence).

    Literal ``<s>``/``</s>`` at the ends are removed (BOS/EOS are ids). No marker: with an explicit
    ``response_marker`` the row is skipped (None); in auto mode the whole text is the response.
    """
    text = text.strip()
    text = text.removeprefix("<s>").removesuffix("</s>").strip()
    markers = (cfg.response_marker,) if cfg.response_marker else AUTO_RESPONSE_MARKERS
    for marker in markers:
        at = text.rfind(marker)
        if at >= 0:
            prompt, response = text[:at + len(marker)].rstrip(" "), text[at + len(marker):]
            return prompt, response.removeprefix(" ")  # the dummy prefix stands for that space
    if cfg.response_marker:
        return None
    return "", text


def prepare(cfg: DataConfig, tok: TokenizerLike) -> PreparedData:
    """Read, split and tokenise; warn about (and count) every skipped row. Raise if nothing is trainable."""
    rows, stats = read_rows(cfg)
    train_rows, test_rows = split_rows(rows, cfg)
    stats.train_rows, stats.test_rows = len(train_rows), len(test_rows)
    if any(not r.is_text for r in rows):
        fixed = len(prompt_ids(tok, cfg, "")) + len(response_ids(tok, cfg, ""))
        if fixed >= cfg.max_length:
            raise UserError(f"data.max_length={cfg.max_length} is too small for the template: the prompt "
                            f"with an empty input plus EOS already takes {fixed} tokens; "
                            "raise data.max_length")
    splits = []
    skipped = []
    for part in (train_rows, test_rows):
        examples = []
        for row in part:
            ex = encode_example(tok, cfg, row)
            if ex is None:
                if row.is_text and cfg.response_marker and cfg.response_marker not in row.text:
                    stats.marker_missing_skipped += 1
                else:
                    stats.too_long_skipped += 1
                skipped.append(row.source)
                continue
            if row.is_text and ex.prompt_len == 1 and not cfg.train_on_prompt:
                stats.unmasked_text_rows += 1
            stats.truncated += ex.truncated
            stats.max_tokens = max(stats.max_tokens, len(ex.input_ids))
            examples.append(ex)
        splits.append(examples)
    train, test = splits
    stats.train_examples, stats.test_examples = len(train), len(test)
    stats.train_tokens = sum(len(e.input_ids) for e in train)
    stats.train_target_tokens = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in train)
    if stats.empty_skipped:
        warnings.warn(f"{cfg.path}: skipped {stats.empty_skipped} empty rows (no input text)", stacklevel=2)
    if stats.too_long_skipped:
        warnings.warn(f"{cfg.path}: skipped {stats.too_long_skipped} rows whose response does not fit "
                      f"data.max_length={cfg.max_length} even with the input cut away (e.g. "
                      f"{', '.join(skipped[:5])}); raise data.max_length to keep them", stacklevel=2)
    if stats.marker_missing_skipped:
        warnings.warn(f"{cfg.path}: skipped {stats.marker_missing_skipped} text rows without "
                      f"data.response_marker {cfg.response_marker!r}", stacklevel=2)
    if stats.unmasked_text_rows:
        warnings.warn(f"{cfg.path}: {stats.unmasked_text_rows} text rows have no response marker "
                      f"({', '.join(map(repr, AUTO_RESPONSE_MARKERS))}); their whole text carries loss; "
                      "set data.response_marker to mask their prompts", stacklevel=2)
    if not train:
        raise UserError(f"{cfg.path}: no training example fits data.max_length={cfg.max_length}; raise it")
    return PreparedData(train=train, test=test, stats=stats)


def padding_id(tok: TokenizerLike) -> int:
    """The id written into padded positions: the tokenizer's pad token, else its EOS (Llama-2 has no
    pad token). Which id it is does not matter: padding is recognised by position (the attention mask,
    labels -100), never by id, so EOS keeps its loss where it is real."""
    return tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else tok.eos_id


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids`` (pad_id), ``attention_mask`` (1 real, 0 pad),
    ``labels`` (-100 on padding). Padding is marked by position, never by token id: pad may equal EOS,
    and EOS must keep its loss."""
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
