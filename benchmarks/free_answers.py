"""What an edited model says: the free answers a run's `report.json` keeps, read as a user reads them (issue 33).

    python benchmarks/free_answers.py runs/cf1000/report.json --first 300

For the first `--first` edits of the report (all by default), per Rel and Gen: the share of free answers that
are the target up to a clause break (`free_verdicts`' `clause`: the answer said the target and ended the
phrase), that begin with it (`first`), that are it exactly, and every answer that repeats one word three times
in a row ("pitcher pitcher pitcher", what an edit that does not stop writes), with the first few shown. The
verdicts are recomputed from the kept answer texts with today's `free_verdicts`, so a report written before
the clause verdict existed is read the same way. Prints JSON; `--out FILE` also writes it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from moecli.engine.evaluation import free_verdicts, normalize_answer
from moecli.fsutil import atomic_write_json

WORDS = re.compile(r"\w+")


def repeats_a_word(answer: str, times: int = 3) -> bool:
    """Whether some word of `answer` comes `times` times in a row (case and punctuation aside)."""
    words = WORDS.findall(normalize_answer(answer))
    return any(len(set(words[i: i + times])) == 1 for i in range(len(words) - times + 1))


def summarise(report: dict, first: int | None = None) -> dict:
    rows = report["per_edit"][:first]
    out: dict = {"report_command": report.get("command"), "model": report.get("model"), "data": report.get("data"),
                 "n_edits_in_run": report.get("n_edits"), "edits_read": len(rows)}
    for kind in ("rel", "gen"):
        pairs = []
        for row in rows:
            answers = row.get(f"{kind}_free_answer")
            if answers is None:
                continue
            for answer in [answers] if isinstance(answers, str) else answers:
                pairs.append((answer, row["target"]))
        verdicts = [free_verdicts(a, t) for a, t in pairs]
        looping = [a for a, _ in pairs if repeats_a_word(a)]
        n = max(len(pairs), 1)
        out[kind] = {"answers": len(pairs), "exact": sum(v[0] for v in verdicts) / n,
                     "clause": sum(v[1] for v in verdicts) / n, "first": sum(v[2] for v in verdicts) / n,
                     "repeating_a_word_3_times": len(looping), "examples": looping[:5]}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--first", type=int, default=None, help="only the first N edits of the report")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result = summarise(json.loads(args.report.read_text(encoding="utf-8")), args.first)
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
