"""sacreBLEU / chrF scores and the tokenised compound-split BLEU of the MoA paper."""

from __future__ import annotations

import pytest

from moa_train.metrics.bleu import compound_split, corpus_scores, tokenized_bleu

REFS = [
    "Die Nord-Süd-Verbindung wurde im Jahr 2014 eröffnet.",
    "Der Bundesrat hat das Gesetz am Freitag gebilligt.",
    "Ein E-Mail-Postfach kostet nichts, sagte die Sprecherin.",
    "Die Mitte-Links-Regierung verlor die Wahl deutlich.",
]


def test_references_score_100_against_themselves():
    scores = corpus_scores(REFS, REFS)
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    assert tokenized_bleu(REFS, REFS) == pytest.approx(100.0)


def test_empty_and_wrong_hypotheses_score_low():
    empty = corpus_scores([""] * len(REFS), REFS)
    assert empty["bleu"] == 0.0 and empty["chrf"] == 0.0
    assert corpus_scores([""] + REFS[1:], REFS)["bleu"] < 90.0
    wrong = corpus_scores(["xyz qvq"] * len(REFS), REFS)
    assert wrong["bleu"] < 1.0 and wrong["chrf"] < 10.0


def test_compound_split_rewrites_every_intra_word_hyphen():
    assert compound_split("Nord-Süd") == "Nord ##AT##-##AT## Süd"
    assert compound_split("die Nord-Süd-Achse") == "die Nord ##AT##-##AT## Süd ##AT##-##AT## Achse"
    assert compound_split("2014 - 15 , ja") == "2014 - 15 , ja"


def test_tokenized_bleu_tokenises_before_scoring():
    assert tokenized_bleu(["Hallo, Welt."], ["Hallo , Welt ."]) == pytest.approx(100.0)


def test_compound_splitting_credits_matching_parts():
    # a compound written half apart ("Nord-Süd Verbindung") is two unigram misses for 13a, none
    # after the split
    hyps = [
        "Die Nord-Süd Verbindung wurde im Jahr 2014 eröffnet.",
        "Der Bundesrat hat das Gesetz am Freitag gebilligt.",
        "Ein E-Mail Postfach kostet nichts, sagte die Sprecherin.",
        "Die Mitte-Links Regierung verlor die Wahl deutlich.",
    ]
    assert tokenized_bleu(hyps, REFS) > corpus_scores(hyps, REFS)["bleu"]


def test_signatures_name_the_settings():
    scores = corpus_scores(REFS, REFS)
    assert "tok:13a" in scores["bleu_signature"]
    # chrF has no tokeniser (character n-grams with whitespace removed): its signature names the
    # n-gram orders
    assert "nc:6" in scores["chrf_signature"] and "nw:0" in scores["chrf_signature"]


def test_unpaired_lists_are_refused():
    with pytest.raises(ValueError, match="2 hypotheses but 4 references"):
        corpus_scores(REFS[:2], REFS)
    with pytest.raises(ValueError, match="2 hypotheses but 4 references"):
        tokenized_bleu(REFS[:2], REFS)
