"""Run the benchmark suite: `--quick` (smoke check, < 5 min on 2 cores) or `--full` (< 60 min on 2 cores).

    python benchmarks/run.py --quick    # make bench-quick: results in benchmarks/results/quick/
    python benchmarks/run.py --full     # make bench:       results in benchmarks/results/

Runs `quality.py`, `speed.py` then `speed_real.py` (SmolLM2; see their docstrings). Full mode:
quality gets `--budget-min` (default 40) minutes of editing, speed about 12; models that have to be built
first (the fact world if not committed, the ZsRE / CounterFact knowledge models if not cached) are
built before any timing starts and are not counted (pass `--no-build` to skip a dataset whose model is
missing instead).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402
import speed  # noqa: E402
import speed_real  # noqa: E402
from common import log  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    ap.add_argument("--budget-min", type=float, default=40.0, help="full mode: minutes for the quality cells")
    ap.add_argument("--no-build", action="store_true", help="skip a dataset whose model is not built yet")
    ap.add_argument("--only", choices=("quality", "speed", "speed-real"), default=None)
    args = ap.parse_args(argv)
    flag = ["--quick"] if args.quick else ["--full", "--budget-min", str(args.budget_min)]
    t0 = time.perf_counter()
    if args.only in (None, "quality"):
        quality.main(flag + (["--no-build"] if args.no_build else []))
    if args.only in (None, "speed"):
        speed.main(["--quick"] if args.quick else ["--full"])
    if args.only in (None, "speed-real"):
        speed_real.main(["--quick"] if args.quick else ["--full"])
    log(f"benchmarks ({'quick' if args.quick else 'full'}) done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
