"""Metric functions against hand computations and their reference libraries (rouge-score, sacrebleu)."""

from __future__ import annotations

import math
import unicodedata

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from finetune.evaluate.metrics import (
    UnicodeWordTokenizer,
    bleu,
    entity_scores,
    in_text,
    normalize_span,
    parse_entities,
    perplexity,
    rouge,
)

# ---------------------------------------------------------------------------------------------------
# ROUGE


def test_rouge_worked_example() -> None:
    # ref  the cat is on the mat   (6 words; bigrams: the-cat cat-is is-on on-the the-mat)
    # cand the cat and the dog     (5 words; bigrams: the-cat cat-and and-the the-dog)
    # ROUGE-1 overlap: the x2, cat -> 3; ROUGE-2 overlap: the-cat -> 1; LCS: the cat the -> 3.
    r = rouge(["The cat and the dog."], ["The cat is on the mat."])
    assert round(r["rouge1"]["precision"], 3) == 0.6 and round(r["rouge1"]["recall"], 3) == 0.5
    assert round(r["rouge1"]["f1"], 3) == 0.545
    assert round(r["rouge2"]["precision"], 3) == 0.25 and round(r["rouge2"]["recall"], 3) == 0.2
    assert round(r["rouge2"]["f1"], 3) == 0.222
    assert round(r["rougeL"]["precision"], 3) == 0.6 and round(r["rougeL"]["recall"], 3) == 0.5
    assert round(r["rougeL"]["f1"], 3) == 0.545


def test_rouge_keeps_italian_accents() -> None:
    ref = "La città è bella perché è antica."
    cand = "La città è antica."
    # Hand: ref words la città è bella perché è antica (7), cand la città è antica (4).
    # ROUGE-1: la, città, è (once: cand has one), antica -> 4 -> P 4/4, R 4/7, F 8/11.
    # ROUGE-2: cand bigrams la-città città-è è-antica all in ref (6 bigrams) -> P 1, R 3/6, F 2/3.
    # ROUGE-L: LCS la città è antica = 4 -> P 1, R 4/7.
    r = rouge([cand], [ref])
    assert r["rouge1"] == pytest.approx({"precision": 1.0, "recall": 4 / 7, "f1": 8 / 11})
    assert r["rouge2"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3})
    assert r["rougeL"] == pytest.approx({"precision": 1.0, "recall": 4 / 7, "f1": 8 / 11})
    # rouge-score's default tokenizer drops "è" and cuts "città" -> "citt": a different (wrong) score.
    default = rouge_scorer.RougeScorer(["rouge1"]).score(ref, cand)["rouge1"]
    assert (default.precision, default.recall) == pytest.approx((1.0, 3 / 5))
    # ... and it calls two different words equal: "perché" and "perchè" both become "perch".
    assert rouge_scorer.RougeScorer(["rouge1"]).score("perché", "perchè")["rouge1"].fmeasure == 1.0
    assert rouge(["perchè"], ["perché"])["rouge1"]["f1"] == 0.0


def test_unicode_tokenizer() -> None:
    tok = UnicodeWordTokenizer()
    decomposed = unicodedata.normalize("NFD", "Città di Cantù, l'è")
    assert decomposed != "Città di Cantù, l'è"
    assert tok.tokenize(decomposed) == ["città", "di", "cantù", "l", "è"]
    assert tok.tokenize("Mario_Rossi: PER 42") == ["mario", "rossi", "per", "42"]
    # On ASCII text it tokenises like rouge-score's default (lower-case [a-z0-9] runs).
    from rouge_score import tokenizers
    text = "The cat's 2 mats -- on_the (mat)!"
    assert tok.tokenize(text) == tokenizers.DefaultTokenizer().tokenize(text)


def test_rouge_averages_pairs_like_rouge_score() -> None:
    preds = ["Mario Rossi: PER\nRoma: LOC", "Acme: ORG", "la città"]
    refs = ["Mario Rossi: PER", "Acme S.p.A.: ORG\nMilano: LOC", "la città di Roma"]
    got = rouge(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=UnicodeWordTokenizer())
    for kind in ("rouge1", "rouge2", "rougeL"):
        each = [scorer.score(r, p)[kind] for p, r in zip(preds, refs)]
        assert got[kind]["precision"] == pytest.approx(sum(s.precision for s in each) / 3)
        assert got[kind]["recall"] == pytest.approx(sum(s.recall for s in each) / 3)
        assert got[kind]["f1"] == pytest.approx(sum(s.fmeasure for s in each) / 3)


def test_rouge_empty_pairs() -> None:
    # Both empty (no entities predicted, none expected) is a perfect answer; one side empty scores 0.
    r = rouge(["", "Roma: LOC", ""], ["", "", "Roma: LOC"])
    assert r["rouge1"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})
    with pytest.raises(ValueError):
        rouge(["a"], [])


# ---------------------------------------------------------------------------------------------------
# BLEU

REFS = ["The cat is on the mat.", "There is a cat on the mat."]


def test_bleu_worked_example_equals_sacrebleu_and_hand() -> None:
    cands = ["The cat and the dog."]
    got = bleu(cands, [REFS])
    ref = sacrebleu.corpus_bleu(cands, [[REFS[0]], [REFS[1]]])
    assert got["bleu"] == pytest.approx(ref.score, abs=1e-12)
    assert got["precisions"] == pytest.approx(ref.precisions)
    assert got["bp"] == pytest.approx(ref.bp)
    # By hand (13a tokens, case-sensitive): hyp "The cat and the dog ." = 6 tokens; refs 7 and 8 tokens.
    # clipped matches 1..4-grams: [The, cat, the, .]=4/6, [The cat]=1/5, 0/4, 0/3. sacrebleu's "exp"
    # smoothing gives the k-th zero-match order 1/(2^k * total): 1/(2*4), 1/(4*3).
    # BP: the closest reference length is 7 > 6 -> exp(1 - 7/6).
    precisions = [4 / 6, 1 / 5, 1 / 8, 1 / 12]
    hand = 100 * math.exp(1 - 7 / 6) * math.exp(sum(math.log(p) for p in precisions) / 4)
    assert got["bleu"] == pytest.approx(hand, rel=1e-12)
    assert (got["sys_len"], got["ref_len"]) == (6, 7)


def test_bleu_corpus_several_candidates() -> None:
    cands = ["The cat and the dog.", "There is a cat on the mat.", "A dog is on a mat."]
    refs = [REFS, REFS, REFS]
    got = bleu(cands, refs)
    ref = sacrebleu.corpus_bleu(cands, [[r[0] for r in refs], [r[1] for r in refs]])
    assert got["bleu"] == pytest.approx(ref.score, abs=1e-12)
    # single-reference form
    single = bleu(cands, [r[0] for r in refs])
    assert single["bleu"] == pytest.approx(sacrebleu.corpus_bleu(cands, [[r[0] for r in refs]]).score)


def test_bleu_multiline_entity_lists() -> None:
    pred = ["Mario Rossi: PER\nRoma: LOC"]
    assert bleu(pred, ["Mario Rossi: PER\nRoma: LOC"])["bleu"] == pytest.approx(100.0)
    got = bleu(pred, ["Mario Rossi: PER\nMilano: LOC"])
    assert got["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(["Mario Rossi: PER Roma: LOC"], [["Mario Rossi: PER Milano: LOC"]]).score)
    with pytest.raises(ValueError):
        bleu(["a", "b"], [["x", "y"], ["z"]])


# ---------------------------------------------------------------------------------------------------
# entity scores (hand-made cases, P/R/F1 computed by hand)


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def test_duplicates_count_as_a_multiset() -> None:
    gold = ["Roma: LOC\nRoma: LOC\nMario: PER"]
    pred = ["Roma: LOC\nMario: PER\nMario: PER"]
    s = entity_scores(gold, pred)
    # gold {roma/LOC x2, mario/PER x1}; pred {roma/LOC x1, mario/PER x2}; intersection 1 + 1 = 2.
    assert (s.n_correct, s.n_gold, s.n_predicted) == (2, 3, 3)
    assert (s.precision, s.recall, s.f1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    loc, per = s.per_type["LOC"], s.per_type["PER"]
    assert (loc.precision, loc.recall, loc.f1, loc.support) == pytest.approx((1.0, 0.5, 2 / 3, 2))
    assert (per.precision, per.recall, per.f1, per.support) == pytest.approx((0.5, 1.0, 2 / 3, 1))
    assert s.macro_f1 == pytest.approx(2 / 3)
    assert s.exact_match == 0.0
    # Repeating an entity the gold names once: the copy is a false positive.
    assert entity_scores(["Roma: LOC"], ["Roma: LOC\nRoma: LOC"]).precision == 0.5


def test_type_confusion() -> None:
    s = entity_scores(["Mario Rossi: PER\nRoma: LOC"], ["Mario Rossi: ORG\nRoma: LOC"])
    # roma/LOC right, mario rossi typed ORG: 1 correct of 2 predicted, of 2 gold.
    assert (s.precision, s.recall, s.f1) == pytest.approx((0.5, 0.5, 0.5))
    assert s.per_type["PER"].support == 1 and s.per_type["PER"].f1 == 0.0
    assert s.per_type["ORG"].support == 0 and s.per_type["ORG"].predicted == 1
    assert s.per_type["LOC"].f1 == 1.0
    assert s.macro_f1 == pytest.approx((0 + 0 + 1) / 3)  # types seen in gold or predictions


def test_empty_gold_and_empty_prediction() -> None:
    both = entity_scores([""], [""])
    assert (both.precision, both.recall, both.f1, both.macro_f1, both.exact_match) == (1, 1, 1, 1, 1)
    assert both.parse_failure_rate == 0.0
    spurious = entity_scores([""], ["Roma: LOC"])  # nothing to find, one false positive
    assert (spurious.precision, spurious.recall, spurious.f1, spurious.exact_match) == (0, 0, 0, 0)
    missed = entity_scores(["Roma: LOC"], [""])    # nothing predicted, one miss
    assert (missed.precision, missed.recall, missed.f1) == (0, 0, 0)
    assert missed.parse_failure_rate == 0.0          # an empty answer is a valid "no entities"
    # In a corpus the empty/empty example adds nothing to the counts but counts as an exact match.
    s = entity_scores(["", "Roma: LOC\nMario: PER"], ["", "Roma: LOC"])
    assert (s.precision, s.recall) == pytest.approx((1.0, 0.5))
    assert s.f1 == pytest.approx(f1(1.0, 0.5))
    assert s.exact_match == 0.5


def test_garbage_output() -> None:
    s = entity_scores(["Roma: LOC", "Mario: PER"],
                      ["I think the answer is Rome", "Mario: PER\nsure, here you go"])
    # Example 1 parses to nothing (failure); example 2 keeps its readable line but is a failure too.
    assert s.parse_failure_rate == 1.0
    assert (s.n_correct, s.n_predicted, s.n_gold) == (1, 1, 2)
    assert (s.precision, s.recall) == pytest.approx((1.0, 0.5))
    assert s.exact_match == 0.0  # the right entities plus junk is not an exact answer
    # Garbage where nothing was expected: no false entity, but neither a parse nor an exact match.
    empty = entity_scores(["", ""], ["", "I don't know"])
    assert (empty.precision, empty.recall, empty.f1) == (1.0, 1.0, 1.0)
    assert (empty.exact_match, empty.parse_failure_rate) == (0.5, 0.5)


def test_whitespace_case_and_punctuation_normalisation() -> None:
    gold = ["Mario  Rossi: PER\nAcme S.p.A.: ORG\nCittà di Castello: LOC"]
    city = unicodedata.normalize("NFD", "città  di\tcastello.")
    pred = ["  mario rossi : per \n«ACME S.P.A.»: Org\n" + city + ": loc"]
    s = entity_scores(gold, pred)
    assert (s.precision, s.recall, s.f1, s.exact_match) == (1.0, 1.0, 1.0, 1.0)
    assert normalize_span("  «Acme S.p.A.» ") == "acme s.p.a"
    assert normalize_span("Straße") == normalize_span("STRASSE")


def test_mixed_corpus_by_hand() -> None:
    gold = ["Mario Rossi: PER\nRoma: LOC", "Acme: ORG", "", "Luca: PER\nLuca: PER"]
    pred = ["Mario Rossi: PER\nRoma: ORG", "Acme: ORG\nMilano: LOC", "", "Luca: PER"]
    s = entity_scores(gold, pred)
    # correct: mario/PER, acme/ORG, luca/PER = 3; predicted 2+2+0+1 = 5; gold 2+1+0+2 = 5.
    assert (s.n_correct, s.n_predicted, s.n_gold) == (3, 5, 5)
    assert (s.precision, s.recall, s.f1) == pytest.approx((0.6, 0.6, 0.6))
    # PER: correct 2, pred 2, gold 3 -> P 1, R 2/3; LOC: 0/1 pred, 0/1 gold; ORG: 1 of 2 pred, 1 of 1 gold.
    per_f1, org_f1 = f1(1.0, 2 / 3), f1(0.5, 1.0)
    assert s.per_type["PER"].f1 == pytest.approx(per_f1)
    assert s.per_type["ORG"].f1 == pytest.approx(org_f1)
    assert s.per_type["LOC"].f1 == 0.0
    assert s.macro_f1 == pytest.approx((per_f1 + org_f1 + 0.0) / 3)
    assert s.exact_match == 0.25  # only the empty/empty example
    assert s.to_dict()["per_type"]["PER"]["support"] == 3


def test_entity_pairs_are_accepted_and_normalised() -> None:
    s = entity_scores([[("Mario Rossi", "per")]], [[(" mario  rossi.", "PER")]])
    assert s.f1 == 1.0
    with pytest.raises(ValueError):
        entity_scores(["a: B"], [])


def test_hallucinated_spans() -> None:
    inputs = ["Mario Rossi vive a Roma.", "Acme S.p.A. ha sede a Città di Castello"]
    gold = ["Mario Rossi: PER\nRoma: LOC", "Acme S.p.A.: ORG\nCittà di Castello: LOC"]
    pred = ["mario rossi: PER\nMilano: LOC\nma: PER", "«Acme S.p.A.»: ORG\nCITTÀ  DI CASTELLO: LOC"]
    s = entity_scores(gold, pred, inputs)
    # milano is not in the input; "ma" occurs only inside "roma"/"mario", not as a word -> 2 of 5.
    assert s.n_hallucinated == 2
    assert s.hallucination_rate == pytest.approx(2 / 5)
    assert in_text("acme s.p.a", "Acme S.p.A. ha sede") and not in_text("ma", "Mario a Roma")
    assert entity_scores(gold, pred).hallucination_rate == 0.0  # no inputs given: not measured


def test_parse_entities_formats() -> None:
    assert parse_entities("ginseng:B-PLANT extract:O Panax:B-PLANT ginseng:I-PLANT").entities == [
        ("ginseng", "PLANT"), ("panax ginseng", "PLANT")]
    assert parse_entities('[{"text": "Mario", "type": "per"}, ["Roma", "LOC"]]').entities == [
        ("mario", "PER"), ("roma", "LOC")]
    assert parse_entities("Ore 10:30: TIME").entities == [("ore 10:30", "TIME")]
    assert parse_entities("- Mario: PER\n2. Roma: LOC").entities == [("mario", "PER"), ("roma", "LOC")]
    assert parse_entities("3. Liga: ORG\nRoma: LOC").entities == [("3. liga", "ORG"), ("roma", "LOC")]
    assert not parse_entities("").failed and parse_entities("").entities == []
    assert parse_entities("[]").entities == [] and not parse_entities("[]").failed


def test_perplexity() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.5)) == pytest.approx(7.5)
    assert perplexity(1e6) == math.inf and math.isnan(perplexity(math.nan))
