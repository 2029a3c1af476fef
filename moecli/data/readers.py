"""Readers and writers for the record formats people already have: ZsRE, CounterFact (EasyEdit and ROME),
WISE hallucination and moecli JSONL.

Design notes (why it looks like this):
- The container (a JSON list, `{"data": [...]}`, or JSON lines) is parsed separately from the record
  schema, so any schema can sit in any container: a `.jsonl` of ZsRE records reads the same way as
  the usual ZsRE `.json` list.
- Every problem the user can fix becomes a `UserError` whose message starts with
  `"{path}:record {n}:"` (n is 1-based), so one line on stderr is enough to find and fix it.
  With `skip_invalid=True` the same messages are collected instead of raised.
- Readers map fields one-to-one and never "repair" data beyond what the benchmark authors'
  own loaders do (ZsRE `alt` is stripped, as in EasyEdit/ROME); everything else is kept verbatim so
  numbers stay comparable with published results.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecli.data.containers import BadRecord, iter_rows
from moecli.data.records import EditRecord, LocalityPair, PortabilityPair, json_type, validate_record
from moecli.errors import UserError
from moecli.fsutil import atomic_write_bytes

FORMATS = ("zsre", "counterfact", "counterfact-rome", "hallucination", "jsonl")


# The fields that identify each format, in the order detection tries them. Shown to the user when
# detection fails, so they can see what a file of each format looks like.
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "zsre": ("src", "alt"),
    "counterfact-rome": ("requested_rewrite",),
    "counterfact": ("prompt", "target_new", "rephrase_prompt"),
    "hallucination": ("prompt", "target_new"),
    "jsonl": ("prompt", "target"),
}
# Fields that only CounterFact (EasyEdit) has next to `prompt`/`target_new`; WISE hallucination
# records have none of them.
_COUNTERFACT_ONLY = ("rephrase_prompt", "ground_truth", "case_id")


@dataclass
class ReadResult:
    """What `read_records` found: the records plus an account of what was left out and why."""

    records: list[EditRecord]
    format: str  # the detected or forced format
    skipped: int  # records skipped (invalid with skip_invalid=True, or ZsRE empty alt)
    problems: list[str]  # one message per skipped record, "file:record N: what is wrong"




class _SkipRecord(Exception):
    """A record that the format itself says to leave out (ZsRE with an empty `alt`): not an error."""




# --------------------------------------------------------------------------------------------
# Field access helpers: they raise BadRecord with the exact field name as it is in the file.


def _req_str(obj: dict, key: str, where: str = "") -> str:
    try:
        value = obj[key]
    except KeyError:
        raise BadRecord(f"missing required field '{where}{key}'") from None
    if type(value) is not str:  # exact type check: fast, and JSON only produces plain str
        raise BadRecord(f"field '{where}{key}' must be a string, got {json_type(value)}")
    return value


def _opt_str(obj: dict, key: str, where: str = "") -> str | None:
    value = obj.get(key)
    if value is None or type(value) is str:
        return value
    raise BadRecord(f"field '{where}{key}' must be a string, got {json_type(value)}")


def _str_or_list(obj: dict, key: str) -> list[str]:
    """A field that is one string or a list of strings (EasyEdit uses both), as a list."""
    value = obj.get(key)
    if value is None:
        return []
    if type(value) is str:
        return [value]
    if type(value) is list and all(type(v) is str for v in value):
        return value
    raise BadRecord(f"field '{key}' must be a string or a list of strings, got {json_type(value)}")


def _obj(obj: dict, key: str, where: str = "") -> dict:
    try:
        value = obj[key]
    except KeyError:
        raise BadRecord(f"missing required field '{where}{key}'") from None
    if type(value) is not dict:
        raise BadRecord(f"field '{where}{key}' must be an object, got {json_type(value)}")
    return value


def _locality_pairs(obj: dict, pkey: str, akey: str, group: str) -> list[LocalityPair]:
    """Locality from a prompt field and an answer field (both strings, or equal-length lists)."""
    prompts = _str_or_list(obj, pkey)
    answers = _str_or_list(obj, akey)
    if len(prompts) != len(answers):
        if not answers:
            raise BadRecord(f"field '{pkey}' is given but '{akey}' is missing")
        if not prompts:
            raise BadRecord(f"field '{akey}' is given but '{pkey}' is missing")
        raise BadRecord(f"fields '{pkey}' and '{akey}' have different lengths ({len(prompts)} vs {len(answers)})")
    return [LocalityPair(p, a, group) for p, a in zip(prompts, answers)]


def _case_id(obj: dict) -> str:
    value = obj.get("case_id")
    if value is None:
        return ""
    if type(value) is int or type(value) is str:
        return str(value)
    raise BadRecord(f"field 'case_id' must be a number or a string, got {json_type(value)}")


# --------------------------------------------------------------------------------------------
# One function per format: raw JSON object -> EditRecord (types checked, semantics checked later).


def _from_zsre(obj: dict) -> EditRecord:
    prompt = _req_str(obj, "src")
    target = _req_str(obj, "alt").strip()  # 67 of 3,000 real `alt` have stray spaces; EasyEdit strips
    if not target:
        raise _SkipRecord("empty target ('alt' is blank); skipped as ZsRE readers do")
    answers = obj.get("answers")
    ground_truth = None
    if answers is not None:
        if type(answers) is not list or not all(type(a) is str for a in answers):
            raise BadRecord(f"field 'answers' must be a list of strings, got {json_type(answers)}")
        ground_truth = answers[0] if answers else None
    rephrase = _opt_str(obj, "rephrase")
    # Keep the "nq question: " prefix: EasyEdit feeds it to the model as is, so locality numbers
    # only line up with published ones if we do the same.
    locality = _locality_pairs(obj, "loc", "loc_ans", "nq")
    return EditRecord(
        prompt=prompt,
        target=target,
        subject=_opt_str(obj, "subject"),
        ground_truth=ground_truth,
        rephrases=[rephrase] if rephrase is not None else [],
        locality=locality,
    )


def _from_counterfact(obj: dict) -> EditRecord:
    return EditRecord(
        prompt=_req_str(obj, "prompt"),
        target=_req_str(obj, "target_new"),
        subject=_opt_str(obj, "subject"),
        ground_truth=_opt_str(obj, "ground_truth"),
        rephrases=_str_or_list(obj, "rephrase_prompt"),
        locality=_locality_pairs(obj, "locality_prompt", "locality_ground_truth", "neighborhood"),
        id=_case_id(obj),
    )


def _from_counterfact_rome(obj: dict) -> EditRecord:
    rw = _obj(obj, "requested_rewrite")
    where = "requested_rewrite."
    template = _req_str(rw, "prompt", where)
    subject = _req_str(rw, "subject", where)
    if "{}" not in template:
        raise BadRecord("field 'requested_rewrite.prompt' has no '{}' where the subject goes")
    target = _req_str(_obj(rw, "target_new", where), "str", where + "target_new.")
    true = None
    if rw.get("target_true") is not None:
        true = _req_str(_obj(rw, "target_true", where), "str", where + "target_true.")
    rephrases = _opt_str_list(obj, "paraphrase_prompts")
    neighbours = _opt_str_list(obj, "neighborhood_prompts")
    if neighbours and true is None:
        raise BadRecord("field 'neighborhood_prompts' needs 'requested_rewrite.target_true.str' as answer")
    return EditRecord(
        # str.replace, not str.format: a template may contain other braces.
        prompt=template.replace("{}", subject),
        target=target,
        subject=subject,
        ground_truth=true,
        rephrases=rephrases,
        locality=[LocalityPair(p, true or "", "neighborhood") for p in neighbours],
        id=_case_id(obj),
    )


def _opt_str_list(obj: dict, key: str) -> list[str]:
    value = obj.get(key)
    if value is None:
        return []
    if type(value) is list and all(type(v) is str for v in value):
        return value
    raise BadRecord(f"field '{key}' must be a list of strings, got {json_type(value)}")


def _from_hallucination(obj: dict) -> EditRecord:
    # WISE's hallucination set has no rephrases and no old answer; its Temporal set (same fields) has
    # `ood_rephrase`, a rephrasing. 12 real hallucination records have an empty
    # `locality_ground_truth`; they are kept (WISE keeps them too) and scored against the base model.
    return EditRecord(
        prompt=_req_str(obj, "prompt"),
        target=_req_str(obj, "target_new"),
        subject=_opt_str(obj, "subject"),
        rephrases=_str_or_list(obj, "ood_rephrase"),
        locality=_locality_pairs(obj, "locality_prompt", "locality_ground_truth", "web"),
    )


def _pairs(obj: dict, key: str, cls: type[LocalityPair] | type[PortabilityPair]) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if type(value) is not list:
        raise BadRecord(f"field '{key}' must be a list of objects, got {json_type(value)}")
    out = []
    for i, item in enumerate(value, 1):
        if type(item) is not dict:
            raise BadRecord(f"field '{key}' item {i} must be an object, got {json_type(item)}")
        where = f"{key}[{i}]."
        group = _opt_str(item, "group", where)
        pair = cls(_req_str(item, "prompt", where), _req_str(item, "answer", where))
        if group is not None:
            pair.group = group
        out.append(pair)
    return out


def _from_jsonl(obj: dict) -> EditRecord:
    rid = obj.get("id")
    if rid is None:
        rid = ""
    elif type(rid) is int:
        rid = str(rid)
    elif type(rid) is not str:
        raise BadRecord(f"field 'id' must be a string, got {json_type(rid)}")
    return EditRecord(
        prompt=_req_str(obj, "prompt"),
        target=_req_str(obj, "target"),
        subject=_opt_str(obj, "subject"),
        ground_truth=_opt_str(obj, "ground_truth"),
        rephrases=_opt_str_list(obj, "rephrases"),
        locality=_pairs(obj, "locality", LocalityPair),
        portability=_pairs(obj, "portability", PortabilityPair),
        id=rid,
    )


_READERS: dict[str, Callable[[dict], EditRecord]] = {
    "zsre": _from_zsre,
    "counterfact": _from_counterfact,
    "counterfact-rome": _from_counterfact_rome,
    "hallucination": _from_hallucination,
    "jsonl": _from_jsonl,
}


# --------------------------------------------------------------------------------------------
# Public API


def detect_format(obj: dict) -> str | None:
    """The format a raw record belongs to, judged from its field names; None if none fits.

    Only field names are looked at (not values), so a record with a wrong value still gets a
    precise "field X must be ..." message from its reader instead of a vague "unknown format".
    """
    if not isinstance(obj, dict):
        return None
    if "src" in obj and "alt" in obj:
        return "zsre"
    if "requested_rewrite" in obj:
        return "counterfact-rome"
    if "prompt" in obj and "target_new" in obj:
        if any(k in obj for k in _COUNTERFACT_ONLY):
            return "counterfact"
        return "hallucination"
    if "prompt" in obj and "target" in obj:
        return "jsonl"
    return None



def read_records(
    path: str | Path,
    format: str | None = None,
    *,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> ReadResult:
    """Read edit records from a ZsRE, CounterFact, WISE hallucination or moecli JSONL file.

    `format` (one of FORMATS) overrides detection, which looks at the first record's fields.
    Invalid records raise `UserError("{path}:record {n}: ...")`, or with `skip_invalid=True` are
    skipped and described in `problems`. ZsRE records with a blank `alt` are always skipped and
    counted (that is what the reference loaders do), never an error. `limit` stops after that many
    valid records.
    """
    if format is not None and format not in _READERS:
        raise UserError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")
    if limit is not None and limit < 0:
        raise UserError(f"limit must be 0 or more, got {limit}")
    name = str(path)
    from moecli.data.tables import is_table_source, iter_table

    raw = iter_table(name) if is_table_source(name) else iter_rows(Path(path), name)

    records: list[EditRecord] = []
    problems: list[str] = []
    reader: Callable[[dict], EditRecord] | None = _READERS[format] if format else None
    fmt = format
    seen: dict[str, int] = {}  # id -> record number: the locality baseline and `revert --id` go by id
    for n, obj in raw:
        if limit is not None and len(records) >= limit:
            break
        try:
            if isinstance(obj, BadRecord):
                raise obj
            if type(obj) is not dict:
                raise BadRecord(f"expected a JSON object, got {json_type(obj)}")
            if reader is None:
                fmt = detect_format(obj)
                if fmt is None:
                    raise UserError(_detect_failure(name, n, obj))
                reader = _READERS[fmt]
            rec = reader(obj)
            problem = validate_record(rec)
            if problem is not None:
                raise BadRecord(problem)
            if rec.id in seen:
                raise BadRecord(
                    f"duplicate id {rec.id!r} (record {seen[rec.id]} has it too; a record without an id"
                    " gets one from its prompt and target); ids must be unique"
                )
        except _SkipRecord as skip:
            problems.append(f"{name}:record {n}: {skip}")
            continue
        except BadRecord as bad:
            message = f"{name}:record {n}: {bad}"
            if not skip_invalid:
                raise UserError(message) from None
            problems.append(message)
            continue
        seen[rec.id] = n
        records.append(rec)

    if fmt is None:
        if limit == 0:
            fmt = _peek_format(Path(path), name) if not is_table_source(name) else detect_format(next(raw)[1])
        else:
            # Every record was skipped before one could be recognised (only with skip_invalid).
            raise UserError(f"{name}: no record of a known format found ({len(problems)} invalid records)")
    return ReadResult(records=records, format=fmt, skipped=len(problems), problems=problems)


def write_jsonl(records: Iterable[EditRecord], path: str | Path) -> None:
    """Write records as moecli JSONL, atomically.

    The lines go to a temporary file next to `path` which then replaces it with `os.replace`, so
    an interrupted or failing write never leaves a half-written file behind (nor clobbers an
    existing one). Non-ASCII text is written as UTF-8 for readability; a string that cannot be
    encoded (a lone surrogate read from a `\\ud800` escape) falls back to `\\u` escapes.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # `--out new/dir/x.jsonl` works
    except OSError as e:
        raise UserError(f"{path}: cannot create directory {str(target.parent)!r}: {e.strerror or e}") from None
    lines = []
    for rec in records:
        d = rec.to_dict()
        try:
            lines.append(json.dumps(d, ensure_ascii=False).encode("utf-8"))
        except UnicodeEncodeError:
            lines.append(json.dumps(d).encode("ascii"))
    try:
        atomic_write_bytes(target, b"".join(line + b"\n" for line in lines))
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from e


def _peek_format(path: Path, name: str) -> str:
    """The detected format when limit=0 stopped before any record was looked at."""
    for n, obj in iter_rows(path, name):
        fmt = detect_format(obj) if type(obj) is dict else None
        if fmt is None:
            raise UserError(_detect_failure(name, n, obj))
        return fmt
    raise UserError(f"{name}: contains no records")  # pragma: no cover - iter_rows raises first


def _detect_failure(name: str, n: int, obj: Any) -> str:
    """Say which fields were seen, which formats exist, and what the closest one lacks."""
    if type(obj) is not dict:
        return f"{name}:record {n}: expected a JSON object, got {json_type(obj)}"
    seen = ", ".join(repr(k)[1:-1] for k in sorted(obj)) or "none"  # repr: a key with a newline stays one line
    closest = max(_SIGNATURES, key=lambda f: sum(k in obj for k in _SIGNATURES[f]))
    missing = [k for k in _SIGNATURES[closest] if k not in obj]
    hint = ""
    if len(missing) < len(_SIGNATURES[closest]):  # shares at least one field with a format
        hint = f"closest is {closest}, missing field {', '.join(repr(k) for k in missing)}; "
    known = "; ".join(f"{f} ({', '.join(keys)})" for f, keys in _SIGNATURES.items())
    return (
        f"{name}:record {n}: cannot tell the format from the fields (seen: {seen}); "
        f"{hint}known formats: {known}; choose one with --format"
    )
