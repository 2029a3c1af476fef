"""The commands a practitioner reaches for, on the fact world: show, ask, revert, the CI checks
(--fail-under, --junit) and records kept as Parquet, CSV or a `save_to_disk` directory."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import run_moecli

from moecli.cli.app import main
from moecli.engine.checkpoint import load_checkpoint


def run(args: list[str], capsys) -> tuple[int, str, str]:
    return run_moecli(args, capsys)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Three fact-world edits in runs/a (MEMoE, one batch)."""
    root = tmp_path_factory.mktemp("day")
    old = os.getcwd()
    os.chdir(root)
    try:
        main(["world", "export", "--n", "3", "--out", "three.jsonl"])
        try:
            main(["--threads", "1", "batch-edit", "--data", "three.jsonl", "--batch-size", "3", "--out", "runs/a",
                  "--quiet", "--no-generate"])
        except SystemExit as exc:
            assert not exc.code
        yield root
    finally:
        os.chdir(old)


def _evaluate(capsys, adapter: str, data: str, *more: str) -> tuple[int, dict, str]:
    code, out, err = run(["evaluate", "--adapter", adapter, "--data", data, "--no-generate", "--json", *more], capsys)
    return code, (json.loads(out) if out.strip() else {}), err


def _per_edit(path: Path) -> dict[str, float]:
    return {e["id"]: e["rel"] for e in json.loads(path.read_text())["per_edit"]}


def test_show_lists_the_edits(work, capsys):
    code, out, _ = run(["show", "runs/a", "--json"], capsys)
    shown = json.loads(out)
    assert code == 0 and shown["method"] == "memoe" and shown["n_edits"] == 3 and len(shown["edits"]) == 3
    first = shown["edits"][0]
    code, out, _ = run(["show", "runs/a", "--json", "--grep", first["target"].upper()], capsys)
    assert [e["id"] for e in json.loads(out)["edits"]] == [first["id"]]


def test_ask_revert_then_the_edit_is_gone_and_the_others_stay(work, capsys):
    """On a copy (runs/r) of the module's adapter: the other tests use runs/a as it was made, in any order."""
    import shutil

    shutil.rmtree(work / "runs" / "r", ignore_errors=True)
    shutil.copytree(work / "runs" / "a", work / "runs" / "r")
    first = json.loads((work / "three.jsonl").read_text().splitlines()[0])
    code, out, _ = run(["ask", "--adapter", "runs/r", first["prompt"], "--max-new-tokens", "2", "--json"], capsys)
    row = json.loads(out)[0]
    assert code == 0 and row["edited"].startswith(first["target"]) and row["base"] != row["edited"]
    assert row["route"]["id"] == first["id"]
    code, _, err = run(["revert", "runs/r", "--id", first["id"], "--out", "runs/rb"], capsys)
    assert code == 0, err
    assert len(load_checkpoint(work / "runs" / "r").ledger) == 3  # --out leaves the original alone
    assert "reverted" not in load_checkpoint(work / "runs" / "r").ledger[0]
    code, _, err = run(["revert", "runs/r", "--id", first["id"]], capsys)
    assert code == 0, err
    ledger = load_checkpoint(work / "runs" / "r").ledger
    assert ledger[0]["reverted"] and not any(e.get("reverted") for e in ledger[1:])
    code, out, _ = run(["ask", "--adapter", "runs/r", first["prompt"], "--max-new-tokens", "2", "--json"], capsys)
    row = json.loads(out)[0]
    assert row["edited"] == row["base"] and row["route"] is None  # the base model's answer again
    code, summary, _ = _evaluate(capsys, "runs/r", "three.jsonl", "--out", "ev_r")
    rel = _per_edit(work / "ev_r" / "report.json")
    assert rel[first["id"]] == 0.0 and [v for k, v in rel.items() if k != first["id"]] == [1.0, 1.0]
    code, _, _ = _evaluate(capsys, "runs/rb", "three.jsonl", "--out", "ev_rb")
    assert _per_edit(work / "ev_rb" / "report.json") == rel  # the same revert, written elsewhere
    code, _, err = run(["revert", "runs/r", "--id", first["id"]], capsys)
    assert code == 2 and "reverted already" in err


def test_fail_under_and_junit(work, capsys):
    code, summary, err = _evaluate(capsys, "runs/a", "three.jsonl", "--fail-under", "rel=1.01", "--junit",
                                   "ci.xml", "--out", "ev_ci")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("moecli: fail-under: rel ")
    assert summary["rel"] < 1.01  # the JSON summary is printed all the same
    suite = ET.parse(work / "ci.xml").getroot()
    assert suite.get("tests") == "3" and suite.get("failures") == "3" and len(suite.findall("testcase")) == 3
    code, _, err = _evaluate(capsys, "runs/a", "three.jsonl", "--fail-under", "loc=0.5", "--out", "ev_ok")
    assert code == 0 and "fail-under" not in err


def test_parquet_csv_and_save_to_disk_evaluate_like_the_jsonl(work, capsys):
    import csv

    import datasets

    records = [json.loads(line) for line in (work / "three.jsonl").read_text().splitlines()]
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(work / "three.parquet"))
    table.save_to_disk(str(work / "three_ds"))
    with open(work / "three.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(records[0]))
        writer.writeheader()
        for r in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    _, reference, _ = _evaluate(capsys, "runs/a", "three.jsonl", "--out", "ev_jsonl")
    for source in ("three.parquet", "three.csv", "three_ds"):
        code, summary, err = _evaluate(capsys, "runs/a", source, "--out", f"ev_{source}")
        assert code == 0, err
        assert summary == reference, source
