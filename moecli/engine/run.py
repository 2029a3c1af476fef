"""The engine: one path through records → frozen model + bypass → checkpoint → evaluation → report.

The CLI builds a `RunSpec` and calls `run_edits`; nothing here prints. Progress goes through a
callback. Checkpoints are saved atomically after every batch, with the stream position, so an
interrupted run resumes where it stopped and ends with the same adapter as an uninterrupted one
(each batch reseeds from `seed` and its index, so randomness does not depend on where a run
started).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import torch

from moecli.data.records import EditRecord
from moecli.engine.adapters import checked_checkpoint, evaluate_edited, restore_method, seed_everything
from moecli.engine.checkpoint import (
    Checkpoint,
    checkpoint_exists,
    resolve_adapter_dir,
    save_checkpoint,
)
from moecli.engine.evaluation import evaluate_records, unedited_evaluation
from moecli.engine.lock import RunLock
from moecli.engine.prepare import for_model
from moecli.errors import NonFiniteTensor, RunError, UserError
from moecli.fsutil import atomic_write_json
from moecli.methods import get_method
from moecli.methods.base import EditMethod, MethodConfig, config_from_dict
from moecli.model.loading import LoadedModel, find_target_module, fingerprint, load_model
from moecli.version import __version__

Progress = Callable[[str, int, int], None]


@dataclass
class RunSpec:
    """Everything one editing run needs; the CLI fills it from flags and the recipe."""

    command: str
    method: str
    config: MethodConfig
    records: list[EditRecord]
    batch_size: int
    out_dir: Path
    model_path: Path
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    seed: int = 0
    data: str | None = None
    data_format: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    adapter: Path | None = None
    eval_batch_size: int = 64
    generation: bool = True
    perplexity: bool = False
    evaluate_before: bool = True
    # False: edit and save only, no evaluation at all (a long stream is measured on samples of its own, e.g.
    # benchmarks/stream.py; evaluating every record of it would cost more than the editing)
    evaluate: bool = True
    protocol: str = "batch"
    eval_every: int = 0  # lifelong: also evaluate a fixed sample of edited records every K batches
    eval_sample: int = 100
    order: str = "file"
    chat: bool = False  # wrap every prompt in the model's chat template
    question_key: dict | None = None  # which question key routes (`calibration.auto_key`), set at the start

    def to_json(self) -> dict:
        """Everything needed to resume this run (records inline, so the data file may move)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["config"] = dataclasses.asdict(self.config)
        d["records"] = [r.to_dict() for r in self.records]
        # Absolute paths: `--resume` may be run from another directory than the interrupted run.
        for k in ("out_dir", "model_path", "adapter"):
            d[k] = str(Path(d[k]).absolute()) if d[k] is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> RunSpec:
        d = dict(d)
        cls_m = get_method(d["method"])
        d["config"] = config_from_dict(cls_m.config_class, d["config"], "run.json")
        d["records"] = [EditRecord.from_dict(r) for r in d["records"]]
        for k in ("out_dir", "model_path", "adapter"):
            d[k] = Path(d[k]) if d.get(k) else None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _records_key(records: list[EditRecord]) -> list[str]:
    return [r.id for r in records]


def build_method(loaded: LoadedModel, method: str, config: MethodConfig, seed: int) -> EditMethod:
    return get_method(method)(loaded, config, seed)


def _save(spec: RunSpec, method: EditMethod, loaded_fp: dict, ledger: list[dict], position: int,
          n_batches: int, timings: dict, retention: list[dict], offset: int = 0,
          history: list[dict] | None = None) -> Path:
    config, tensors, files = method.export_state()
    manifest = {
        "format_version": 1,
        "moecli_version": __version__,
        "base_model": {"path": str(spec.model_path), "fingerprint": loaded_fp},
        "command": spec.command, "method": spec.method, "seed": spec.seed, "recipe": spec.recipe,
        "data": spec.data, "data_format": spec.data_format, "batch_size": spec.batch_size,
        "stream": {"position": position, "n_batches": n_batches, "record_ids": _records_key(spec.records),
                   "batch_offset": offset},
        "history": history or [], "timings": timings, "retention": retention,
        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        return save_checkpoint(spec.out_dir / "adapter", Checkpoint(config, tensors, manifest, ledger, files))
    except NonFiniteTensor as exc:  # checked on what is written: the tensors every method exports
        diverged(f"weight {exc.name}", offset + position - 1, spec.out_dir)
    except OSError as exc:  # a full disk, a quota, a read-only mount: the previous checkpoint is intact
        fix = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
        raise RunError(
            f"cannot save the checkpoint {spec.out_dir / 'adapter'}: {exc.strerror or exc}; "
            f"{saved_so_far(spec.out_dir)}; {fix}, then run `moecli lifelong --resume {spec.out_dir}`"
        ) from exc


def check_continuation(ckpt: Checkpoint, spec: RunSpec, adapter: Path) -> None:
    """Refuse what continuing `adapter` with `spec` cannot do: another method (the adapter's tensors are that
    method's), or an id the adapter already holds (revert --id and the locality baseline go by id)."""
    made_with = ckpt.config.get("method")
    if made_with is not None and made_with != spec.method:
        raise UserError(f"--method {spec.method}: --adapter {adapter} is a {made_with} adapter; continue it with "
                        f"--method {made_with} (or leave --method out), or start a new adapter")
    held = {e.get("id") for e in ckpt.ledger}
    for rec in spec.records:
        if rec.id in held:
            raise UserError(f"{spec.data or 'records'}: id {rec.id!r} is already an edit of --adapter {adapter}; "
                            f"give the new record another id")


def _history_entry(manifest: dict, adapter: Path, n_edits: int) -> dict:
    """What a continued adapter was before this run: kept in the manifest's `history`, oldest first."""
    return {"adapter": str(Path(adapter).absolute()), "command": manifest.get("command"),
            "data": manifest.get("data"), "saved": manifest.get("saved"), "n_edits": n_edits,
            "batches": manifest.get("stream", {}).get("batch_offset", 0) + manifest.get("stream", {}).get(
                "position", 0), "reverts": len(manifest.get("reverts", []))}


def check_finite(stats: dict, batch: int, out_dir: Path) -> None:
    """Stop a run whose training diverged (an infinite lr, an overflow in half precision) before it saves:
    a non-finite loss or weight would be written as an adapter that answers NaN to every routed input."""
    loss = stats.get("loss")
    if isinstance(loss, (int, float)) and not math.isfinite(loss):
        diverged(f"loss {loss}", batch, out_dir)


def diverged(what: str, batch: int, out_dir: Path) -> NoReturn:
    raise RunError(f"training diverged in batch {batch}: non-finite {what}; nothing of that batch is saved, "
                   f"{saved_so_far(out_dir)}; lower --lr and start again")


def saved_so_far(out_dir: Path) -> str:
    """What the last good checkpoint in `out_dir` holds, in words, for messages after a failure."""
    try:
        manifest = json.loads((Path(out_dir) / "adapter" / "manifest.json").read_text(encoding="utf-8"))
        stream = manifest["stream"]
        return f"the last checkpoint (batch {int(stream['position'])} of {int(stream['n_batches'])}) is intact"
    except (OSError, ValueError, KeyError, TypeError):
        return "no checkpoint is saved yet"


RUN_FILE = "run.json"


def load_run_spec(out_dir: str | Path) -> RunSpec:
    """The spec of an earlier (interrupted) run in `out_dir`, for `--resume`."""
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        raise UserError(f"--resume {out_dir}: no {RUN_FILE} here (not a moecli run directory)")
    try:
        spec = RunSpec.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume {out_dir}: {RUN_FILE} is damaged ({exc})") from None
    spec.out_dir = Path(out_dir)  # the directory as it is now: a run directory may have been moved
    return spec


def _sample(records: list[EditRecord], n: int, seed: int) -> list[EditRecord]:
    if len(records) <= n:
        return list(records)
    rng = random.Random(seed)
    keep = sorted(rng.sample(range(len(records)), n))
    return [records[i] for i in keep]


def run_edits(spec: RunSpec, progress: Progress | None = None, resume: bool = False) -> dict:
    """Apply `spec.records` in batches, saving after each; evaluate before and after; return the report."""
    t0 = time.perf_counter()
    seed_everything(spec.seed)
    loaded = load_model(spec.model_path, spec.device, spec.dtype, spec.device_map)
    base_fp = fingerprint(loaded.model)
    model, tok = loaded.model, loaded.tokenizer
    timings: dict[str, float] = {"load": time.perf_counter() - t0}
    records = for_model(loaded, spec.records, chat=spec.chat, data=spec.data)
    layer = getattr(spec.config, "layer", None)
    if not resume and spec.adapter is None and layer is not None:
        find_target_module(model, layer)  # a bad --layer is refused before anything is written
    # The checkpoint to continue is read and checked before minutes of evaluation, not after them;
    # the run's own checkpoint (--resume) under the lock, so that no other run is writing it.
    resuming = resume and checkpoint_exists(spec.out_dir / "adapter")
    continue_from = spec.out_dir / "adapter" if resuming else spec.adapter
    option = "--resume" if resuming else "--adapter"
    ckpt = None
    if continue_from is not None and not resuming:
        continue_from = resolve_adapter_dir(continue_from, option)
        ckpt = checked_checkpoint(continue_from, base_fp, option)
        check_continuation(ckpt, spec, continue_from)
    with RunLock(spec.out_dir):
        if resuming:
            ckpt = checked_checkpoint(continue_from, base_fp, option)
        if not resume and spec.order == "planned":
            from moecli.engine.planning import plan_batches

            spec.records = plan_batches(spec.records, spec.batch_size, loaded=loaded, seed=spec.seed).records()
            records = for_model(loaded, spec.records, chat=spec.chat, data=spec.data)
        if not resume:
            if continue_from is None:  # a first run on a real model without a key calibrates one (once per model)
                from moecli.engine.calibration import auto_key

                spec.question_key = auto_key(loaded, spec.config, base_fp, progress)
                if "seconds" in spec.question_key:
                    timings["question_key"] = spec.question_key["seconds"]
            else:
                spec.question_key = {"source": "adapter", "path": str(continue_from)}
            spec.config.resolve(model, base_fp, spec.batch_size)  # `auto` options, as the method will use them
            try:
                atomic_write_json(spec.out_dir / RUN_FILE, spec.to_json())
            except OSError as exc:
                raise RunError(f"cannot write {spec.out_dir / RUN_FILE}: {exc.strerror or exc}") from exc
        t = time.perf_counter()
        unedited = None
        baseline = before = None
        if spec.evaluate:
            # Locality prompts without an answer are scored where the unedited model's own answer stands.
            unedited = unedited_evaluation(model, tok, records, base_fp, batch_size=spec.eval_batch_size,
                                           generation=spec.generation, perplexity=spec.perplexity,
                                           before=spec.evaluate_before, progress=progress)
            records, baseline, before = unedited.records, unedited.baseline, unedited.before
        batches = [records[i : i + spec.batch_size] for i in range(0, len(records), spec.batch_size)]
        timings["evaluate_before"] = time.perf_counter() - t
        ledger: list[dict] = []
        retention: list[dict] = []
        history: list[dict] = []
        sample = _sample(records, spec.eval_sample, spec.seed)
        start = offset = 0  # offset: batches the adapter held before this run (a continued adapter)
        earlier = 0.0  # seconds the processes before a resumed one spent on this run, up to their last save
        if continue_from is not None:
            method, ckpt = restore_method(loaded, continue_from, base_fp, option, ckpt)
            # A continued adapter keeps its whole ledger and history, so that show, ask (routes are ledger
            # rows) and revert see the earlier edits; a resumed run also finds its own batches in them.
            ledger = list(ckpt.ledger)
            history = list(ckpt.manifest.get("history", []))
            stream = ckpt.manifest.get("stream", {})
            if resuming:
                if stream.get("record_ids") != _records_key(spec.records):
                    raise UserError(f"--resume {spec.out_dir}: the records differ from the interrupted run's")
                start = int(stream.get("position", 0))
                offset = int(stream.get("batch_offset", 0))
                retention = list(ckpt.manifest.get("retention", []))
                # the interrupted process's part of the run: its edits, its key's calibration, its time so far
                kept = ckpt.manifest.get("timings", {})
                timings.update({k: v for k, v in kept.items() if k.startswith("edit") or k == "question_key"})
                earlier = float(kept.get("total", 0.0))
            else:
                offset = 1 + max((int(e.get("batch", -1)) for e in ledger), default=-1)
                history.append(_history_entry(ckpt.manifest, continue_from, len(ledger)))
        else:
            method = build_method(loaded, spec.method, spec.config, spec.seed)
        t = time.perf_counter()
        for b in range(start, len(batches)):
            torch.manual_seed(spec.seed * 1_000_003 + offset + b)
            stats = method.apply_batch(batches[b], offset + b, progress)
            check_finite(stats, offset + b, spec.out_dir)
            for i, r in enumerate(batches[b]):
                ledger.append({"id": r.id, "prompt": r.prompt, "target": r.target, "subject": r.subject,
                               "batch": offset + b, "expert": method.expert_of(i),
                               **{f"train_{k}": v for k, v in stats.items()}})
            timings["edit"] = timings.get("edit", 0.0) + (time.perf_counter() - t)
            t = time.perf_counter()
            if spec.evaluate and spec.eval_every and ((b + 1) % spec.eval_every == 0 or b + 1 == len(batches)):
                seen = {r.id for batch in batches[: b + 1] for r in batch}
                part = [r for r in sample if r.id in seen]
                summ = evaluate_records(model, tok, part, baseline, batch_size=spec.eval_batch_size,
                                        generation=False).summary
                retention.append({"step": b + 1, "n_edited": len(seen), **{k: summ.get(k) for k in
                                                                            ("rel", "gen", "loc", "avg")}})
                t = time.perf_counter()
            timings["total"] = earlier + time.perf_counter() - t0
            _save(spec, method, base_fp, ledger, b + 1, len(batches), timings, retention, offset, history)
            if progress:
                progress("batches", b + 1, len(batches))
        t = time.perf_counter()
        summary: dict = {}
        per_edit: list[dict] = []
        if spec.evaluate:
            after = evaluate_edited(method, records, baseline, batch_size=spec.eval_batch_size, ledger=ledger,
                                    generation=spec.generation, perplexity=spec.perplexity, progress=progress)
            summary, per_edit = after.summary, after.per_edit
            timings["evaluate_after"] = time.perf_counter() - t
        timings["total"] = earlier + time.perf_counter() - t0
    columns = {"before": before.summary} if before else {}
    if spec.evaluate:
        columns["after"] = summary
    return {
        "command": spec.command, "moecli_version": __version__, "model": str(spec.model_path),
        "data": spec.data, "format": spec.data_format, "method": spec.method, "protocol": spec.protocol,
        "n_edits": len(spec.records), "batch_size": spec.batch_size, "n_batches": len(batches), "seed": spec.seed,
        "config": dataclasses.asdict(spec.config), "adapter": str(spec.out_dir / "adapter"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "timings": timings,
        "columns": columns, "summary": summary, "per_edit": per_edit, "order": spec.order,
        "retention": retention, "chat": spec.chat, "question_key": spec.question_key,
        "unedited_from_cache": unedited.cached if unedited else None,  # the unedited answers were read, not computed
    }


