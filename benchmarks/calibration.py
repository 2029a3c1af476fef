"""The automatic question key: held-out recall against the number of calibration records, per file.

    python benchmarks/calibration.py --model smollm2
    python benchmarks/calibration.py --model gemma3-270m

Reads the calibration data moecli ships (`moecli/assets/calibration/`): `counterfact_train` 0–(pool) and
every `zsre_train_1k` record, with probes built as `moecli calibrate` builds them. The features of every
prompt are computed once (timed per prompt: layers and MiniLM apart); then keys are trained on the first n
CounterFact records (and on all or half of the ZsRE records that are not held out) and measured on one
fixed held-out set: CounterFact records (pool − 1000)–pool and a fifth of the ZsRE records. Three keys:
layers + MiniLM skeleton (the default), layers alone (`--no-text`), the MiniLM skeleton alone (a key that
needs no model at all: not a routing key moecli builds today, measured as a possible fallback). Each
threshold lets 0.25 % of the pooled held-out other questions through, as `calibrate` sets it; recall (the
rephrasings that pass) and false matches are given per file at that threshold. Writes
`benchmarks/results/calibration_<model>.json` (`common.THREADS` torch threads, default 1).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import RESULTS, THREADS, meta  # noqa: E402

from moecli.engine.calibration import SHIPPED, calibration_records  # noqa: E402
from moecli.model.loading import load_model, num_layers  # noqa: E402
from moecli.model.sources import resolve_model  # noqa: E402
from moecli.routing.question import (  # noqa: E402
    FALSE_MATCH_RATE,
    calibration_pairs,
    default_layers,
    layer_features,
    text_features,
    train_encoder,
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--pool", type=int, default=4000, help="CounterFact records read (the last 1000 held out)")
    ap.add_argument("--sizes", default="250,500,1000,2000,3000")
    ap.add_argument("--features", type=Path, help="cache of the features (reused when it exists)")
    args = ap.parse_args()
    cf_src, zs_src = SHIPPED
    cf = calibration_records(cf_src.path, 0, args.pool)
    zs = calibration_records(zs_src.path, 0, zs_src.end)
    records = cf + zs
    prompts, pairs, subjects = calibration_pairs(records)
    anchors = sorted({p[0] for p in pairs})
    starts, at = [], 0
    for r in records:
        starts.append(at)
        at += 1 + len(r.rephrases) + sum(lp.group in ("neighborhood", "same_subject") for lp in r.locality)
    record_of = {s: i for i, s in enumerate(starts)}
    file_of = {a: ("counterfact_train" if record_of[a] < len(cf) else "zsre_train_1k") for a in anchors}
    zs_anchors = [a for a in anchors if file_of[a] == "zsre_train_1k"]
    zs_held = set(random.Random(0).sample(zs_anchors, len(zs_anchors) // 5))
    cf_held = {a for a in anchors if file_of[a] == "counterfact_train" and record_of[a] >= len(cf) - 1000}
    held = cf_held | zs_held

    t0 = time.perf_counter()
    loaded = load_model(resolve_model(args.model))
    load_s = time.perf_counter() - t0
    layers = default_layers(num_layers(loaded.model))
    timing = {"load_s": round(load_s, 1), "prompts": len(prompts), "threads": THREADS}
    if args.features and args.features.is_file():
        saved = torch.load(args.features)
        lf, tf = saved["layers"], saved["text"]
        timing.update(saved["timing"])
    else:
        t0 = time.perf_counter()
        lf = layer_features(loaded.model, loaded.tokenizer, prompts, layers)
        timing["layers_ms_per_prompt"] = round(1000 * (time.perf_counter() - t0) / len(prompts), 2)
        t0 = time.perf_counter()
        tf = text_features(prompts, subjects)
        timing["minilm_ms_per_prompt"] = round(1000 * (time.perf_counter() - t0) / len(prompts), 2)
        if args.features:
            torch.save({"layers": lf, "text": tf, "timing": dict(timing)}, args.features)
    print(json.dumps(timing), flush=True)

    keys = {"layers+skeleton": (torch.cat([lf, tf], 1), len(layers), tf.shape[1]),
            "layers": (lf, len(layers), 0), "skeleton": (tf, 1, 0)}
    rows = []
    sizes = [int(v) for v in args.sizes.split(",")]
    zs_fit = [a for a in zs_anchors if a not in zs_held]
    for n in sizes:
        for zs_n in (len(zs_fit), len(zs_fit) // 2):
            fit_anchors = {a for a in anchors if file_of[a] == "counterfact_train" and record_of[a] < n} | set(
                zs_fit[:zs_n])
            use = [p for p in pairs if p[0] in fit_anchors or p[0] in held]
            idx = sorted({i for p in use for i in p[:2]})
            remap = {old: new for new, old in enumerate(idx)}
            sub_pairs = [(remap[a], remap[b], k) for a, b, k in use]
            sub_held = {remap[a] for a in held}
            groups = {remap[a]: file_of[a] for a in anchors if a in remap}
            for name, (feats, n_layers, text_dim) in keys.items():
                if zs_n != len(zs_fit) and name != "layers+skeleton":
                    continue
                t0 = time.perf_counter()
                _, m = train_encoder(feats[idx], sub_pairs, sub_held, n_layers=n_layers, text_dim=text_dim,
                                     false_match_rate=FALSE_MATCH_RATE, groups=groups)
                row = {"key": name, "counterfact_records": n, "zsre_records": zs_n, "fit_pairs": m["fit_pairs"],
                       "prompts": len(idx), "train_s": round(time.perf_counter() - t0, 1), "auc": m.get("auc"),
                       "recall": m.get("recall_at_threshold"), "false_match_rate": m.get("false_match_rate"),
                       "per_source": m.get("per_source")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = RESULTS / f"calibration_{args.model}.json"
    out.write_text(json.dumps({"meta": meta(False), "model": args.model, "timing": timing,
                               "held_out": {"counterfact_train": f"records {len(cf) - 1000}-{len(cf) - 1}",
                                            "zsre_train_1k": f"{len(zs_held)} of {len(zs_anchors)} records"},
                               "rows": rows}, indent=1) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
