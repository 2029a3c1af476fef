"""The suite at the anchor's size (issue 33): every method on the same records, judged by free generation.

    python benchmarks/suite.py                      # SmolLM2; all 3,000 of zsre_eval_3k.json and the first
                                                    # 3,000 of counterfact_edit.json; every method
    python benchmarks/suite.py --methods lemoe,locft --files zsre_eval_3k.json --n 300   # a smaller cut

One `moecli` run per file and method, each its own process (`--threads 1`), in `--work` (default
`runs/suite-<n>/<file>-<method>/`): the bypass methods and the other baselines lifelong in batches of
`--batch-size` (10), LocFT-BF as its paper runs it (`batch-edit`, every edit in one batch, its breadth-first
epochs over them), all with `--same-subject 3` and free generation. It outlives a session: a cell with a
`report.json` is done and only read; a cell with an adapter and no report is finished with `moecli lifelong
--resume` (its edits go on from the last saved batch; the unedited model's answers are cached by model and
records, so they are computed once per file, not per method); run the same command again to go on.
The table (`--out`, default `benchmarks/results/suite-<n>.json` and `.md`) is rewritten after every cell,
with the cells not yet run listed as such: nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, meta, meta_lines  # noqa: E402

from moecli.fsutil import atomic_write_json, atomic_write_text  # noqa: E402

METHODS = ("lemoe", "memoe", "scen", "locft", "ft", "lora", "grace", "wise")
ONE_BATCH = ("locft",)  # as their papers run them: every edit in one batch
COLUMNS = ("rel_free_exact", "gen_free_exact", "rel_free_clause", "gen_free_clause", "rel", "gen")


def cell_command(method: str, data: Path, n: int, batch_size: int, out: Path, model: str) -> list[str]:
    """The moecli command line of one cell (a fresh run; `--resume out` finishes an interrupted one)."""
    if (out / "run.json").is_file():
        return ["--threads", "1", "lifelong", "--resume", str(out), "--quiet"]
    command, size = ("batch-edit", n) if method in ONE_BATCH else ("lifelong", batch_size)
    model_args = ["--model", model] if model else []  # "": moecli's default model (the fact world)
    return ["--threads", "1", command, *model_args, "--data", str(data), "--limit", str(n), "--method", method,
            "--batch-size", str(size), "--same-subject", "3", "--out", str(out), "--quiet"]


def row_of(report: dict) -> dict:
    """The table's figures of one finished cell."""
    s = report["summary"]
    loc, loc_free = s.get("loc_by_group") or {}, s.get("loc_free_by_group") or {}
    timings = report.get("timings", {})
    row = {k: s.get(k) for k in COLUMNS}
    row.update({"loc_min": min(loc.values()) if loc else None, "loc_by_group": loc,
                "loc_free_min": min(loc_free.values()) if loc_free else None, "loc_free_by_group": loc_free,
                "n_edits": s.get("n_edits"), "edit_s_per_edit": timings.get("edit", 0) / max(s.get("n_edits") or 1, 1),
                "timings": timings})
    free = [row["rel_free_exact"], row["gen_free_exact"], row["loc_free_min"]]
    row["free_mean"] = sum(free) / 3 if None not in free else None  # Rel, Gen and the lower Loc group
    return row


def write_table(rows: list[dict], out: Path, args) -> None:
    lines = [f"# The suite at {args.n} edits: every method, free generation (issue 33)", "",
             *meta_lines(meta(False)), "",
             "Free generation: greedy, up to 32 new tokens, stop at end of sequence; exact = the whole answer is the "
             "target, clause = the answer up to a clause break is (`moecli/engine/evaluation.py`). Loc per group, "
             "teacher-forced (free). `mean` = free exact Rel, Gen and the lower free Loc group.", "",
             "| file | method | edits | Rel free exact | Gen free exact | Rel / Gen clause | Rel / Gen teacher-forced "
             "| Loc by group (free) | mean | edit s/edit |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f(v) -> str:
        return "–" if v is None else f"{v:.3f}"

    for r in rows:
        if r.get("status") != "done":
            lines.append(f"| {r['file']} | {r['method']} | {r.get('status')} | | | | | | | |")
            continue
        groups = ", ".join(f"{g} {f(v)} ({f(r['loc_free_by_group'].get(g))})" for g, v in r["loc_by_group"].items())
        lines.append(f"| {r['file']} | {r['method']} | {r['n_edits']} | {f(r['rel_free_exact'])} | "
                     f"{f(r['gen_free_exact'])} | {f(r['rel_free_clause'])} / {f(r['gen_free_clause'])} | "
                     f"{f(r['rel'])} / {f(r['gen'])} | {groups} | {f(r['free_mean'])} | {r['edit_s_per_edit']:.2f} |")
    atomic_write_json(out.with_suffix(".json"), {"meta": meta(False), "n": args.n, "rows": rows})
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help='"": the fact world (a smoke test)')
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--files", default="zsre_eval_3k.json,counterfact_edit.json")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.work or REPO / "runs" / f"suite-{args.n}"
    out = args.out or REPO / "benchmarks" / "results" / f"suite-{args.n}"
    cells = [(name, method) for name in args.files.split(",") for method in args.methods.split(",")]
    rows = [{"file": name, "method": method, "status": "not run yet"} for name, method in cells]
    for i, (name, method) in enumerate(cells):
        cell = work / f"{Path(name).stem}-{method}"
        report = cell / "report.json"
        if not report.is_file():
            command = cell_command(method, args.data_dir / name, args.n, args.batch_size, cell, args.model)
            print(f"[suite] {name} {method}: moecli {' '.join(command)}", flush=True)
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "moecli.cli.app", *command], env=os.environ.copy())
            rows[i]["wall_s"] = round(time.perf_counter() - t0, 1)
            if done.returncode != 0 or not report.is_file():
                rows[i]["status"] = f"stopped (exit {done.returncode}); run again to resume"
                write_table(rows, out, args)
                continue
        rows[i] = {**rows[i], "status": "done", **row_of(json.loads(report.read_text(encoding="utf-8")))}
        write_table(rows, out, args)
    return rows


if __name__ == "__main__":
    main()
