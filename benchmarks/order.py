"""Editing order: LEMoE lifelong with the stream in file, random and planned order (issue: plan-order).

    python benchmarks/order.py                       # fact world and ZsRE, T = 1000 in batches of 10
    python benchmarks/order.py --datasets fact_world --n 200

Same seed, same method config, only the order changes. Results: `benchmarks/results/order.json` and
`order.md` (`--quick` writes under `results/quick/`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Skip, fmt, load_dataset, log, meta, meta_lines, results_dir, run, write_results  # noqa: E402

ORDERS = ("file", "random", "planned")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="fact_world,zsre")
    ap.add_argument("--method", default="lemoe")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="write under results/quick/")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows, absent = [], []
    for name in args.datasets.split(","):
        try:
            ds = load_dataset(name, args.n, build=False)
        except Skip as exc:
            absent.append({"dataset": name, "reason": str(exc)})
            log(f"{name}: absent ({exc})")
            continue
        for order in ORDERS:
            log(f"{name} | {args.method} lifelong T={args.n} b={args.batch_size} | order {order}")
            rows.append(run(args.method, ds, "lifelong", args.n, args.batch_size, order=order))
    result = {"meta": meta(args.quick, {"method": args.method, "n": args.n, "batch_size": args.batch_size}),
              "rows": rows, "absent": absent}
    lines = ["# moecli editing order (lifelong, same seed; only the order of the stream changes)", "",
             *meta_lines(result["meta"]), "",
             "| dataset | order | T | batch | Rel | Gen | Loc | Loc per group | edit s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        groups = ", ".join(f"{g} {fmt(v)}" for g, v in sorted(r["loc_by_group"].items()))
        lines.append(f"| {r['dataset']} | {r['order']} | {r['n']} | {r['batch_size']} | {fmt(r['rel'])} | "
                     f"{fmt(r['gen'])} | {fmt(r['loc'])} | {groups} | {fmt(r['edit_s'], 1)} |")
    lines += [f"- {a['dataset']} absent: {a['reason']}" for a in absent]
    write_results(results_dir(args.quick), "order", result, "\n".join(lines) + "\n", t0)
    return result


if __name__ == "__main__":
    main()
