"""A long lifelong stream: 10,000 CounterFact edits on SmolLM2 in batches of 10, measured every 1,000.

    python benchmarks/stream.py edit      # the stream itself (resumable: run it again to go on)
    python benchmarks/stream.py measure   # figures of the marks the stream has passed (resumable too)
    python benchmarks/stream.py saves     # checkpoint save time against stream length, whole vs incremental
    python benchmarks/stream.py speedup   # edit time of this checkout against an earlier commit, same edits
    python benchmarks/stream.py compare --other DIR   # the same edits held at every mark as stream DIR?

`edit` runs the engine's `run_edits` with `evaluate=False` (editing and a checkpoint per batch, as
`moecli lifelong` does, without evaluating 10,000 records at the end), in `runs/stream-<n>/run`
(`--work`). Every `--mark` edits it writes a mark: the stream position, the cumulative edit time the
checkpoint records, the adapter's size on disk, this process's peak RSS, and a hard-linked copy of the
checkpoint in `marks/<edits>/` (a checkpoint is never changed in place, so the links cost nothing).

`measure` reads the marks: per-edit edit time per segment and its ratio to the first segment, adapter
size, peak RSS; with the model loaded, for each mark adapter, forward time against the bare model on
prompts of which half name an edited entity and on prompts naming none, generation tokens/s; and quality
(teacher-forced and free generation, `--same-subject 3`) of the first 1,000 edits at the first mark and
at the last (again at the last with each judged by the newest target the stream gives its prompt: 15 of the
first 1,000 CounterFact prompts are edited again later, with another target), and of a sample spread over
the whole stream at the last mark. Each figure is written to
`benchmarks/results/stream/stream.json` as soon as it is measured; a figure already there is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DATA_DIR,
    REPO,
    SAME_SUBJECT_PER_EDIT,
    dir_bytes,
    meta,
    peak_rss_mb,
    portable,
    write_json,
)

OUT = REPO / "benchmarks" / "results" / "stream"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _records(args):
    from moecli.engine.prepare import read_edit_records

    return read_edit_records(DATA_DIR / args.data, limit=args.n, same_subject=SAME_SUBJECT_PER_EDIT).records


def edit(args) -> None:
    """Run (or resume) the stream, writing a mark every `args.mark` edits."""
    from moecli.engine.checkpoint import load_checkpoint
    from moecli.engine.recipes import build_config
    from moecli.engine.run import RunSpec, load_run_spec, run_edits
    from moecli.model.sources import resolve_model

    work = Path(args.work)
    run_dir = work / "run"
    resume = (run_dir / "run.json").is_file()
    if resume:
        spec = load_run_spec(run_dir)
    else:
        records = _records(args)
        spec = RunSpec(command="bench-stream", method=args.method, config=build_config(args.method, None, {}),
                       records=records, batch_size=args.batch_size, out_dir=run_dir,
                       model_path=resolve_model(args.model), seed=0, data=f"{args.data} first {args.n}",
                       protocol="lifelong", evaluate=False, evaluate_before=False, generation=False)
        run_dir.mkdir(parents=True, exist_ok=True)
    marks_file = Path(args.results) / "marks.json"
    state = _load(marks_file) or {"meta": meta(False, {"model": args.model, "data": spec.data,
                                                       "method": spec.method, "batch_size": spec.batch_size,
                                                       "work": portable(work)}), "marks": []}
    done_marks = {m["edits"] for m in state["marks"]}
    t0 = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        if stage != "batches":
            return
        edits = done * spec.batch_size
        if edits % args.mark and done != total:
            return
        if edits in done_marks:
            return
        ckpt_dir = run_dir / "adapter"
        ckpt = load_checkpoint(ckpt_dir)
        target = work / "marks" / str(edits)
        target.mkdir(parents=True, exist_ok=True)
        for f in ckpt_dir.iterdir():
            if f.is_file() and not (target / f.name).exists():
                os.link(f, target / f.name)
        state["marks"].append({
            "edits": edits, "batches": done, "edit_seconds": ckpt.manifest.get("timings", {}).get("edit"),
            "adapter_bytes": dir_bytes(ckpt_dir), "peak_rss_mb": peak_rss_mb(),
            "wall_since_start_s": time.perf_counter() - t0, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        done_marks.add(edits)
        marks_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(marks_file, state)
        print(f"mark {edits}: {state['marks'][-1]}", flush=True)

    run_edits(spec, progress, resume=resume)


def _segments(marks: list[dict], ledger: list[dict]) -> list[dict]:
    """Per-edit edit time of each segment between marks (from the checkpoints' cumulative edit time), its
    ratio to the first segment's, optimiser steps per edit (the part of the cost no other job's load
    changes, from the ledger), adapter size and peak RSS at the segment's end."""
    steps_of = {e["batch"]: e.get("train_steps", 0) for e in ledger}
    size_of: dict[int, int] = {}
    for e in ledger:
        size_of[e["batch"]] = size_of.get(e["batch"], 0) + 1
    rows, prev = [], {"edits": 0, "edit_seconds": 0.0, "batches": 0}
    for m in sorted(marks, key=lambda m: m["edits"]):
        n = m["edits"] - prev["edits"]
        per_edit = (m["edit_seconds"] - prev["edit_seconds"]) / n if n else None
        batches = range(prev.get("batches", 0), m["batches"])
        steps = sum(steps_of.get(b, 0) for b in batches) / max(1, sum(size_of.get(b, 0) for b in batches))
        rows.append({"edits": m["edits"], "s_per_edit": per_edit, "steps_per_edit": steps,
                     "adapter_mb": m["adapter_bytes"] / 2**20, "peak_rss_mb": m["peak_rss_mb"]})
        prev = m
    first = rows[0]["s_per_edit"] if rows else None
    for r in rows:
        r["vs_first"] = r["s_per_edit"] / first if first and r["s_per_edit"] else None
    return rows




def _overhead(loaded, adapter: Path, edited: list[str], other: list[str], rounds: int = 7) -> dict:
    """Forward time with the adapter over the bare model's, on prompts half of which name an edited entity
    and on prompts naming none; generation tokens/s with the adapter over without (16 new tokens each).

    Bare and adapted runs alternate, `rounds` times (the adapter injected and removed each round, which side
    goes first alternating too), and each figure is the median of the rounds' ratios: a job elsewhere on the
    machine that speeds up or slows down during the measurement weighs on both sides of a ratio alike,
    instead of on one side of a best-of-n."""
    import statistics

    import torch

    from moecli.engine.adapters import load_edited
    from moecli.routing import sentence

    tok, model = loaded.tokenizer, loaded.model
    half = edited[: len(edited) // 2] + other[: len(other) // 2]

    def forward(prompts: list[str]) -> None:
        sentence._memo.clear()  # new prompts, as a deployed model meets them: no MiniLM embedding is reused
        with torch.no_grad():
            for i in range(0, len(prompts), 10):
                enc = tok(prompts[i : i + 10], return_tensors="pt", padding=True)
                model(**enc)

    def generate() -> None:
        sentence._memo.clear()
        with torch.no_grad():
            enc = tok(half[:10], return_tensors="pt", padding=True, padding_side="left")
            model.generate(**enc, max_new_tokens=16, min_new_tokens=16, do_sample=False)

    def clock(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def times() -> dict:
        return {"half": clock(lambda: forward(half)), "none": clock(lambda: forward(other)), "gen": clock(generate)}

    times()  # warm-up: first calls allocate
    ratios: dict[str, list[float]] = {"half": [], "none": [], "gen": []}
    routed = 0
    for n in range(rounds):
        bare = times() if n % 2 == 0 else None
        method = load_edited(loaded, adapter)
        try:
            routed = sum(r is not None for r in method.routes(other))
            ours = times()
        finally:
            method.remove()
        bare = bare or times()
        for k in ratios:
            ratios[k].append(ours[k] / bare[k])
    return {"forward_half_ratio": statistics.median(ratios["half"]),
            "forward_none_ratio": statistics.median(ratios["none"]),
            "generate_tokens_per_s_ratio": 1 / statistics.median(ratios["gen"]),
            "none_prompts_routed": routed, "prompts": len(half), "rounds": rounds,
            "ratios": {k: [round(r, 4) for r in v] for k, v in ratios.items()}}


def _naming_no_edit(prompts: list[str], subjects: set[str]) -> list[str]:
    """The prompts that name none of `subjects` (no run of whole words is one): train prompts about other
    subjects can still mention an edited one ("... in France"), and those are prompts an edit may reach."""
    def named(prompt: str) -> bool:
        words = prompt.replace(",", " ").replace("'s ", " ").split()
        return any(" ".join(words[i:j]) in subjects for i in range(len(words))
                   for j in range(i + 1, min(i + 9, len(words)) + 1))

    return [p for p in prompts if not named(p)]


def _newest_targets(records: list, stream: list) -> tuple[list, int]:
    """`records` each judged by the newest target `stream` gives its prompt (a fact corrected twice must answer
    the second correction), and how many targets that changed."""
    from dataclasses import replace

    newest = {r.prompt: r.target for r in stream}  # a later record overwrites an earlier one
    out = [replace(r, target=newest[r.prompt]) if newest.get(r.prompt, r.target) != r.target else r for r in records]
    return out, sum(a is not b for a, b in zip(out, records))


def measure(args) -> None:
    """Figures of every mark the stream has passed; each is written as soon as it is measured."""
    from moecli.data.readers import read_records
    from moecli.engine.evaluate import evaluate_model
    from moecli.model.loading import load_model
    from moecli.model.sources import resolve_model

    work = Path(args.work)
    state = _load(Path(args.results) / "marks.json")
    marks = sorted(state.get("marks", []), key=lambda m: m["edits"])
    if not marks:
        raise SystemExit(f"no marks in {args.results}: run `stream.py edit` first")
    out_file = Path(args.results) / "stream.json"
    result = _load(out_file) or {"meta": state["meta"], "overhead": {}, "quality": {}}
    from moecli.engine.checkpoint import load_checkpoint

    result["segments"] = _segments(marks, load_checkpoint(work / "marks" / str(marks[-1]["edits"])).ledger)
    write_json(out_file, result)
    model_path = resolve_model(args.model)
    records = _records(args)
    stream_ids = {r.id for r in records}
    other = _naming_no_edit([r.prompt for r in read_records(DATA_DIR / "counterfact_train.json", limit=1000).records
                             if r.id not in stream_ids], {r.subject for r in records if r.subject})[:100]
    loaded = load_model(model_path)
    only = {int(x) for x in args.overhead_marks.split(",")} if args.overhead_marks else None
    for m in marks:
        key = str(m["edits"])
        if key not in result["overhead"] and (only is None or m["edits"] in only):
            edited = [r.prompt for r in records[: m["edits"]]][-100:]
            result["overhead"][key] = _overhead(loaded, work / "marks" / key, edited, other, args.rounds)
            write_json(out_file, result)
            print(f"overhead at {key}: {result['overhead'][key]}", flush=True)
    if args.no_quality:
        return
    first, last = marks[0]["edits"], marks[-1]["edits"]
    step = max(1, last // args.sample)
    newest, superseded = _newest_targets(records[:first], records[:last])
    jobs = {f"first{first}@{first}": (records[:first], first), f"first{first}@{last}": (records[:first], last),
            f"spread{args.sample}@{last}": (records[:last:step][: args.sample], last),
            f"first{first}@{last} newest": (newest, last)}
    for key, (part, at) in jobs.items():
        if key in result["quality"]:
            continue
        if key.endswith(" newest") and not superseded:
            continue  # no prompt of the first edits was edited again: the figure is the one above
        report = evaluate_model(model_path, part, data=f"{args.data} ({key})", data_format="counterfact",
                                adapter=work / "marks" / str(at), generation=True)
        s = report["summary"]
        result["quality"][key] = {k: s.get(k) for k in ("rel", "gen", "loc", "rel_free_exact", "gen_free_exact",
                                                        "loc_by_group", "loc_free", "routing")}
        result["quality"][key]["seconds"] = report["timings"]["total"]
        if key.endswith(" newest"):
            result["quality"][key]["targets_superseded"] = superseded
        write_json(out_file, result)
        print(f"quality {key}: {result['quality'][key]}", flush=True)


def _stream_state(edits: int, d_ff: int = 1536, d_model: int = 576, rank: int = 16, d_code: int = 128):
    """Tensors and files shaped as a SmolLM2 LEMoE checkpoint after `edits` edits in batches of 10 (the
    shapes and per-edit file sizes of the stream's 4,000-edit mark; the anchor keys a table since 54647c6, where
    they were a FAISS file rewritten whole), and a function adding one batch."""
    import torch

    g = torch.Generator().manual_seed(0)
    experts = {}
    for b in range(edits // 10):
        experts[f"experts.{b}.A"] = torch.randn(d_ff, rank, generator=g)
        experts[f"experts.{b}.B"] = torch.randn(rank, d_model, generator=g)
    table = {"raw_queries": torch.randn(edits, d_ff, generator=g), "queries": torch.randn(edits, d_code, generator=g),
             "thresholds": torch.rand(edits, generator=g), "prompt_hashes": torch.zeros(edits, 2, dtype=torch.long),
             "anchors": torch.randn(edits, d_model, generator=g), "anchor_values": torch.zeros(edits, dtype=torch.long)}
    question = torch.randn(d_code, 2 * d_model + d_ff, generator=g)
    per_edit_file_bytes = {"anchors.json": 163}

    def add_batch() -> tuple[dict, dict]:
        b = len(experts) // 2
        experts[f"experts.{b}.A"] = torch.randn(d_ff, rank, generator=g)
        experts[f"experts.{b}.B"] = torch.randn(rank, d_model, generator=g)
        for k, t in table.items():  # the key matcher grows by torch.cat, and state() hands out the live tables
            table[k] = torch.cat([t, torch.zeros(10, *t.shape[1:], dtype=t.dtype)])
        n = len(table["queries"])
        tensors = {**experts, **{f"matcher.{k}": t for k, t in table.items()}, "question.weight": question}
        return tensors, {name: os.urandom(size * n) for name, size in per_edit_file_bytes.items()}

    return add_batch


def saves(args) -> None:
    """Seconds per checkpoint save at several stream lengths: every file written whole (the behaviour before
    incremental writes, forced here by forgetting the previous layout) against incremental, in one run."""
    import shutil
    import tempfile

    from moecli.engine import shards
    from moecli.engine.checkpoint import Checkpoint, save_checkpoint

    rows = []
    for edits in (1000, 4000, 10000):
        add_batch = _stream_state(edits)
        row = {"edits": edits}
        for mode in ("whole", "incremental"):
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                path = Path(tmp) / "adapter"
                ledger = [{"id": str(i), "prompt": "x" * 60, "target": "y" * 8, "batch": i // 10} for i in range(edits)]
                tensors, files = add_batch()
                save_checkpoint(path, Checkpoint({"method": "lemoe"}, tensors, {}, ledger, files))  # not timed
                times = []
                for _ in range(args.reps):
                    tensors, files = add_batch()
                    if mode == "whole":
                        shards.forget(path)
                    t = time.perf_counter()
                    save_checkpoint(path, Checkpoint({"method": "lemoe"}, tensors, {}, ledger, files))
                    times.append(time.perf_counter() - t)
                row[f"{mode}_s"] = sorted(times)[len(times) // 2]
                row["adapter_mb"] = dir_bytes(path) / 2**20
                shutil.rmtree(path)
        row["ratio"] = row["whole_s"] / row["incremental_s"]
        rows.append(row)
        print(row, flush=True)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.results) / "saves.json", {"meta": meta(False, {"what": "checkpoint save, median of "
                                                                         f"{args.reps}, SmolLM2 LEMoE shapes"}),
                                                   "rows": rows})


def _edits_held(ckpt) -> dict:
    """What a stream checkpoint holds, format aside: its tensors, the anchor keys and their experts (tensors now,
    a serialised FAISS index in checkpoints written before 54647c6), the trie and the ledger without timings."""
    from moecli.routing.anchors import AnchorStore

    tensors = {k: t for k, t in ckpt.tensors.items() if k not in ("matcher.anchors", "matcher.anchor_values")}
    store = AnchorStore.from_checkpoint(ckpt.tensors, ckpt.files, "matcher.")
    tensors["anchor keys"], tensors["anchor experts"] = store.keys, store.values
    ledger = [{k: v for k, v in e.items() if k != "train_seconds"} for e in ckpt.ledger]
    return {"tensors": tensors, "trie": json.loads(ckpt.files["anchors.json"]), "ledger": ledger}


def compare(args) -> None:
    """Whether two streams' checkpoints hold the same edits at every mark both have (every tensor bit for bit,
    the anchor store, the trie, the ledger but for its timings): when they do, a change that was meant to
    change how a checkpoint is kept, not what it holds, did only that, and the quality measured on one stream
    stands for the other."""
    import torch

    from moecli.engine.checkpoint import load_checkpoint

    rows = []
    ours, theirs = Path(args.work) / "marks", Path(args.other) / "marks"
    for mark in sorted(int(d.name) for d in ours.iterdir() if (theirs / d.name).is_dir()):
        a = _edits_held(load_checkpoint(ours / str(mark)))
        b = _edits_held(load_checkpoint(theirs / str(mark)))
        differ = sorted(set(a["tensors"]) ^ set(b["tensors"])) + [
            k for k in a["tensors"] if k in b["tensors"] and not torch.equal(a["tensors"][k], b["tensors"][k])]
        rows.append({"edits": mark, "tensors": len(a["tensors"]), "tensors_differing": differ[:10],
                     "trie_same": a["trie"] == b["trie"], "ledger_same": a["ledger"] == b["ledger"]})
        print(rows[-1], flush=True)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.results) / "compare.json", {"meta": meta(False, {"work": portable(args.work),
                                                                          "other": portable(args.other)}),
                                                     "marks": rows})


_EDIT_ONLY = """
import json, sys, time
from pathlib import Path
root, data, n, out, evaluate = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5] == "1"
sys.path.insert(0, root)
import torch
torch.set_num_threads(1)
from moecli.engine.checkpoint import load_checkpoint
from moecli.engine.prepare import read_edit_records
from moecli.engine.recipes import build_config
from moecli.engine.run import RunSpec, run_edits
from moecli.model.sources import resolve_model
records = read_edit_records(Path(data), limit=n, same_subject=3).records
spec = RunSpec(command="speedup", method="lemoe", config=build_config("lemoe", None, {}), records=records,
               batch_size=10, out_dir=out, model_path=resolve_model("smollm2"), seed=0, data=data,
               protocol="lifelong", evaluate=False, evaluate_before=False, generation=False)
out.mkdir(parents=True)
run_edits(spec, None, resume=False)
ckpt = load_checkpoint(out / "adapter")
batches = {e["batch"]: e for e in ckpt.ledger}.values()
row = {"edit_s": ckpt.manifest["timings"]["edit"], "lr": ckpt.config.get("lr"),
       "steps": sum(e["train_steps"] for e in batches), "train_s": sum(e["train_seconds"] for e in batches)}
if evaluate:  # once to fill the unedited-model cache, then timed: the second run on the same data
    from moecli.engine.evaluate import evaluate_model
    def ev():
        return evaluate_model(spec.model_path, records, data=data, data_format="counterfact", adapter=out)
    t = time.perf_counter()
    ev()
    row["eval_cold_s"] = time.perf_counter() - t
    t = time.perf_counter()
    report = ev()
    row["eval_warm_s"] = time.perf_counter() - t
    row["summary"] = report["summary"]
print(json.dumps(row))
"""


def speedup(args) -> None:
    """LEMoE's defaults, b = 10, the same edits, by this checkout and by `--before` (a git worktree), both
    processes at once with one thread each, so that whatever else loads the machine weighs on both alike (and
    the arm that ends first runs again, unmeasured, while the other finishes).
    This checkout then evaluates its adapter (`--same-subject 3`, free generation) twice, unless `--no-eval`:
    the first run fills the unedited model's cache, the second is the one a user repeats."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="moecli-speedup-", dir=args.tmp) as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.before], check=True,
                       capture_output=True)
        def start(root: Path, out: str, evaluate: bool) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-c", _EDIT_ONLY, str(root), str(DATA_DIR / args.data),
                                     str(args.speedup_n), str(Path(tmp) / out), str(int(evaluate))],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        ballast: subprocess.Popen | None = None
        try:
            arms = {"this checkout": REPO, f"before ({args.before})": tree}
            procs = {label: start(root, f"run-{n}", n == 0 and not args.no_eval)
                     for n, (label, root) in enumerate(arms.items())}
            while all(p.poll() is None for p in procs.values()):
                time.sleep(2)
            # The arm that ends first is started again, unmeasured, until the other ends: the slower arm then runs
            # beside the same load to its end, not alone on a machine the faster arm has left to it.
            first = next(label for label, p in procs.items() if p.poll() is not None)
            if any(p.poll() is None for p in procs.values()):
                ballast = start(arms[first], "ballast", False)
            rows = {}
            for label, proc in procs.items():
                out, err = proc.communicate()
                if proc.returncode != 0:
                    raise SystemExit(f"{label}: failed: {err.strip().splitlines()[-1:]}")
                rows[label] = json.loads(out.strip().splitlines()[-1])
        finally:
            if ballast is not None:
                ballast.kill()
                ballast.communicate()
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    now, old = rows["this checkout"], rows[f"before ({args.before})"]
    for r in rows.values():
        r["s_per_edit"] = r["edit_s"] / args.speedup_n
    if "eval_warm_s" in now:
        now["eval_over_edit"] = now["eval_warm_s"] / now["edit_s"]
    result = {"meta": meta(False, {"model": args.model, "data": f"{args.data} first {args.speedup_n}",
                                   "method": "lemoe (each code's defaults)", "batch_size": 10,
                                   "before": args.before}),
              "rows": rows, "speedup": old["edit_s"] / now["edit_s"]}
    Path(args.results).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.results) / "speedup.json", result)
    print(json.dumps(result["rows"]), f"speedup {result['speedup']:.2f}x", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["edit", "measure", "saves", "speedup", "compare"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="counterfact_edit.json")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--mark", type=int, default=1000)
    parser.add_argument("--method", default="lemoe")
    parser.add_argument("--work", default=str(REPO / "runs" / "stream-10000"))
    parser.add_argument("--results", default=str(OUT))
    parser.add_argument("--other", help="compare: the other stream's work dir (its `marks/`)")
    parser.add_argument("--sample", type=int, default=1000, help="measure: records of the spread sample")
    parser.add_argument("--no-quality", action="store_true", help="measure: segments and overhead only")
    parser.add_argument("--rounds", type=int, default=7, help="measure: bare/adapted rounds of the overhead")
    parser.add_argument("--overhead-marks", default="", help="measure: the marks whose overhead to measure, e.g. "
                                                             "10000 (default: every mark)")
    parser.add_argument("--reps", type=int, default=7, help="saves: saves timed per stream length and mode")
    parser.add_argument("--tmp", default=None, help="saves: where to write (default: the system's temp dir)")
    parser.add_argument("--before", default="a086a07", help="speedup: the earlier commit (default: the code the "
                                                             "10K-stream issue was measured against)")
    parser.add_argument("--speedup-n", type=int, default=1000, help="speedup: edits")
    parser.add_argument("--no-eval", action="store_true", help="speedup: editing only (measure times the "
                                                                 "evaluations of the stream's first 1,000 edits)")
    args = parser.parse_args(argv)
    {"edit": edit, "measure": measure, "saves": saves, "speedup": speedup, "compare": compare}[args.phase](args)


if __name__ == "__main__":
    main()
