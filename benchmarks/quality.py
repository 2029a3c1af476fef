"""Edit quality of every method: Rel / Gen / Loc / Avg (+ Known, Port, Loc per group) per dataset × protocol.

    python benchmarks/quality.py --quick     # fact world only, tiny sizes (smoke check, a few minutes)
    python benchmarks/quality.py --full      # SmolLM2 (CounterFact, ZsRE) first, then the fact world and the
                                             # ZsRE / CounterFact knowledge models (≤ budget)
    python benchmarks/quality.py --full --exact --generate --datasets counterfact_smollm2,zsre_smollm2 \
        --protocols lifelong:100:10 --out benchmarks/results/smollm2   # chosen cells at their exact sizes

Protocols: batch (all N edits at once, N = 100 and 1000) and lifelong (a stream of T =
1000 edits in batches of 10 and of 1, every edit evaluated on the final model); `--protocols` picks
others. Metrics are the teacher-forced token metrics, Loc per group (`same_subject` on real data: the
case entity routing can fail), Avg with the lowest Loc group, and the routing diagnosis of the bypass
methods; greedy-generation EM with `--generate` (off by default: decoding every answer is slow on CPU).
Lifelong runs also evaluate a fixed sample of already-edited records every few batches: the retention
curves (`retention_<dataset>.png`).

Budget (full mode). The issue's sizes do not all fit 60 minutes on 2 CPU cores: one dataset at the
full sizes (N = 100 and 1000, T = 1000 in batches of 10 and of 1) takes an hour or more here by itself
(per single edit: GRACE ~0.5 s, FT-L ~0.35 s, the others 0.1-0.3 s; 6 methods × 3100 edits). So each
dataset gets an equal share of `--budget-min`, each protocol an equal share of what is left of it
(85% of it, as a margin), and a protocol runs *every* method at one common size, so a table's rows stay
comparable: the largest size of the ladder (target, 1000, 700, 500, 300, 200, 150, 100, ... 10) whose
estimated time fits. Estimates are each method's observed seconds per edit (seeded from `SEED_COST`,
measured here). A table below its target says so in its `N/T used` column (`↓ (target …)`) and the
JSON keeps `target` beside `n`; a cell that no longer fits is listed as absent with that reason.
Lifelong runs cap every method's `max_steps` at 50 (ft keeps its 25): per edit, the bypass methods
early-stop after ~10 steps, so the cap only bounds the cost of edits that do not converge. With
`--exact` there is no budget and no cap: every method runs its defaults, as `moecli lifelong` would.
The edit step saves its checkpoint once, at the end (the engine saves after every batch; with 1000
batches that would time disk writes, not editing).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DATASETS,
    METRICS,
    REPO,
    Dataset,
    Skip,
    fmt,
    load_dataset,
    log,
    meta,
    meta_lines,
    portable,
    results_dir,
    run,
    write_results,
)

from moecli.methods import METHOD_NAMES  # noqa: E402

LADDER = (1000, 700, 500, 300, 200, 150, 100, 70, 50, 30, 20, 10)
LIFELONG_STEP_CAP = 50
# Seconds per edit used before a method has run a protocol here (measured on the 2-core dev machine
# under load, fact world, N = 20, one thread, plus 50%); replaced by the method's observed cost on
# the dataset as soon as it has one.
SEED_COST = {
    "batch": {"ft": 0.06, "lora": 0.17, "grace": 0.6, "memoe": 0.11, "lemoe": 0.18, "scen": 0.27, "locft": 0.1},
    "lifelong-b10": {"ft": 0.11, "lora": 0.15, "grace": 0.7, "memoe": 0.15, "lemoe": 0.15, "scen": 0.29,
                     "locft": 0.6},  # locft: every batch trains every edit so far
    "lifelong-b1": {"ft": 0.5, "lora": 0.2, "grace": 0.75, "memoe": 0.29, "lemoe": 0.27, "scen": 0.3, "locft": 3.0},
}
RUN_OVERHEAD_S = 1.5  # model load, baseline, evaluation of a handful of records
SAFETY = 0.85  # plan on 85% of the time left: per-edit cost grows with N in the batch protocol


@dataclass(frozen=True)
class Protocol:
    kind: str  # batch | lifelong
    n: int  # target N (batch) or T (lifelong)
    batch_size: int | None = None  # lifelong batch size; batch: = n
    methods: tuple[str, ...] = METHOD_NAMES
    note: str = ""  # why some methods are left out (quick mode)

    @property
    def key(self) -> str:
        return "batch" if self.kind == "batch" else f"lifelong-b{self.batch_size}"

    @property
    def title(self) -> str:
        if self.kind == "batch":
            return f"batch N={self.n}"
        return f"lifelong T={self.n}, batches of {self.batch_size}"


QUICK = [  # a smoke check: < 5 min together with speed.py --quick on the busy 2-core machine
    Protocol("batch", 20),
    Protocol("lifelong", 20, 10),
    Protocol("lifelong", 20, 1),
]
FULL = [  # cheapest first, so later (larger) cells inherit what earlier ones left of the budget
    Protocol("batch", 100),
    Protocol("lifelong", 1000, 10),
    Protocol("lifelong", 1000, 1),
    Protocol("batch", 1000),
]


class Planner:
    """Chooses each protocol's common size so a dataset's cells fit its time budget (module docstring).

    Costs are seconds per edit per (method, protocol kind): the method's observed cost on this dataset,
    else on an earlier dataset, else `SEED_COST`.
    """

    def __init__(self) -> None:
        self.observed: dict[tuple[str | None, str, str], float] = {}

    def per_edit(self, ds: str, method: str, key: str) -> float:
        for k in ((ds, key, method), (None, key, method)):
            if k in self.observed:
                return self.observed[k]
        return SEED_COST.get(key, {}).get(method, 1.0)

    def estimate(self, ds: str, methods: list[str], key: str, n: int) -> float:
        return sum(RUN_OVERHEAD_S + self.per_edit(ds, m, key) * n for m in methods)

    def choose(self, ds: str, methods: list[str], proto: Protocol, allowance_s: float) -> int | None:
        """The largest size of the ladder (from the target down) whose estimate fits `allowance_s`."""
        for s in [proto.n] + [s for s in LADDER if s < proto.n]:
            if self.estimate(ds, methods, proto.key, s) <= allowance_s:
                return s
        return None

    def observe(self, ds: str, method: str, key: str, n: int, seconds: float) -> None:
        cost = max((seconds - RUN_OVERHEAD_S) / max(n, 1), 0.002)
        self.observed[(ds, key, method)] = self.observed[(None, key, method)] = cost


PLANNER = Planner()


QUESTION_ENCODER: Path | None = None  # --question-encoder: learned question keys on the real-model datasets
RETENTION_POINTS = 10  # --retention-points: about this many points on each lifelong retention curve
RETENTION_SAMPLE = 100  # --retention-sample: earlier edits evaluated at each point
CAP_LIFELONG_STEPS = True  # off with --exact: every method runs its own defaults, as the CLI does
DEVICE, DTYPE = "cpu", "float32"  # --device / --dtype: a GPU runs the full sizes (bf16 there)
GENERATION = False  # --generate: greedy-generation exact match (Rel EM, Gen EM) beside the token metrics


def parse_protocols(spec: str) -> list[Protocol]:
    """`--protocols`: comma-separated `batch:N` and `lifelong:T:B` (e.g. `lifelong:100:10,batch:1000`)."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        kind, *nums = part.split(":")
        try:
            sizes = [int(x) for x in nums]
        except ValueError:
            sizes = []
        if kind == "batch" and len(sizes) == 1 and sizes[0] > 0:
            out.append(Protocol("batch", sizes[0]))
        elif kind == "lifelong" and len(sizes) == 2 and min(sizes) > 0:
            out.append(Protocol("lifelong", sizes[0], sizes[1]))
        else:
            raise SystemExit(f"--protocols: {part!r} is not batch:N or lifelong:T:B")
    if not out:
        raise SystemExit("--protocols: no protocol given")
    return out
BYPASS_METHODS = ("memoe", "lemoe", "scen")


def _overrides(method: str, proto: Protocol, ds_name: str = "") -> dict:
    out: dict = {}
    if QUESTION_ENCODER is not None and "_" in ds_name and method in BYPASS_METHODS:
        out = {"query_feature": "learned", "question_encoder": str(QUESTION_ENCODER)}
    if proto.kind != "lifelong" or not CAP_LIFELONG_STEPS:
        return out
    from moecli.engine.recipes import build_config

    steps = build_config(method).max_steps
    return {**out, "max_steps": LIFELONG_STEP_CAP} if steps > LIFELONG_STEP_CAP else out


def run_dataset(ds_name: str, protocols: list[Protocol], budget_s: float | None, methods: tuple[str, ...],
                build: bool) -> tuple[list[dict], list[dict], dict]:
    """All cells of one dataset: (rows, absent cells with reasons, dataset info).

    With a budget, each protocol gets an equal share of what is left, and runs every method at the
    same size (so a table's rows stay comparable): the largest ladder size whose estimate fits.
    """
    rows: list[dict] = []
    absent: list[dict] = []

    def mark_absent(p: Protocol, m: str, reason: str) -> None:
        absent.append({"dataset": ds_name, "protocol": p.title, "method": m, "reason": reason})

    try:
        ds: Dataset = load_dataset(ds_name, max(p.n for p in protocols), build=build)
    except Skip as exc:
        log(f"{ds_name}: skipped: {exc}")
        for p in protocols:
            for m in methods:
                mark_absent(p, m, str(exc))
        return rows, absent, {"skipped": str(exc)}
    info = {"model": ds.model, "model_dir": portable(ds.model_dir), "data": ds.data, "model_acquire_s": ds.acquire_s,
            "plan": []}
    t_start = time.perf_counter()
    for pi, p in enumerate(protocols):
        ms = [m for m in methods if m in p.methods]
        for m in methods:
            if m not in p.methods:
                mark_absent(p, m, p.note or "not run")
        n = min(p.n, len(ds.records))
        if budget_s is not None:
            left = budget_s - (time.perf_counter() - t_start)
            allowance = SAFETY * left / (len(protocols) - pi)
            chosen = PLANNER.choose(ds_name, ms, p, allowance)
            info["plan"].append({"protocol": p.title, "allowance_s": round(allowance, 1), "chosen": chosen,
                                 "estimate_s": None if chosen is None else
                                 round(PLANNER.estimate(ds_name, ms, p.key, chosen), 1)})
            if chosen is None:
                for m in ms:
                    mark_absent(p, m, f"time budget: {allowance:.0f} s for this protocol; even 10 edits per method "
                                      f"are estimated at {PLANNER.estimate(ds_name, ms, p.key, 10):.0f} s")
                continue
            n = min(chosen, len(ds.records))
            log(f"{ds_name} | {p.title}: {allowance:.0f} s allowed, running N/T={n} "
                f"(estimate {PLANNER.estimate(ds_name, ms, p.key, n):.0f} s)")
        bs = n if p.kind == "batch" else p.batch_size
        eval_every = max(1, math.ceil(n / bs) // RETENTION_POINTS) if p.kind == "lifelong" else 0
        for m in ms:
            if budget_s is not None and time.perf_counter() - t_start > budget_s:
                mark_absent(p, m, f"time budget of {budget_s / 60:.1f} min for this dataset used up by earlier cells")
                continue
            log(f"{ds_name} | {p.title} | {m}: N/T={n}{f' (target {p.n})' if n != p.n else ''}, batch {bs}")
            try:
                row = run(m, ds, p.kind, n, bs, _overrides(m, p, ds_name), eval_every=eval_every,
                          eval_sample=RETENTION_SAMPLE, generation=GENERATION, device=DEVICE, dtype=DTYPE)
            except Exception as exc:  # noqa: BLE001 - one failing cell must not lose the others
                first = str(exc).splitlines()[0] if str(exc) else ""
                mark_absent(p, m, f"failed: {type(exc).__name__}: {first}")
                log(f"  failed: {type(exc).__name__}: {first}")
                continue
            PLANNER.observe(ds_name, m, p.key, n, row["seconds"])
            row.update(protocol_title=p.title, target=p.n, protocol_key=p.key)
            rows.append(row)
            log(f"  rel {fmt(row['rel'])} gen {fmt(row['gen'])} loc {fmt(row['loc'])} avg {fmt(row['avg'])} "
                f"loc by group {row['loc_by_group']} ({row['seconds']:.1f} s)")
    info["seconds"] = time.perf_counter() - t_start
    return rows, absent, info


# ------------------------------------------------------------------ output
# Columns shown when a row has them: issue 16's Avg (Loc = the lower group), greedy EM, routing diagnosis.
EXTRA_COLUMNS = (
    ("Avg (min Loc)", lambda r: r.get("avg_min_loc")),
    ("Rel EM", lambda r: (r.get("em") or {}).get("rel")),
    ("Gen EM", lambda r: (r.get("em") or {}).get("gen")),
    ("reph. reaching edit", lambda r: (r.get("routing") or {}).get("gen_own")),
    ("Gen when reached", lambda r: (r.get("routing") or {}).get("gen_when_reached")),
    ("loc probes reaching own edit", lambda r: (r.get("routing") or {}).get("loc_own")),
)


def _table(rows: list[dict], absent: list[dict], methods: tuple[str, ...]) -> list[str]:
    groups = sorted({g for r in rows for g in (r.get("loc_by_group") or {})})
    extra = [(name, get) for name, get in EXTRA_COLUMNS if any(get(r) is not None for r in rows)]
    head = ["method", "N/T used", *[k.capitalize() for k in METRICS], *[f"Loc:{g}" for g in groups],
            *[name for name, _ in extra], "edit s", "total s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_method = {r["method"]: r for r in rows}
    for m in methods:
        r = by_method.get(m)
        if r is None:
            why = next((a["reason"] for a in absent if a["method"] == m), "not run")
            lines.append(f"| {m} | absent: {why} |" + " |" * (len(head) - 2))
            continue
        used = str(r["n"]) + ("" if r["n"] == r["target"] else f" ↓ (target {r['target']})")
        cells = [m, used, *[fmt(r.get(k)) for k in METRICS],
                 *[fmt((r.get("loc_by_group") or {}).get(g)) for g in groups],
                 *[fmt(get(r)) for _, get in extra], fmt(r.get("edit_s"), 1), fmt(r.get("seconds"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(result: dict) -> str:
    m = result["meta"]
    out = ["# moecli edit quality", "", *meta_lines(m),
           "- metrics: teacher-forced token accuracy (moecli.engine.evaluation); Avg = mean(Rel, Gen, Loc); "
           "Known = the "
           "unedited model's accuracy on the old answer; Port = one-hop portability (fact world only); "
           "Avg (min Loc) = mean(Rel, Gen, the lowest Loc group) (issue 16). "
           + ("Rel EM / Gen EM: greedy generation, exact match after normalisation."
              if m.get("generation_metrics") else "**Generation metrics are off** (greedy decoding is slow on CPU)."),
           "- routing (bypass methods): `reph. reaching edit` = share of rephrasings routed to their own edit, "
           "`Gen when reached` = Gen among those, `loc probes reaching own edit` = locality prompts that took the "
           "record's own edit (the same-subject failure of entity routing).",
           "- `*_smollm2`, `*_gemma3-270m`: SmolLM2-135M and Gemma 3 270M, real pretrained models (each routed by "
           "the question key moecli calibrates for it on first use); the others are small knowledge models trained "
           "here, **not** the 7B models of the papers (published LLaMA2-7B numbers: `shared/docs/METHODS.md`); "
           "compare methods within a table only.",
           f"- {m['budget_note']}; device {m.get('device', 'cpu')}, {m.get('dtype', 'float32')}", ""]
    for ds_name, info in result["datasets"].items():
        out.append(f"## {ds_name}")
        out.append("")
        if info.get("skipped"):
            out += [f"Absent: {info['skipped']}", ""]
            continue
        out += [f"- model: {info['model']}", f"- data: {info['data']}",
                f"- time: {info.get('seconds', 0):.0f} s (model acquisition {info.get('model_acquire_s', 0):.0f} s, "
                "not counted)"]
        if info.get("retention_png"):
            out.append(f"- retention curves: `{info['retention_png']}`")
        out.append("")
        for title in result["protocols"]:
            rows = [r for r in result["rows"] if r["dataset"] == ds_name and r["protocol_title"] == title]
            absent = [a for a in result["absent"] if a["dataset"] == ds_name and a["protocol"] == title]
            used = sorted({r["n"] for r in rows if r["n"] != r["target"]})
            note = f" (run at N/T = {', '.join(map(str, used))}: time budget)" if used else ""
            out += [f"### {ds_name} — {title}{note}", "", *_table(rows, absent, tuple(result["methods"])), ""]
    return "\n".join(out) + "\n"


def plot_retention(rows: list[dict], path: Path, title: str) -> Path | None:
    """Rel / Gen / Loc of the sampled earlier edits vs edits made, one line per method, one row per batch size."""
    lifelong = [r for r in rows if r["protocol"] == "lifelong" and r.get("retention")]
    if not lifelong:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({r["protocol_key"] for r in lifelong}, key=lambda k: -int(k.split("-b")[1]))
    fig, axes = plt.subplots(len(keys), 3, figsize=(12, 3.2 * len(keys)), squeeze=False)
    for row_i, key in enumerate(keys):
        for col, metric in enumerate(("rel", "gen", "loc")):
            ax = axes[row_i][col]
            for r in (r for r in lifelong if r["protocol_key"] == key):
                xs = [p["n_edited"] for p in r["retention"]]
                ys = [float("nan") if p.get(metric) is None else p[metric] for p in r["retention"]]
                color = f"C{METHOD_NAMES.index(r['method']) % 10}" if r["method"] in METHOD_NAMES else None
                ax.plot(xs, ys, marker="o", ms=3, color=color, label=f"{r['method']} (T={r['n']})")
            ax.set_title(f"{metric.capitalize()}, batches of {key.split('-b')[1]}")
            ax.set_xlabel("edits made")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[row_i][0].set_ylabel("score on earlier edits")
        axes[row_i][2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fact world only, tiny sizes (default)")
    mode.add_argument("--full", action="store_true", help="every dataset and protocol, within --budget-min")
    ap.add_argument("--budget-min", type=float, default=40.0, help="full mode: minutes for all quality cells")
    ap.add_argument("--datasets", default=None, help="comma-separated subset of " + ",".join(DATASETS))
    ap.add_argument("--methods", default=",".join(METHOD_NAMES))
    ap.add_argument("--no-build", action="store_true", help="skip a dataset whose model is not built yet")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results[/quick])")
    ap.add_argument("--protocols", default=None,
                    help="replace the mode's protocols: comma-separated batch:N and lifelong:T:B")
    ap.add_argument("--exact", action="store_true",
                    help="full mode: run every protocol at its target size (no time budget, no size ladder)")
    ap.add_argument("--generate", action="store_true",
                    help="greedy-generation exact match (Rel EM, Gen EM) beside the token metrics (slow on CPU)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (as `moecli --device`)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto (as `moecli --dtype`)")
    ap.add_argument("--retention-points", type=int, default=10,
                    help="lifelong: about this many retention-curve points (each evaluates a sample of earlier edits)")
    ap.add_argument("--retention-sample", type=int, default=100,
                    help="lifelong: earlier edits evaluated at each retention point")
    ap.add_argument("--question-encoder", type=Path, default=None,
                    help="a `moecli calibrate` file: MEMoE, LEMoE and SCEN route by it on the real-model datasets")
    args = ap.parse_args(argv)
    global QUESTION_ENCODER, GENERATION, CAP_LIFELONG_STEPS, RETENTION_POINTS, RETENTION_SAMPLE, DEVICE, DTYPE
    DEVICE, DTYPE = args.device, args.dtype
    if args.retention_points < 1 or args.retention_sample < 1:
        raise SystemExit("--retention-points and --retention-sample must be ≥ 1")
    RETENTION_POINTS, RETENTION_SAMPLE = args.retention_points, args.retention_sample
    QUESTION_ENCODER = args.question_encoder
    GENERATION = args.generate
    CAP_LIFELONG_STEPS = not args.exact
    quick = not args.full
    methods = tuple(m for m in args.methods.split(",") if m)
    datasets = tuple(args.datasets.split(",")) if args.datasets else (("fact_world",) if quick else DATASETS)
    protocols = parse_protocols(args.protocols) if args.protocols else QUICK if quick else FULL
    t0 = time.perf_counter()
    result: dict = {"meta": {}, "methods": list(methods), "protocols": [p.title for p in protocols],
                    "datasets": {}, "rows": [], "absent": []}
    avail = []  # find (or build) every model first, so build time never eats into the budget
    for d in datasets:
        try:
            load_dataset(d, 1, build=not args.no_build)
            avail.append(d)
        except Skip:
            pass
    per_ds = None if quick or args.exact else args.budget_min * 60 / max(len(avail), 1)
    budget_note = ("quick mode: fixed tiny sizes, no time budget" if quick else
                   "full mode, --exact: every protocol at its target size, no time budget" if args.exact else
                   f"full mode: budget {args.budget_min:.0f} min for quality, {per_ds / 60:.1f} min per available "
                   f"dataset; cells below their target size say so (see benchmarks/quality.py docstring)")
    out_dir = args.out or results_dir(quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    for d in datasets:
        rows, absent, info = run_dataset(d, protocols, per_ds, methods, not args.no_build)
        title = f"moecli retention — {d} ({'quick' if quick else 'full'})"
        png = plot_retention(rows, out_dir / f"retention_{d}.png", title)
        if png:
            info["retention_png"] = str(png.relative_to(REPO)) if png.is_relative_to(REPO) else str(png)
        result["rows"] += rows
        result["absent"] += absent
        result["datasets"][d] = info
    result["meta"] = meta(quick, {
        "budget_note": budget_note, "generation_metrics": GENERATION, "evaluate_before": False,
        "device": DEVICE, "dtype": DTYPE,
        "lifelong_max_steps_cap": LIFELONG_STEP_CAP if CAP_LIFELONG_STEPS else None,
        "retention": {"points": RETENTION_POINTS, "sample": RETENTION_SAMPLE},
        "checkpoint": "saved once at the end of each run",
        "protocols": [p.__dict__ | {"title": p.title} for p in protocols],
        "question_encoder": str(QUESTION_ENCODER) if QUESTION_ENCODER else None,
        "seconds": time.perf_counter() - t0,
    })
    write_results(out_dir, "quality", result, render_markdown(result), t0)
    return result


if __name__ == "__main__":
    main()
