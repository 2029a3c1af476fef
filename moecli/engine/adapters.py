"""Saved adapters: read one back onto its base model (refusing a foreign one), ask it, revert edits in it,
and say where its edits route."""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime, timezone
from pathlib import Path

import torch

from moecli.data.records import EditRecord
from moecli.engine.checkpoint import (
    Checkpoint,
    checkpoint_exists,
    load_checkpoint,
    resolve_adapter_dir,
    save_checkpoint,
)
from moecli.engine.evaluation import Baseline, EvalReport, evaluate_records
from moecli.engine.lock import RunLock
from moecli.errors import UserError
from moecli.methods import get_method
from moecli.methods.base import EditMethod, MethodConfig, config_from_dict
from moecli.model.loading import LoadedModel, fingerprint, fingerprints_match, load_model


def checked_checkpoint(adapter_dir: str | Path, base_fp: dict, option: str = "--adapter") -> Checkpoint:
    """Load the checkpoint at `adapter_dir`, refusing one made for another base model than `base_fp`.

    Called before any evaluation starts, so a wrong adapter is reported at once, not after the
    minutes a baseline takes on a large model. `option` names the flag that gave the checkpoint.
    """
    ckpt = load_checkpoint(adapter_dir, option)
    saved_fp = ckpt.manifest.get("base_model", {}).get("fingerprint")
    if saved_fp is not None and not fingerprints_match(saved_fp, base_fp):
        raise UserError(
            f"{option} {adapter_dir}: made for another base model "
            f"({ckpt.manifest.get('base_model', {}).get('path', '?')}); load it onto that model"
        )
    return ckpt


# What an adapter that does not name an option was made with (the option came later, with another default).
_LEGACY_DEFAULTS: dict[str, dict] = {
    "memoe": {"query_feature": "input"},
    "lemoe": {"query_feature": "input"},
    "scen": {"query_feature": "input", "scope": False},
}


def adapter_method_config(ckpt: Checkpoint, adapter_dir: str | Path,
                          option: str = "--adapter") -> tuple[str, MethodConfig]:
    """The method name and config an adapter was made with, as its adapter_config.json says."""
    cfg = dict(ckpt.config)
    name = cfg.pop("method", None)
    if name is None:
        raise UserError(f"{option} {adapter_dir}: adapter_config.json names no method")
    cls = get_method(name)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    for key, value in _LEGACY_DEFAULTS.get(name, {}).items():  # adapters written before the key existed
        if key in fields:
            cfg.setdefault(key, value)
    config = config_from_dict(cls.config_class, {k: v for k, v in cfg.items() if k in fields}, str(adapter_dir))
    checked = config
    if getattr(config, "query_feature", None) == "learned" and not Path(config.question_encoder or "").is_file():
        # the adapter carries its own copy of the question key: the file it was made from may be gone
        checked = dataclasses.replace(config, query_feature="output")
    try:
        checked.validate()
    except UserError as exc:
        raise UserError(f"{option} {adapter_dir}: adapter_config.json: {exc}") from None
    return name, config


def check_expert_count(ckpt: Checkpoint, adapter_dir: str | Path, option: str) -> None:
    """A bypass adapter's `n_experts` must be the number of experts its tensors hold: a hand-edited count
    (say 1e9) would otherwise make the load build experts until memory or patience runs out."""
    n = ckpt.config.get("n_experts")
    if n is None:
        return
    stored = {k.split(".")[1] for k in ckpt.tensors if k.startswith("experts.")}
    if not isinstance(n, int) or isinstance(n, bool) or n != len(stored):
        raise UserError(f"{option} {adapter_dir}: adapter_config.json says n_experts {n!r} but "
                        f"adapter_model.safetensors holds {len(stored)} experts; the checkpoint is damaged")


def restore_method(loaded: LoadedModel, adapter_dir: str | Path, base_fp: dict | None = None,
                   option: str = "--adapter", ckpt: Checkpoint | None = None) -> tuple[EditMethod, Checkpoint]:
    """Rebuild a method from a checkpoint onto `loaded`, refusing one made for another base model.

    `ckpt`: the checkpoint already read by `checked_checkpoint` (else it is read here).
    """
    if ckpt is None:
        ckpt = checked_checkpoint(adapter_dir, base_fp or fingerprint(loaded.model), option)
    name, config = adapter_method_config(ckpt, adapter_dir, option)
    check_expert_count(ckpt, adapter_dir, option)
    method = get_method(name)(loaded, config, ckpt.manifest.get("seed", 0))
    method.load_state(ckpt.config, ckpt.tensors, ckpt.files)
    return method, ckpt


def load_edited(model, adapter_dir: str | Path, tokenizer=None, checkpoint: Checkpoint | None = None) -> EditMethod:
    """Python API: put a saved adapter onto `model` (a `LoadedModel`, or a HF model + tokenizer).

    Returns the method object; `.remove()` takes the adapter out again. `checkpoint`: the adapter
    already read and checked with `checked_checkpoint` (else it is read here).
    """
    if not isinstance(model, LoadedModel):
        if tokenizer is None:
            raise UserError("load_edited: pass the tokenizer with a plain Hugging Face model")
        emb = model.get_input_embeddings().weight
        model = LoadedModel(model=model, tokenizer=tokenizer, path=Path(getattr(model, "name_or_path", "") or "."),
                            family=model.config.model_type, device=emb.device, dtype=emb.dtype)
    method, _ = restore_method(model, resolve_adapter_dir(adapter_dir), ckpt=checkpoint)
    return method


def ask_model(model_path: str | Path, prompts: list[str], adapter: Path | None = None, *, max_new_tokens: int = 16,
              sample: bool = False, chat: bool = False, device: str = "auto", dtype: str = "auto",
              seed: int = 0) -> list[dict]:
    """Generate an answer to each prompt with the base model and, given an adapter, with the edited one.

    Returns one row per prompt: `prompt`, `base`, and with an adapter `edited` and `route` (the ledger
    entry of the edit the prompt reached, or None).
    """
    from moecli.engine.evaluation import generate_ids
    from moecli.model.batching import chat_prompt, stop_token_ids

    loaded = load_model(model_path, device, dtype)
    tok = loaded.tokenizer
    texts = [chat_prompt(tok, p) for p in prompts] if chat else list(prompts)
    ckpt = checked_checkpoint(adapter, fingerprint(loaded.model)) if adapter is not None else None

    def answers() -> list[str]:
        seed_everything(seed)
        options = {"do_sample": True, "temperature": 1.0, "top_k": 0} if sample else {}
        ids = generate_ids(loaded.model, tok, texts, [max_new_tokens] * len(texts),
                           stop_ids=stop_token_ids(tok, loaded.model), **options)  # what `free_answers` stops at
        return [tok.decode(row, skip_special_tokens=True).strip() for row in ids]

    rows = [{"prompt": p, "base": a} for p, a in zip(prompts, answers())]
    if ckpt is not None:
        method = load_edited(loaded, adapter, checkpoint=ckpt)
        for row, answer, route in zip(rows, answers(), method.routes(texts)):
            entry = ckpt.ledger[route] if route is not None and route < len(ckpt.ledger) else None
            row["edited"] = answer
            row["route"] = {k: entry.get(k) for k in ("id", "prompt", "target", "batch")} if entry else None
    return rows


def revert_edits(adapter_dir: str | Path, ids: list[str], batches: list[int], out: Path | None = None,
                 option: str = "--adapter") -> dict:
    """Take edits back from an adapter without retraining the rest (see `EditMethod.revert_tensors`).

    The edits are named by id or by batch; the ledger keeps them, marked `reverted`, and the manifest
    records the revert. The checkpoint is rewritten atomically in place, or written to `out` (a new run
    directory) leaving the original untouched. Returns what was done.
    """
    adapter = resolve_adapter_dir(adapter_dir, option)
    ckpt = load_checkpoint(adapter, option)
    name = ckpt.config.get("method")
    if name is None:
        raise UserError(f"{adapter_dir}: adapter_config.json names no method")
    known = {e.get("id") for e in ckpt.ledger}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise UserError(f"--id {unknown[0]}: no such edit in {adapter} (see `moecli show {adapter_dir}`)")
    missing = [b for b in batches if not any(e.get("batch") == b for e in ckpt.ledger)]
    if missing:
        raise UserError(f"--batch {missing[0]}: no edit of {adapter} is in that batch")
    rows = [i for i, e in enumerate(ckpt.ledger) if (e.get("id") in ids or e.get("batch") in batches)
            and not e.get("reverted")]
    if not rows:
        raise UserError(f"{adapter_dir}: those edits are reverted already")
    tensors = get_method(name).revert_tensors(ckpt.config, ckpt.tensors, ckpt.ledger, rows)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ledger = [dict(e, reverted=when) if i in rows else e for i, e in enumerate(ckpt.ledger)]
    manifest = {k: v for k, v in ckpt.manifest.items() if k != "contents"}
    manifest["reverts"] = [*manifest.get("reverts", []), {"at": when, "ids": [ledger[i]["id"] for i in rows]}]
    run_dir = Path(out) if out is not None else adapter.parent
    target = run_dir / "adapter" if out is not None else adapter
    if out is not None and checkpoint_exists(target):
        raise UserError(f"--out {out} already holds an adapter; pick another --out")
    with RunLock(run_dir):
        save_checkpoint(target, Checkpoint(ckpt.config, tensors, manifest, ledger, ckpt.files))
    return {"adapter": str(target), "reverted": [ledger[i]["id"] for i in rows],
            "remaining": sum(1 for e in ledger if not e.get("reverted"))}


def evaluate_edited(method: EditMethod, records: list[EditRecord], baseline: Baseline, *, batch_size: int = 64,
                    ledger: list[dict] | None = None, **kwargs) -> EvalReport:
    """`evaluate_records` on the edited model, with the routing diagnosis in the summary.

    The locality prompts' routes come first: one that no edit reaches, for a method whose unreached inputs
    get exactly the base model's output (`EditMethod.leaves_unrouted_alone`), is not run again (its answers
    are the baseline's). The other prompts' routes are read off the teacher-forced pass that scores them
    (a teacher-forced input routes on its prompt, as generation does), so no prompt is run only to route."""
    loaded = method.loaded
    if not method.knows_routes():
        return evaluate_records(loaded.model, loaded.tokenizer, records, baseline, batch_size=batch_size, **kwargs)
    prompts, slots = _inputs(records)
    route_of: dict[str, int | None] = {}
    _route(method, [p for p, (_, kind, _) in zip(prompts, slots) if kind == "loc"], batch_size, route_of)
    unchanged: frozenset[str] = frozenset()
    if method.leaves_unrouted_alone():
        unchanged = frozenset(p for p, (_, kind, _) in zip(prompts, slots) if kind == "loc" and route_of[p] is None)

    def scored(batch_prompts: list[str]) -> None:
        route_of.update(zip(batch_prompts, method.last_routes(len(batch_prompts))))

    method.last_routes(0)  # forget what an earlier forward left
    # routed prompts are generated apart from the rest: an edit trained to stop after its answer ends its rows
    # in a few tokens, while a row no edit reaches runs on to the bound and would hold its batch there
    result = evaluate_records(loaded.model, loaded.tokenizer, records, baseline, batch_size=batch_size,
                              unchanged=unchanged, on_scored=scored,
                              group_of=lambda p: 0 if route_of.get(p) is not None else 1, **kwargs)
    _route(method, prompts, batch_size, route_of)  # any prompt the scoring did not run (none, as a rule)
    result.summary["routing"] = routing_diagnosis(records, result.per_edit, (slots, [route_of[p] for p in prompts]),
                                                  ledger)
    return result


def _inputs(records: list[EditRecord]) -> tuple[list[str], list[tuple[int, str, str | None]]]:
    """Every evaluated prompt and its slot (record, kind, locality group)."""
    prompts: list[str] = []
    slots: list[tuple[int, str, str | None]] = []
    for i, r in enumerate(records):
        prompts += [r.prompt, *r.rephrases, *(lp.prompt for lp in r.locality)]
        slots += [(i, "rel", None), *[(i, "gen", None)] * len(r.rephrases)]
        slots += [(i, "loc", lp.group) for lp in r.locality]
    return prompts, slots


def _route(method: EditMethod, prompts: list[str], batch_size: int, route_of: dict[str, int | None]) -> None:
    """Add the routes of `prompts` not yet in `route_of` (a prompt routes the same wherever it is asked)."""
    todo = list(dict.fromkeys(p for p in prompts if p not in route_of))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        route_of.update(zip(chunk, method.routes(chunk)))


def routing_diagnosis(records: list[EditRecord], per_edit: list[dict],
                      routes: tuple[list[tuple[int, str, str | None]], list[int | None]],
                      ledger: list[dict] | None = None) -> dict:
    """Where each evaluated input went (`routes`: the slots of `_inputs` and the edit each reached, None
    for none): its own edit, another edit, or none.

    Why: a lost rephrasing is either a routing miss or an expert that does not transfer, and a changed
    locality answer either a wrong route or an expert acting where it was not asked to; the per-edit rows
    get `route_rel`, `route_gen` and `route_loc` ("own", "other", "none"), and the summary the shares
    plus Gen among the rephrasings that reached their edit. `records` are in stream (ledger) order, or
    found in `ledger` by id (a record the adapter never edited has no "own" edit). Only for a method whose
    routes tell edits apart (not FT-L, LoRA, GRACE, LEMoE's kv router).
    """
    own_index = list(range(len(records)))
    if ledger is not None:
        index = {e.get("id"): n for n, e in enumerate(ledger)}
        own_index = [index.get(r.id) for r in records]
    slots, routes = routes
    where: dict[tuple[int, str], list[str]] = {}
    by_group: dict[str, list[str]] = {}
    for (i, kind, group), route in zip(slots, routes):
        verdict = "none" if route is None else "own" if route == own_index[i] else "other"
        where.setdefault((i, kind), []).append(verdict)
        if group is not None:
            by_group.setdefault(group, []).append(verdict)
    for i, row in enumerate(per_edit):
        row["route_rel"] = where.get((i, "rel"), [None])[0]
        row["route_gen"] = where.get((i, "gen"), [])
        row["route_loc"] = where.get((i, "loc"), [])

    def share(kind: str, value: str) -> float | None:
        got = [w for (_, k), ws in where.items() if k == kind for w in ws]
        return sum(w == value for w in got) / len(got) if got else None

    reached = [acc for row in per_edit for acc, w in zip(row.get("gen_each", []), row["route_gen"]) if w == "own"]
    missed = [acc for row in per_edit for acc, w in zip(row.get("gen_each", []), row["route_gen"]) if w != "own"]
    # a same_subject probe that reaches its own edit is the routing error entity routing makes
    return {"rel_own": share("rel", "own"), "gen_own": share("gen", "own"), "gen_other": share("gen", "other"),
            "loc_none": share("loc", "none"), "loc_other": share("loc", "other"), "loc_own": share("loc", "own"),
            **{f"loc_none:{g}": sum(w == "none" for w in ws) / len(ws) for g, ws in sorted(by_group.items())},
            "gen_when_reached": sum(reached) / len(reached) if reached else None,
            "gen_when_missed": sum(missed) / len(missed) if missed else None}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
