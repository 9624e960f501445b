"""Property tests of the entity parser: it never fails on any string, and round-trips each format.

``parse_entities`` wraps its work in a last-resort ``except`` (an eval must not die on one odd answer) and
reports ``format="error"`` when that fires; these tests require that it *never* fires, so they test the
real parsing code, not the safety net.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from finetune.data.rows import tags_to_entities
from finetune.evaluate.metrics import normalize_span, normalize_type, parse_entities


def fast(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces a confused model emits: colons, tag prefixes, JSON punctuation, bullets, fences, odd Unicode.
FRAGMENTS = [":", ": ", "::", "B-", "I-", "E-", "S-", "O", "PER", "loc", "Mario Rossi", "città", "è",
             "\n", "\r\n", " ", "\t", "[", "]", "{", "}", '"', "'", ",", ";", '"text"', '"type"', "null",
             "1.", "- ", "* ", "•", "```", "```json", "0", "-1", "1e999", "NaN", "\u200b", "\u2028",
             "\x00", "\ufeff", "e\u0300", "🙂", "[[", "]]", '{"entities": ', "true", "\\", "\\u00"]


def check(parsed) -> None:
    assert parsed.format != "error", "the parser's safety net fired: a real code path raised"
    for span, kind in parsed.entities:
        assert span and span == normalize_span(span)
        assert kind and kind == normalize_type(kind) and kind == kind.upper()


@fast(3000)
@given(st.text(max_size=200))
def test_never_raises_on_any_text(text: str) -> None:
    check(parse_entities(text))


@fast(2000)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_never_raises_on_entity_like_garbage(text: str) -> None:
    check(parse_entities(text))


@fast(500)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(["text", "type", "label", "span", "entities", "x"]),
                                      inner, max_size=4),
                    max_leaves=20))
def test_never_raises_on_any_json(value) -> None:
    check(parse_entities(json.dumps(value)))


def test_pathological_inputs() -> None:
    for text in ["[" * 100_000, "{" * 100_000 + "}", '{"a":' * 50_000, "x:B-PER " * 20_000,
                 ":" * 100_000, "\n" * 100_000, None, 123, b"Mario: PER"]:
        check(parse_entities(text))


# A span: letters (accented too), digits and inner punctuation, at least one letter; a type: one word.
_SPAN_CHARS = st.text(alphabet=st.sampled_from(list("abcdeèéòùçXYZ0123 .'&/()«»")), max_size=10)
SPAN = st.tuples(_SPAN_CHARS, st.sampled_from(list("aeèXZç")), _SPAN_CHARS).map("".join)
TYPE = st.text(alphabet="ABCDEFGLMOPRSTXYZ", min_size=1, max_size=6) | st.sampled_from(["DATE_TIME", "B-PER"])


@fast(300)
@given(st.lists(st.tuples(SPAN, TYPE), max_size=6))
def test_lines_round_trip(entities: list[tuple[str, str]]) -> None:
    # spans that *all* start like list markers ("12. ", "3) ") read as a numbered list, by design
    assume(not entities or not all(re.match(r"\d{1,3}[.)]\s", span.strip()) for span, _ in entities))
    text = "\n".join(f"{span}: {kind}" for span, kind in entities)
    parsed = parse_entities(text)
    check(parsed)
    assert parsed.entities == [(normalize_span(s), k) for s, k in entities]
    assert not parsed.failed


@fast(300)
@given(st.lists(st.tuples(SPAN, TYPE), max_size=6), st.booleans())
def test_json_round_trip(entities: list[tuple[str, str]], as_objects: bool) -> None:
    items = [{"text": s, "type": k} if as_objects else [s, k] for s, k in entities]
    parsed = parse_entities(json.dumps(items, ensure_ascii=False))
    check(parsed)
    assert parsed.entities == [(normalize_span(s), k) for s, k in entities]
    assert not parsed.failed


TOKEN = st.text(alphabet=st.sampled_from(list("abcèòXY019,'")), min_size=1, max_size=6)
TAG = st.sampled_from(["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-PLANT", "I-PLANT"])


@fast(500)
@given(st.lists(st.tuples(TOKEN, TAG), min_size=1, max_size=12))
def test_tag_list_matches_the_training_converter(pairs: list[tuple[str, str]]) -> None:
    """``ginseng:B-PLANT`` lists parse to the same entities as the training converter writes."""
    tokens, tags = [t for t, _ in pairs], [g for _, g in pairs]
    tagged = parse_entities(" ".join(f"{t}:{g}" for t, g in pairs))
    check(tagged)
    assert tagged.format == "tags" and not tagged.failed
    expected = parse_entities(tags_to_entities(tokens, tags)).entities
    assert tagged.entities == expected


@pytest.mark.parametrize("answer", [
    "```" + " \n" * 20000 + "x",                       # an unclosed fence, then whitespace lines
    "```json\n" + "Mario Rossi: PER\n" + "\n \t\n" * 20000 + ".",
    "```" + "\n" * 40000 + "`",
])
def test_unclosed_fence_parses_in_linear_time(answer: str) -> None:
    """The old fence regex took cubic time here (26 s at a few thousand lines, x8 per doubling)."""
    import time

    start = time.perf_counter()
    parsed = parse_entities(answer)
    assert time.perf_counter() - start < 0.1
    check(parsed)


def test_closed_fences_still_unwrap() -> None:
    assert parse_entities('```json\n[{"text": "Mario", "type": "PER"}]\n```').entities == [("mario", "PER")]
    assert parse_entities("```\nRoma: LOC\n```").entities == [("roma", "LOC")]
    assert parse_entities("``````").format == "empty"
