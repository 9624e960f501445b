"""Scoring generated answers: an entity parser, entity P/R/F1, ROUGE and BLEU. No model needed.

    from finetune.evaluate.metrics import parse_entities, entity_scores, rouge, bleu
    parse_entities("Mario Rossi: PER\\nRoma: LOC").entities   # [("mario rossi", "PER"), ("roma", "LOC")]
    scores = entity_scores(gold_texts, predicted_texts, input_texts)  # EntityScores (micro/macro/...)
    rouge(predicted_texts, gold_texts)      # {"rouge1": {"precision", "recall", "f1"}, "rouge2", "rougeL"}
    bleu(predicted_texts, gold_texts)       # {"bleu": 0..100, "precisions": [...], "bp", ...}

Entities are compared as normalised ``(span, TYPE)`` pairs (``normalize_span``: NFC, casefold, collapsed
whitespace, surrounding punctuation stripped; ``normalize_type``: upper-case). The primary score is the
strict micro P/R/F1 over the *multiset* of pairs: an entity named twice in the gold must be predicted twice
(CoNLL-style exact match of span and type, Tjong Kim Sang & De Meulder 2003, counted as multisets because
a generated list, unlike a tagging, can repeat itself).

Everything here is pure Python apart from ``rouge`` (rouge-score) and ``bleu`` (sacrebleu), imported when
called, so the parser and the entity scores can be used anywhere.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import sacrebleu

Entity = tuple[str, str]  # (normalised span, normalised TYPE)

# ---------------------------------------------------------------------------------------------------
# normalisation


def _strip_punct(text: str) -> str:
    """Remove whitespace and Unicode punctuation (categories P*) from both ends; symbols (€, %) stay."""
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]).startswith("P")):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[start:end]


def normalize_text(text: str) -> str:
    """NFC, casefold, every whitespace run -> one space, trimmed. Used for spans and for the input text.

    NFC first so that an "è" typed as e + combining grave equals the precomposed one; casefold rather than
    lower so "Straße" and "STRASSE" compare equal.
    """
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def normalize_span(span: str) -> str:
    """The comparable form of an entity span: ``normalize_text`` plus surrounding punctuation stripped.

    ``"  «Acme S.p.A.» "`` -> ``"acme s.p.a"``: quotes, brackets and a sentence's final period around a
    span are formatting, not part of the name, and models add or drop them freely.
    """
    return _strip_punct(normalize_text(span))


def normalize_type(kind: str) -> str:
    """The comparable form of an entity type: trimmed of punctuation, whitespace collapsed, upper-case."""
    return " ".join(_strip_punct(unicodedata.normalize("NFC", kind)).upper().split())


# ---------------------------------------------------------------------------------------------------
# parsing

# A type is one word of letters/digits/_/- starting with a letter (PER, B-LOC, date_time). Requiring this
# keeps prose such as "Note: the text has no entities" from being read as an entity of type "THE TEXT...".
_TYPE_RE = re.compile(r"[^\W\d_][\w\-]{0,39}")
# One token of a token-tag list: "ginseng:B-PLANT", "extract:O" (IOB2 / IOBES prefixes).
_TAG_ITEM_RE = re.compile(r"(.+):([BIES]-[^\W\d_][\w\-]*|O)")
# List markers a model may put before each line: "- ", "* ", "• ", "1. ", "2) ".
_BULLET_RE = re.compile(r"(?:[-*•·]|\d{1,3}[.)])\s+")
_TEXT_KEYS = ("text", "span", "entity", "word", "name", "value")
_TYPE_KEYS = ("type", "label", "entity_type", "entity_group", "tag", "category")


@dataclass
class ParsedEntities:
    """What ``parse_entities`` read from one answer.

    ``entities`` are normalised ``(span, TYPE)`` pairs in order, duplicates kept. ``failed`` is True when
    some non-blank part of the answer could not be read as an entity (garbage, prose, a malformed line):
    the entities that *could* be read are still returned. ``format`` names the reading that was used:
    ``empty`` (blank answer = no entities, not a failure), ``lines``, ``tags``, ``json``.
    """

    entities: list[Entity] = field(default_factory=list)
    failed: bool = False
    format: str = "empty"


def parse_entities(text: Any) -> ParsedEntities:
    """Read entities from a model answer; never raises, whatever the input.

    Formats, tried in this order:

    1. JSON list: ``[{"text": "Mario", "type": "PER"}, ...]`` (also ``span``/``entity``/``word`` and
       ``label``/``entity_type`` keys) or ``[["Mario", "PER"], ...]``; ``{"entities": [...]}`` too.
       Markdown code fences around it are ignored.
    2. Token-tag list: whitespace-separated ``token:TAG`` items with IOB2/IOBES tags
       (``ginseng:B-PLANT extract:O``); ``B-``/``I-`` runs are merged into spans joined by one space.
       Used when every item looks like that, or at least half do and one carries a ``B-``-style tag.
    3. Lines (the training format, docs/DESIGN.md): one ``span: TYPE`` per line, split at the *last* colon so
       "Ore 10:30: TIME" works; list markers ("- ", "1. ") are dropped when every line has one; the type
       must be one word.

    A blank answer is "no entities" and not a failure.
    """
    try:
        return _parse(text)
    except Exception:  # noqa: BLE001 -- the contract is "never raises"; a parser bug must not stop an eval
        return ParsedEntities([], failed=True, format="error")


def _parse(text: Any) -> ParsedEntities:
    if text is None:
        return ParsedEntities()
    if not isinstance(text, str):
        text = str(text)
    body = text.strip()
    if not body:
        return ParsedEntities()
    fenced = _unfence(body)
    if fenced is not None:
        body = fenced
        if not body:
            return ParsedEntities()
    if body[0] in "[{":
        parsed = _parse_json(body)
        if parsed is not None:
            return parsed
    parsed = _parse_tags(body)
    if parsed is not None:
        return parsed
    return _parse_lines(body)


def _unfence(body: str) -> str | None:
    r"""The inside of a Markdown code fence that spans all of ``body`` (```` ```json ... ``` ````), or None.

    Plain string operations, linear in the answer: the regex this replaces (```` ```[\w-]*\s*(.*?)\s*``` ````)
    backtracked in cubic time on an answer that opens a fence and never closes it.
    """
    if len(body) < 6 or not (body.startswith("```") and body.endswith("```")):
        return None
    inner = body[3:-3]
    i = 0
    while i < len(inner) and (inner[i].isalnum() or inner[i] in "_-"):  # the language tag
        i += 1
    return inner[i:].strip()


def _make(span: Any, kind: Any) -> Entity | None:
    if not isinstance(span, (str, int, float)) or not isinstance(kind, str) or isinstance(span, bool):
        return None
    span_n, kind_n = normalize_span(str(span)), normalize_type(kind)
    if not span_n or not _TYPE_RE.fullmatch(kind_n):
        return None
    return span_n, kind_n


def _parse_json(body: str) -> ParsedEntities | None:
    """A JSON list of entities, or None if ``body`` is not JSON at all (then other formats are tried)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(data, dict):
        lists = [v for k, v in data.items() if isinstance(v, list) and str(k).lower() in ("entities", "ner")]
        if lists:
            data = lists[0]
        elif any(k in data for k in _TEXT_KEYS):
            data = [data]  # a single entity object
        else:
            return ParsedEntities([], failed=True, format="json")
    if not isinstance(data, list):
        return ParsedEntities([], failed=True, format="json")
    out, failed = [], False
    for item in data:
        entity = None
        if isinstance(item, dict):
            span = next((item[k] for k in _TEXT_KEYS if k in item), None)
            kind = next((item[k] for k in _TYPE_KEYS if k in item), None)
            entity = _make(span, kind)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            entity = _make(item[0], item[1])
        if entity is None:
            failed = True
        else:
            out.append(entity)
    return ParsedEntities(out, failed=failed, format="json")


def _parse_tags(body: str) -> ParsedEntities | None:
    """Token-tag items merged into spans, or None when ``body`` does not look like a tag list."""
    items = body.split()
    matches = [_TAG_ITEM_RE.fullmatch(item.rstrip(",;")) for item in items]
    good = [m for m in matches if m is not None]
    if len(good) < len(items) and (2 * len(good) < len(items) or all(m.group(2) == "O" for m in good)):
        return None
    out: list[Entity] = []
    span: list[str] = []
    span_type = ""

    def close() -> None:
        entity = _make(" ".join(span), span_type)
        if entity is not None:
            out.append(entity)
        span.clear()

    for m in good:
        token, tag = m.group(1), m.group(2)
        prefix, kind = (tag[0], tag[2:]) if tag != "O" else ("O", "")
        if span and (prefix in ("O", "B", "S") or normalize_type(kind) != normalize_type(span_type)):
            close()
        if prefix != "O":
            span.append(token)
            span_type = kind
            if prefix in ("E", "S"):
                close()
    if span:
        close()
    return ParsedEntities(out, failed=len(good) < len(items), format="tags")


def _parse_lines(body: str) -> ParsedEntities:
    out, failed = [], False
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    # Strip list markers only when every line has one (a real list), so "3. Liga: ORG" alone survives.
    if all(_BULLET_RE.match(line) for line in lines):
        lines = [_BULLET_RE.sub("", line, count=1) for line in lines]
    for line in lines:
        span, colon, kind = line.rpartition(":")
        entity = _make(span, kind) if colon else None
        if entity is None:
            failed = True
        else:
            out.append(entity)
    return ParsedEntities(out, failed=failed, format="lines")


# ---------------------------------------------------------------------------------------------------
# entity scores


def _ratio(num: int, den: int, empty: float) -> float:
    return num / den if den else empty


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


@dataclass
class TypeScores:
    """Precision/recall/F1 of one entity type; ``support`` = gold entities of that type."""

    precision: float
    recall: float
    f1: float
    support: int
    predicted: int
    correct: int


@dataclass
class EntityScores:
    """Corpus-level entity metrics (see ``entity_scores`` for the definitions and conventions)."""

    precision: float
    recall: float
    f1: float
    macro_f1: float
    exact_match: float
    parse_failure_rate: float
    hallucination_rate: float
    n_examples: int
    n_gold: int
    n_predicted: int
    n_correct: int
    n_hallucinated: int
    per_type: dict[str, TypeScores] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def in_text(span: str, text: str) -> bool:
    """True if the normalised ``span`` occurs in ``normalize_text(text)`` as whole words.

    Whole words (no letter or digit right before or after) so that "ma" is not "found" inside "mario".
    """
    if not span:
        return False
    pattern = r"(?<![^\W_])" + re.escape(span) + r"(?![^\W_])"
    return re.search(pattern, normalize_text(text)) is not None


def entity_scores(gold: Sequence[str | Iterable[Entity]], predicted: Sequence[str | Iterable[Entity]],
                  inputs: Sequence[str] | None = None) -> EntityScores:
    """Strict micro P/R/F1 over the multiset of (span, TYPE) pairs, plus the diagnostic rates.

    ``gold`` and ``predicted`` hold, per example, either the raw answer text (parsed with
    ``parse_entities``) or an iterable of ``(span, type)`` pairs (normalised here). ``inputs`` are the
    input texts, for the hallucination rate (omit to skip it: it is then 0).

    Definitions (per corpus; ``&`` is multiset intersection, so duplicates count only as often as gold has
    them):

    - correct = sum over examples of ``|gold & predicted|``; precision = correct / predicted;
      recall = correct / gold; F1 = 2PR / (P + R) (0 when P + R = 0).
    - A ratio with a zero denominator is 1.0 when *both* sides are empty (nothing to find and nothing
      claimed: a perfect answer) and 0.0 otherwise (sklearn's ``zero_division=0`` in that case).
    - per type: the same restricted to one type; macro-F1 = mean per-type F1 over the types seen in gold
      *or* predictions (as sklearn/seqeval do), so an invented type counts as a zero.
    - exact match: fraction of examples whose predicted multiset equals the gold multiset and whose
      answer parsed cleanly (garbage for a no-entity gold is not a match).
    - parse-failure rate: fraction of examples whose answer had unreadable parts (``ParsedEntities.failed``).
    - hallucination rate: predicted entities whose span does not occur (``in_text``) in the example's
      input, over all predicted entities.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"entity_scores: {len(gold)} gold answers but {len(predicted)} predictions")
    if inputs is not None and len(inputs) != len(gold):
        raise ValueError(f"entity_scores: {len(gold)} gold answers but {len(inputs)} inputs")
    n = len(gold)
    correct_by_type: Counter[str] = Counter()
    gold_by_type: Counter[str] = Counter()
    pred_by_type: Counter[str] = Counter()
    exact = failures = hallucinated = 0
    for i in range(n):
        g, _ = _as_entities(gold[i])
        p, failed = _as_entities(predicted[i])
        gc, pc = Counter(g), Counter(p)
        for (_, kind), count in (gc & pc).items():
            correct_by_type[kind] += count
        for (_, kind), count in gc.items():
            gold_by_type[kind] += count
        for (_, kind), count in pc.items():
            pred_by_type[kind] += count
        exact += gc == pc and not failed
        failures += failed
        if inputs is not None:
            hallucinated += sum(not in_text(span, inputs[i]) for span, _ in p)
    n_correct, n_gold, n_pred = (sum(c.values()) for c in (correct_by_type, gold_by_type, pred_by_type))
    both_empty = 1.0 if n_gold == 0 and n_pred == 0 else 0.0
    precision = _ratio(n_correct, n_pred, both_empty)
    recall = _ratio(n_correct, n_gold, both_empty)
    per_type = {}
    for kind in sorted(gold_by_type.keys() | pred_by_type.keys()):
        n_type_correct, n_type_gold = correct_by_type[kind], gold_by_type[kind]
        n_type_pred = pred_by_type[kind]
        type_precision = _ratio(n_type_correct, n_type_pred, 0.0)
        type_recall = _ratio(n_type_correct, n_type_gold, 0.0)
        per_type[kind] = TypeScores(precision=type_precision, recall=type_recall,
                                    f1=_f1(type_precision, type_recall), support=n_type_gold,
                                    predicted=n_type_pred, correct=n_type_correct)
    macro = sum(t.f1 for t in per_type.values()) / len(per_type) if per_type else both_empty
    return EntityScores(
        precision=precision, recall=recall,
        f1=_f1(precision, recall) if (n_gold or n_pred) else both_empty,
        macro_f1=macro, exact_match=_ratio(exact, n, 0.0), parse_failure_rate=_ratio(failures, n, 0.0),
        hallucination_rate=_ratio(hallucinated, n_pred, 0.0), n_examples=n, n_gold=n_gold,
        n_predicted=n_pred, n_correct=n_correct, n_hallucinated=hallucinated, per_type=per_type)


def _as_entities(answer: str | Iterable[Entity] | None) -> tuple[list[Entity], bool]:
    if answer is None or isinstance(answer, str):
        parsed = parse_entities(answer)
        return parsed.entities, parsed.failed
    out = []
    for span, kind in answer:
        entity = (normalize_span(span), normalize_type(kind))
        if entity[0]:
            out.append(entity)
    return out, False


# ---------------------------------------------------------------------------------------------------
# text overlap: ROUGE and BLEU


class UnicodeWordTokenizer:
    """rouge-score tokenizer that keeps every Unicode letter and digit.

    rouge-score's default tokenizer lower-cases and then replaces everything outside ``[a-z0-9]`` with
    spaces, so "città" becomes "citt", "perché" becomes "perch" and "è" vanishes: Italian scores would be
    computed on mangled words. This one takes NFC-normalised, casefolded runs of letters and digits
    (``[^\\W_]+``), splitting on everything else, exactly like the default does for ASCII text. No
    stemming (rouge-score's Porter stemmer is English-only).
    """

    _WORD = re.compile(r"[^\W_]+")

    def tokenize(self, text: str) -> list[str]:
        return self._WORD.findall(unicodedata.normalize("NFC", text).casefold())


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean per-example ROUGE-1/2/L precision, recall, F1 (Lin 2004) via rouge-score.

    Scores are computed per (prediction, reference) pair with ``UnicodeWordTokenizer`` and averaged
    with equal weight per example (no bootstrap resampling). ROUGE-L is the
    sentence-level LCS variant (``rougeL``), not the summary-level ``rougeLsum``. A pair where both texts
    have no words (e.g. gold and prediction both "no entities") scores 1.0, where rouge-score would say 0:
    identical empty answers are correct, and averaging in zeros would punish the model for them.
    """
    from rouge_score import rouge_scorer  # lazy: it imports nltk (~0.3 s), needed only when scoring

    if len(predictions) != len(references):
        raise ValueError(f"rouge: {len(predictions)} predictions but {len(references)} references")
    tokenizer = UnicodeWordTokenizer()
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=tokenizer)
    sums = {t: [0.0, 0.0, 0.0] for t in ROUGE_TYPES}
    for pred, ref in zip(predictions, references):
        if not tokenizer.tokenize(pred) and not tokenizer.tokenize(ref):
            for t in ROUGE_TYPES:
                sums[t] = [s + 1.0 for s in sums[t]]
            continue
        scores = scorer.score(ref, pred)  # rouge-score's order is (target, prediction)
        for t in ROUGE_TYPES:
            s = scores[t]
            sums[t] = [sums[t][0] + s.precision, sums[t][1] + s.recall, sums[t][2] + s.fmeasure]
    n = max(len(predictions), 1)
    return {t: {"precision": v[0] / n, "recall": v[1] / n, "f1": v[2] / n} for t, v in sums.items()}


def bleu(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> dict[str, Any]:
    """Corpus BLEU (Papineni et al. 2002) by ``sacrebleu.corpus_bleu``, its defaults (13a, exp smoothing).

    ``references`` is one reference per prediction (``list[str]``) or several (``list[list[str]]``, one
    inner list of the same length per prediction). Line breaks become spaces first: a multi-line entity
    list is one segment, and sacrebleu's file-oriented API assumes one segment per line.
    Returns ``{"bleu": 0..100, "precisions": [p1..p4 in %], "bp", "sys_len", "ref_len"}``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"bleu: {len(predictions)} predictions but {len(references)} references")
    multi = [[r] if isinstance(r, str) else list(r) for r in references]
    width = max((len(r) for r in multi), default=1)
    if any(len(r) != width for r in multi):
        raise ValueError("bleu: every prediction needs the same number of references")
    flat = [_one_line(p) for p in predictions]
    streams = [[_one_line(r[k]) for r in multi] for k in range(width)]  # sacrebleu wants one list per ref
    result = sacrebleu.corpus_bleu(flat, streams)
    return {"bleu": float(result.score), "precisions": [float(p) for p in result.precisions],
            "bp": float(result.bp), "sys_len": int(result.sys_len), "ref_len": int(result.ref_len)}


def _one_line(text: str) -> str:
    return " ".join(text.split("\n"))


def perplexity(loss: float) -> float:
    """exp(mean token NLL); inf when the loss is too large to exponentiate, nan when it is nan."""
    if math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < 700 else math.inf
