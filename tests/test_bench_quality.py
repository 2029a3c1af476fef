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
