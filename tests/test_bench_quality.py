"""The quality benchmark's own choices: which cells a `--protocols` spec runs, and issue 16's Avg, which
takes the *lowest* Loc group so a same-subject locality failure cannot hide behind the other-subject
prompts that entity routing passes by construction."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from common import avg_min_loc  # noqa: E402
from quality import Protocol, parse_protocols  # noqa: E402


def test_protocols_spec_picks_the_cells():
    got = parse_protocols("lifelong:100:10, batch:1000,lifelong:100:1")
    assert got == [Protocol("lifelong", 100, 10), Protocol("batch", 1000), Protocol("lifelong", 100, 1)]
    assert [p.key for p in got] == ["lifelong-b10", "batch", "lifelong-b1"]


@pytest.mark.parametrize("spec", ["lifelong:100", "batch:0", "batch:x", "serial:10", "", "batch:10:2"])
def test_protocols_spec_refuses_what_it_cannot_run(spec):
    with pytest.raises(SystemExit, match="--protocols"):
        parse_protocols(spec)


def test_avg_takes_the_lowest_locality_group():
    summary = {"rel": 1.0, "gen": 0.8, "loc": 0.95, "loc_by_group": {"neighborhood": 1.0, "same_subject": 0.6}}
    assert avg_min_loc(summary) == pytest.approx((1.0 + 0.8 + 0.6) / 3)
    assert avg_min_loc({"rel": 1.0, "gen": 0.8, "loc": 0.95}) is None  # no groups: not this Avg


def test_free_answers_reads_clause_breaks_and_words_said_three_times():
    from free_answers import repeats_a_word, summarise

    assert repeats_a_word("pitcher pitcher pitcher") and repeats_a_word("India, India, India, Iran")
    assert not repeats_a_word("India, Iran, India, Iran") and not repeats_a_word("Rome")
    report = {"per_edit": [
        {"target": "Rome", "rel_free_answer": "Rome, where", "gen_free_answer": ["Rome Rome Rome", "Paris"]},
        {"target": "Oslo", "rel_free_answer": "Oslo", "gen_free_answer": ["Oslo is cold"]},
    ]}
    out = summarise(report)
    assert out["rel"] == {"answers": 2, "exact": 0.5, "clause": 1.0, "first": 1.0, "repeating_a_word_3_times": 0,
                          "examples": []}
    assert out["gen"]["clause"] == 0.0 and out["gen"]["first"] == 2 / 3
    assert out["gen"]["repeating_a_word_3_times"] == 1 and out["gen"]["examples"] == ["Rome Rome Rome"]
    assert summarise(report, first=1)["gen"]["answers"] == 2
