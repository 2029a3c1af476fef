"""Cost of editing and of edited inference, every figure a ratio of two timings taken in the same run.

    python benchmarks/speed.py --quick      # small sizes (smoke check)
    python benchmarks/speed.py --full

Parts (fact-world model, CPU, `torch.set_num_threads(2)`):
1. Edit throughput: each method edits the first N records in batches of 10 with its default config:
   edits per second, and its ratio to FT-L's in the same run; peak resident memory of the edit run,
   and its ratio to the peak of plain inference on the same model; adapter bytes per edit.
2. Inference overhead: edited-model forward time ÷ base-model forward time on a fixed batch of 64
   prompts (half edited prompts, half locality prompts) at 10, 100 and 1000 edits. The edits are
   applied with `max_steps=1` (SCEN also `neuron_steps=1`): the forward cost depends on what the
   adapter holds (experts, keys, codebook entries), not on how well it was trained. Base forward time is
   measured before and after each method (method removed) and the mean used.
3. Routing: the anchor store (FAISS flat = exact, HNSW = approximate) vs a plain torch matmul + max,
   64 queries, 10^3 to 10^6 keys at the fact-world model's width, and at 4096 (a 7B model's width).
4. SCEN stage 2 (indexing-neuron training) time per edit along a growing stream of single edits, with
   the negatives capped (`max_negatives`) vs uncapped (0 = all earlier edits). Stage 1 runs one step
   (`max_steps=1`): its cost does not depend on the stream length, and one step keeps the stream long.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    THREADS,
    Skip,
    fmt,
    human_bytes,
    load_dataset,
    log,
    meta,
    meta_lines,
    peak_rss_mb,
    reset_peak_rss,
    results_dir,
    rss_mb,
    timed,
    write_results,
)

from moecli.methods import METHOD_NAMES  # noqa: E402

QUICK = {
    "mode": "quick", "n_train": 10, "overhead_sizes": (10, 100), "stream_batch": 10, "reps": 5,
    "routing": {128: (1_000, 10_000, 100_000), 4096: (1_000, 10_000)},
    "hnsw_max": {128: 10_000, 4096: 1_000},
    "scen_T": 30, "scen_caps": (8, 0), "neuron_positions": (10, 100, 1000), "neuron_widths": (None, 11008),
}
FULL = {
    "mode": "full", "n_train": 30, "overhead_sizes": (10, 100, 1000), "stream_batch": 10, "reps": 7,
    "routing": {128: (1_000, 10_000, 100_000, 1_000_000), 4096: (1_000, 10_000, 100_000)},
    "hnsw_max": {128: 100_000, 4096: 10_000},
    "scen_T": 300, "scen_caps": (100, 0), "neuron_positions": (10, 100, 1000, 10000), "neuron_widths": (None, 11008),
}
N_QUERIES = 64
LEMOE_TARGET = (100_000, 1.0)  # keys, ms per query


# ------------------------------------------------------------------ helpers
def probe_batch(loaded, records, size: int = 64):
    """A fixed batch: the first size/2 records' prompts (edited) and as many locality prompts (untouched)."""
    from moecli.model.batching import collate, pad_id_of, prompt_only

    half = size // 2
    prompts = [r.prompt for r in records[:half]]
    prompts += [lp.prompt for r in records for lp in r.locality][: size - len(prompts)]
    items = [prompt_only(loaded.tokenizer, p) for p in prompts]
    return collate(items, pad_id_of(loaded.tokenizer)).to(loaded.device)


@torch.no_grad()
def paired_ms(base_model, edited_model, batch, reps: int) -> tuple[float, float]:
    """(base ms, edited ms): the two models' forwards on `batch`, interleaved, best of `reps` each.

    Interleaving and taking the best of each keeps the ratio meaningful on a machine shared with
    other jobs (a burst of load hits both sides, and the minimum is the least disturbed run).
    """
    from moecli.model.batching import forward

    for _ in range(2):
        forward(base_model, batch)
        forward(edited_model, batch)
    tb, te = [], []
    for _ in range(reps):
        for model, ts in ((base_model, tb), (edited_model, te)):
            t = time.perf_counter()
            forward(model, batch)
            ts.append(time.perf_counter() - t)
    return min(tb) * 1e3, min(te) * 1e3


def state_bytes(method) -> int:
    _, tensors, files = method.export_state()
    return sum(t.numel() * t.element_size() for t in tensors.values()) + sum(len(b) for b in files.values())


def stream(method, records, batch_size: int, start_batch: int = 0) -> float:
    t = time.perf_counter()
    for b, i in enumerate(range(0, len(records), batch_size)):
        torch.manual_seed(b + start_batch)
        method.apply_batch(records[i : i + batch_size], start_batch + b)
    return time.perf_counter() - t


# ------------------------------------------------------------------ 1 + 2: per method
def method_costs(loaded, base, records, methods, cfg) -> tuple[dict, list[dict], list[dict]]:
    """`loaded` gets each method in turn; `base` is a second, never-edited copy of the same model."""
    from moecli.engine.recipes import build_config
    from moecli.engine.run import build_method

    batch = probe_batch(loaded, records)
    gc.collect()
    rss0 = rss_mb()
    reset_peak_rss()
    base_ms, _ = paired_ms(base.model, loaded.model, batch, cfg["reps"])
    info = {"forward_ms": base_ms, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0,
            "probe_batch": f"{batch.input_ids.shape[0]} prompts × {batch.input_ids.shape[1]} tokens"}
    thr, ovh = [], []
    n = cfg["n_train"]
    bs = cfg["stream_batch"]
    for m in methods:
        log(f"speed | {m}: {n} edits, default config, batches of {bs}")
        try:
            gc.collect()
            before = rss_mb()
            reset_peak_rss()
            meth = build_method(loaded, m, build_config(m), 0)
            secs = stream(meth, records[:n], bs)
            peak = peak_rss_mb()
            a_bytes = state_bytes(meth)
            meth.remove()
            del meth
            thr.append({"method": m, "n": n, "batch_size": bs, "edit_s": secs, "edits_per_s": n / secs,
                        "peak_rss_mb": peak, "rss_before_mb": before,
                        "peak_delta_mb": None if peak is None or before is None else peak - before,
                        "peak_vs_inference": None if not peak or not info["peak_rss_mb"] else
                        peak / info["peak_rss_mb"],
                        "adapter_bytes": a_bytes, "adapter_bytes_per_edit": a_bytes / n})
        except Exception as exc:  # noqa: BLE001
            thr.append({"method": m, "absent": f"failed: {type(exc).__name__}: {exc}"})
            log(f"  failed: {exc}")
        sizes = [s for s in cfg["overhead_sizes"] if s <= len(records)]
        log(f"speed | {m}: inference overhead at {sizes} edits (max_steps=1)")
        try:
            ov = {"max_steps": 1, **({"neuron_steps": 1} if m == "scen" else {})}
            meth = build_method(loaded, m, build_config(m, None, ov), 0)
            done, points = 0, []
            for s in sizes:
                stream(meth, records[done:s], bs, start_batch=done // bs)
                done = s
                b_ms, e_ms = paired_ms(base.model, loaded.model, batch, cfg["reps"])
                points.append({"edits": s, "base_ms": b_ms, "forward_ms": e_ms, "ratio": e_ms / b_ms,
                               "adapter_bytes_per_edit": state_bytes(meth) / s})
            meth.remove()
            del meth
            ovh.append({"method": m, "points": points})
        except Exception as exc:  # noqa: BLE001
            ovh.append({"method": m, "absent": f"failed: {type(exc).__name__}: {exc}"})
            log(f"  failed: {exc}")
    ft = next((r for r in thr if r["method"] == "ft" and "edits_per_s" in r), None)
    for r in thr:
        if ft and "edits_per_s" in r:
            r["vs_ft"] = r["edits_per_s"] / ft["edits_per_s"]
    return info, thr, ovh


# ------------------------------------------------------------------ 3: routing
def routing(cfg) -> list[dict]:
    import faiss
    import numpy as np

    from moecli.routing.anchors import AnchorStore

    faiss.omp_set_num_threads(THREADS)
    rows = []
    for dim, sizes in cfg["routing"].items():
        for n in sizes:
            gb = n * dim * 4 / 2**30
            log(f"routing | width {dim}, {n:,} keys ({gb:.2f} GiB per copy)")
            rng = np.random.default_rng(0)
            keys = rng.standard_normal((n, dim), dtype=np.float32)
            q = keys[rng.integers(0, n, N_QUERIES)] + 0.3 * rng.standard_normal((N_QUERIES, dim), dtype=np.float32)
            row = {"dim": dim, "keys": n, "queries": N_QUERIES}
            # torch: normalise (as the store does), matmul, max
            kt = torch.nn.functional.normalize(torch.from_numpy(keys), dim=-1)
            qt = torch.from_numpy(q)

            def torch_search(qt=qt, kt=kt):
                return (torch.nn.functional.normalize(qt, dim=-1) @ kt.T).max(-1)

            row["torch_ms_per_query"] = timed(torch_search) * 1e3 / N_QUERIES
            exact = torch_search()[1].numpy()
            del kt
            for kind in ("flat", "hnsw"):
                if kind == "hnsw" and n > cfg["hnsw_max"][dim]:
                    row["hnsw_absent"] = (f"width {dim}: {cfg['mode']} mode builds HNSW only up to "
                                          f"{cfg['hnsw_max'][dim]:,} keys (its build takes minutes beyond that on "
                                          "this machine)")
                    continue
                store = AnchorStore(dim, kind)
                t = time.perf_counter()
                store.add(keys, np.arange(n))
                row[f"{kind}_build_s"] = time.perf_counter() - t
                row[f"{kind}_ms_per_query"] = timed(lambda s=store, q=q: s.search(q, 1)) * 1e3 / N_QUERIES
                ids = store.search(q, 1)[1][:, 0]
                row[f"{kind}_recall@1"] = float((ids == exact).mean())
                row[f"{kind}_vs_torch"] = row[f"{kind}_ms_per_query"] / row["torch_ms_per_query"]
                del store
            del keys
            gc.collect()
            rows.append(row)
    return rows




# ------------------------------------------------------------------ 4: SCEN stage 2
def scen_stage2(loaded, records, cfg) -> list[dict]:
    from moecli.engine.recipes import build_config
    from moecli.engine.run import build_method

    rows = []
    T = min(cfg["scen_T"], len(records))
    for cap in cfg["scen_caps"]:
        log(f"SCEN stage 2 | max_negatives={cap} ({'all' if cap == 0 else 'capped'}), stream of {T} single edits")
        meth = build_method(loaded, "scen", build_config("scen", None, {"max_steps": 1, "max_negatives": cap}), 0)
        real = meth._train_neuron
        stage2: list[float] = []
        n_neg: list[int] = []

        def timed_neuron(pos, neg, real=real, stage2=stage2, n_neg=n_neg):
            t = time.perf_counter()
            w = real(pos, neg)
            stage2.append(time.perf_counter() - t)
            n_neg.append(int(neg.shape[0]))
            return w

        meth._train_neuron = timed_neuron
        total: list[float] = []
        for i, r in enumerate(records[:T]):
            t = time.perf_counter()
            meth.apply_batch([r], i)
            total.append(time.perf_counter() - t)
        meth.remove()
        w = max(5, T // 10)
        windows = [(0, w), (T // 2 - w // 2, T // 2 + (w - w // 2)), (T - w, T)]
        pts = []
        for a, b in windows:
            pts.append({"edits": f"{a + 1}-{b}", "negatives": round(statistics.mean(n_neg[a:b]), 1),
                        "stage2_ms": statistics.mean(stage2[a:b]) * 1e3, "total_ms": statistics.mean(total[a:b]) * 1e3})
        rows.append({"max_negatives": cap, "T": T, "windows": pts,
                     "stage2_last_vs_first": pts[-1]["stage2_ms"] / pts[0]["stage2_ms"],
                     "stage2_total_s": sum(stage2), "stream_total_s": sum(total)})
    return rows


def scen_neuron_scaling(loaded, cfg) -> list[dict]:
    """SCEN's own `_train_neuron` at stream position i: i earlier edits, so i negatives uncapped or
    min(i, max_negatives) capped (as `apply_batch` samples them), on random last-token inputs of the
    fact-world target width and of LLaMA2-7B's (11008). Best of 3 per point."""
    from moecli.engine.recipes import build_config
    from moecli.engine.run import build_method

    cfg_scen = build_config("scen")
    cap = cfg_scen.max_negatives
    meth = build_method(loaded, "scen", cfg_scen, 0)
    gen = torch.Generator().manual_seed(0)
    rows = []
    try:
        for width in cfg["neuron_widths"]:
            d = width or meth.d_in
            for i in cfg["neuron_positions"]:
                row = {"width": d, "position": i, "cap": cap, "neuron_steps": cfg_scen.neuron_steps}
                for label, k in (("capped", min(i, cap)), ("all", i)):
                    pos = torch.randn(1, d, generator=gen)
                    neg = torch.randn(k, d, generator=gen)
                    row[f"{label}_negatives"] = k
                    row[f"{label}_ms"] = timed(lambda p=pos, n=neg: meth._train_neuron(p, n), reps=3) * 1e3
                row["all_vs_capped"] = row["all_ms"] / row["capped_ms"]
                log(f"SCEN neuron | width {d}, position {i}: capped {row['capped_ms']:.1f} ms, "
                    f"all {row['all_ms']:.1f} ms")
                rows.append(row)
    finally:
        meth.remove()
    return rows


# ------------------------------------------------------------------ output
def render_markdown(res: dict) -> str:
    m = res["meta"]
    cfg = m["config"]
    out = ["# moecli speed", "", *meta_lines(m), f"- model: {m['model']}", f"- data: {m['data']}",
           "- every ratio divides two timings taken in this same run (the machine is shared: absolute times "
           "move with its load, ratios much less)", ""]
    base = res.get("base", {})
    out += ["## 1. Edit throughput, memory, adapter size", "",
            f"Default configs, the first {cfg['n_train']} fact-world records in batches of {cfg['stream_batch']}. "
            f"Peak RSS is the process's resident high-water mark during the edit run (reset before it); the "
            f"inference peak ({fmt(base.get('peak_rss_mb'), 0)} MB) is the same measure over base-model forwards.",
            "", "| method | edits | edit s | edits/s | ÷ FT-L | peak RSS MB | Δ over start MB | ÷ inference peak | "
            "adapter bytes/edit |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("throughput", []):
        if "absent" in r:
            out.append(f"| {r['method']} | absent: {r['absent']} | | | | | | | |")
            continue
        out.append(f"| {r['method']} | {r['n']} | {fmt(r['edit_s'], 1)} | {fmt(r['edits_per_s'], 2)} | "
                   f"{fmt(r.get('vs_ft'), 2)} | {fmt(r['peak_rss_mb'], 0)} | {fmt(r['peak_delta_mb'], 0)} | "
                   f"{fmt(r['peak_vs_inference'], 2)} | {human_bytes(r['adapter_bytes_per_edit'])} |")
    sizes = cfg["overhead_sizes"]
    out += ["", "## 2. Inference overhead (edited ÷ base forward time)", "",
            f"Forward of {base.get('probe_batch', '?')} (half edited prompts, half locality prompts) by the edited "
            f"model and by a second, never-edited copy of it, interleaved, best of {cfg['reps']} each; edits applied "
            f"with max_steps=1 in batches of {cfg['stream_batch']}.", "",
            "| method | " + " | ".join(f"base ms @{s} | edited ms @{s} | **× @{s}**" for s in sizes)
            + f" | adapter bytes/edit @{sizes[-1]} |", "|---|" + "---|---|---|" * len(sizes) + "---|"]
    for r in res.get("overhead", []):
        if "absent" in r:
            out.append(f"| {r['method']} | absent: {r['absent']} |" + " |" * (3 * len(sizes)))
            continue
        by = {p["edits"]: p for p in r["points"]}
        cells = []
        for s in sizes:
            p = by.get(s)
            cells += [fmt(p["base_ms"], 1), fmt(p["forward_ms"], 1), fmt(p["ratio"], 2)] if p else ["–"] * 3
        last = by.get(sizes[-1])
        out.append(f"| {r['method']} | " + " | ".join(cells)
                   + f" | {human_bytes(last['adapter_bytes_per_edit']) if last else '–'} |")
    out += ["", "## 3. Routing: anchor store (FAISS) vs torch matmul", "",
            f"{N_QUERIES} queries (noisy copies of stored keys) searched for the top-1 key; ms per query "
            "(best of 5). recall@1 = share of queries whose top key is the exact one.", "",
            "| width | keys | torch ms/q | flat ms/q | flat ÷ torch | hnsw ms/q | hnsw ÷ torch | hnsw recall@1 | "
            "build s flat / hnsw |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("routing", []):
        hn = (fmt(r.get("hnsw_ms_per_query"), 3), fmt(r.get("hnsw_vs_torch"), 2), fmt(r.get("hnsw_recall@1"), 2))
        if "hnsw_absent" in r:
            hn = ("not run", "–", "–")
        out.append(f"| {r['dim']} | {r['keys']:,} | {fmt(r['torch_ms_per_query'], 3)} | "
                   f"{fmt(r.get('flat_ms_per_query'), 3)} | {fmt(r.get('flat_vs_torch'), 2)} | {hn[0]} | {hn[1]} | "
                   f"{hn[2]} | {fmt(r.get('flat_build_s'), 2)} / {fmt(r.get('hnsw_build_s'), 2)} |")
    absent = sorted({r["hnsw_absent"] for r in res.get("routing", []) if "hnsw_absent" in r})
    out += [f"- HNSW not run: {a}" for a in absent]
    chk = res.get("lemoe_check")
    if chk:
        out += ["", f"**LEMoE target** ({N_QUERIES} queries among {LEMOE_TARGET[0]:,} keys at width "
                    f"{chk['dim']}, < {LEMOE_TARGET[1]} ms per query): {chk['text']}"]
    out += ["", "## 4. SCEN stage 2 per edit along the stream (negatives capped vs all)", "",
            "Single edits; stage 1 one step (its cost does not grow with the stream). Stage-2 time is the "
            "indexing neuron's training; linear total time = flat per-edit time.", "",
            "| max_negatives | T | edits | mean negatives | stage-2 ms/edit | total ms/edit |",
            "|---|---|---|---|---|---|"]
    for r in res.get("scen_stage2", []):
        cap = "0 (all)" if r["max_negatives"] == 0 else str(r["max_negatives"])
        for p in r["windows"]:
            out.append(f"| {cap} | {r['T']} | {p['edits']} | {p['negatives']} | {fmt(p['stage2_ms'], 1)} | "
                       f"{fmt(p['total_ms'], 1)} |")
    for r in res.get("scen_stage2", []):
        cap = "all negatives" if r["max_negatives"] == 0 else f"cap {r['max_negatives']}"
        out.append(f"- {cap}: stage-2 time per edit, last window ÷ first: **{fmt(r['stage2_last_vs_first'], 2)}**")
    ns = res.get("scen_neuron", [])
    if ns:
        cap = ns[0]["cap"]
        out += ["", f"Stage 2 alone (SCEN's `_train_neuron`, {ns[0]['neuron_steps']} steps) at stream position i "
                f"(i earlier edits as negatives), default cap max_negatives={cap} vs all, random inputs; best of 3. "
                "Capped, the per-edit time levels off once i ≥ cap, so a stream's stage-2 time grows linearly; "
                "uncapped it grows with i, so the stream's total grows quadratically.", "",
                "| width | position i | negatives (capped) | ms/edit capped | negatives (all) | ms/edit all "
                "| all ÷ capped |",
                "|---|---|---|---|---|---|---|"]
        for r in ns:
            out.append(f"| {r['width']} | {r['position']:,} | {r['capped_negatives']:,} | {fmt(r['capped_ms'], 1)} | "
                       f"{r['all_negatives']:,} | {fmt(r['all_ms'], 1)} | {fmt(r['all_vs_capped'], 2)} |")
    if res.get("absent"):
        out += ["", "## Absent", ""] + [f"- {a}" for a in res["absent"]]
    return "\n".join(out) + "\n"


def lemoe_check(rows: list[dict], dim: int) -> dict | None:
    r = next((r for r in rows if r["dim"] == dim and r["keys"] == LEMOE_TARGET[0]), None)
    if r is None:
        return {"dim": dim, "text": f"not measured in this mode ({LEMOE_TARGET[0]:,} keys not in the sizes)"}
    parts = []
    for kind in ("flat", "hnsw"):
        v = r.get(f"{kind}_ms_per_query")
        if v is not None:
            parts.append(f"{kind} {v:.3f} ms/query ({'meets' if v < LEMOE_TARGET[1] else 'MISSES'} the target)")
        else:
            parts.append(f"{kind} not run")
    for wdim in sorted({x["dim"] for x in rows if x["dim"] != dim}):
        wide = sorted((x for x in rows if x["dim"] == wdim), key=lambda x: x["keys"])
        sizes = " / ".join(f"{x['keys']:,}" for x in wide)
        flat = " / ".join(fmt(x.get("flat_ms_per_query"), 3) for x in wide)
        hnsw = " / ".join(fmt(x.get("hnsw_ms_per_query"), 3) if "hnsw_absent" not in x else "not run" for x in wide)
        rec = " / ".join(fmt(x.get("hnsw_recall@1"), 2) if "hnsw_absent" not in x else "–" for x in wide)
        parts.append(f"at width {wdim}, {sizes} keys: flat {flat} ms/query, hnsw {hnsw} ms/query "
                     f"(hnsw recall@1 {rec})")
    return {"dim": dim, "text": "; ".join(parts), "row": r}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes (default)")
    mode.add_argument("--full", action="store_true")
    ap.add_argument("--methods", default=",".join(METHOD_NAMES))
    ap.add_argument("--parts", default="methods,routing,scen", help="comma-separated subset of methods,routing,scen")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results[/quick])")
    args = ap.parse_args(argv)
    quick = not args.full
    cfg = QUICK if quick else FULL
    parts = set(args.parts.split(","))
    methods = tuple(m for m in args.methods.split(",") if m)
    t0 = time.perf_counter()
    res: dict = {"absent": []}
    n_records = max(max(cfg["overhead_sizes"]), cfg["n_train"], cfg["scen_T"], 64)
    width = 128
    try:
        ds = load_dataset("fact_world", n_records)
    except Skip as exc:
        ds = None
        res["absent"].append(f"methods and SCEN parts: {exc}")
        log(f"speed: no fact-world model: {exc}")
    model_info = {"model": ds.model if ds else "none", "data": ds.data if ds else "none"}
    if ds is not None and parts & {"methods", "scen"}:
        from moecli.model.loading import load_model

        loaded = load_model(ds.model_dir, "cpu", "float32")
        width = int(loaded.model.get_input_embeddings().weight.shape[1])
        if "methods" in parts:
            base = load_model(ds.model_dir, "cpu", "float32")  # never edited: the other side of every ratio
            res["base"], res["throughput"], res["overhead"] = method_costs(loaded, base, ds.records, methods, cfg)
            del base
        if "scen" in parts:
            res["scen_neuron"] = scen_neuron_scaling(loaded, cfg)
            res["scen_stage2"] = scen_stage2(loaded, ds.records, cfg)
        del loaded
        gc.collect()
    if "routing" in parts:
        cfg = {**cfg, "routing": {(width if d == 128 else d): s for d, s in cfg["routing"].items()},
               "hnsw_max": {(width if d == 128 else d): s for d, s in cfg["hnsw_max"].items()}}
        res["routing"] = routing(cfg)
        res["lemoe_check"] = lemoe_check(res["routing"], width)
    res["meta"] = meta(quick, {**model_info, "config": {k: (v if not isinstance(v, dict) else
                                                            {str(a): b for a, b in v.items()})
                                                        for k, v in cfg.items()},
                               "seconds": time.perf_counter() - t0})
    write_results(args.out or results_dir(quick), "speed", res, render_markdown(res), t0)
    return res


if __name__ == "__main__":
    main()
