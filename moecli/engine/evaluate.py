"""`evaluate`'s job, the counterpart of `run.run_edits`: a model, bare or with an adapter, measured on records.

Without an adapter the unedited model is its own locality baseline (Loc = 1.0) and Known shows how well it
states the old facts; its answers come from the evaluation cache when they were computed before.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from moecli.data.records import EditRecord
from moecli.engine.adapters import checked_checkpoint, evaluate_edited, load_edited
from moecli.engine.evaluation import unedited_evaluation
from moecli.engine.prepare import for_model
from moecli.model.loading import fingerprint, load_model
from moecli.model.sources import Progress
from moecli.version import __version__


def evaluate_model(model_path: str | Path, records: list[EditRecord], *, data: str, data_format: str,
                   adapter: Path | None = None, device: str = "auto", dtype: str = "auto",
                   device_map: str | None = None, eval_batch_size: int = 64, generation: bool = True,
                   chat: bool = False, skipped: int = 0, seed: int = 0,
                   progress: Progress | None = None) -> dict:
    """Measure `records` on the model at `model_path` (with `adapter` put on it); return the report."""
    t0 = time.perf_counter()
    loaded = load_model(model_path, device=device, dtype=dtype, device_map=device_map)
    prepared = for_model(loaded, records, chat=chat, data=data)
    kwargs = dict(batch_size=eval_batch_size, generation=generation, perplexity=data_format == "hallucination")
    base_fp = fingerprint(loaded.model)
    if adapter is None:
        result = unedited_evaluation(loaded.model, loaded.tokenizer, prepared, base_fp, progress=progress,
                                     **kwargs).before
        columns = {"model": result.summary}
    else:
        ckpt = checked_checkpoint(adapter, base_fp)  # a wrong adapter: before minutes of evaluation
        # The locality baseline is the unedited model's output, taken before the adapter goes in.
        unedited = unedited_evaluation(loaded.model, loaded.tokenizer, prepared, base_fp, progress=progress,
                                       before=False, **kwargs)
        method = load_edited(loaded, adapter, checkpoint=ckpt)
        result = evaluate_edited(method, unedited.records, unedited.baseline, ledger=ckpt.ledger,
                                 progress=progress, **kwargs)
        columns = {"edited": result.summary}
    return {
        "command": "evaluate", "moecli_version": __version__, "model": str(loaded.path),
        "data": data, "format": data_format, "adapter": str(adapter) if adapter else None,
        "protocol": "evaluation of the unedited model" if adapter is None else "evaluation of an adapter", "chat": chat,
        "n_edits": len(records), "skipped": skipped, "seed": seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timings": {"total": time.perf_counter() - t0},
        "columns": columns, "summary": result.summary, "per_edit": result.per_edit,
    }
