"""The evaluation protocol, stated here once: Rel, Gen, Loc, Port, Known, teacher-forced and free generation.

Rel, Gen, Loc, Port and Known are teacher-forced (`prompt + " " + answer` fed once, argmax at each
answer position compared with the answer token), batched, and right-padded by `moecli.model.batching`, so
left- and right-padding tokenizers score identically. Locality compares against the *unedited* model's
argmax predictions, computed once before editing and kept in a `Baseline`.

**Free generation** (`generation=True`; the keys `*_free_*`), what the model says when asked, with
nothing of the answer given:
- decoding: greedy, batched (prompts sorted by length, left-padded, KV cache: HF `generate`), at most
  `FREE_NEW_TOKENS` (32) new tokens, stopping at the first stop token (`batching.stop_token_ids`: the
  tokenizer's end of sequence, the model's generation config's, the chat template's end of turn); the
  answer is the text before the stop, decoded without special tokens and stripped;
- per Rel and Gen prompt three verdicts on SQuAD-normalised text (`normalize_answer`: lower case, no
  punctuation, no articles a/an/the, single spaces): `exact`, the whole answer equals the target
  (the model said it and stopped); `clause`, the answer up to a clause break (`,` `;` `.` `:` `!` `?`
  or a line break, or its end) equals the target (it said it and ended the phrase: "Rome, where the
  ..." but not "Rome Rome Rome"); and `first`, the answer begins with the target at a word boundary
  (it said it first, whatever followed): `rel_free_exact`, `rel_free_clause`, `rel_free_first`, and the
  same for Gen;
- per locality prompt, `loc_free`: the free answer is the unedited model's, as text (the `Baseline`
  keeps the unedited model's free answers; the same prompts in the same batches, so an untouched
  prompt decodes bit for bit alike), also per group (`loc_free_by_group`).
The older `rel_em` / `gen_em` decode exactly as many tokens as the target has (they know its length)
and are kept for comparison.

The evaluator knows nothing about adapters: an edited model routes its own inputs (the bypass
computes anchors from the input ids), so the same code scores a base model and an edited one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import string
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moecli.data import probes
from moecli.data.records import EditRecord
from moecli.model import batching
from moecli.model.batching import answer_logits, collate, encode_pair, encode_prompt, pad_id_of, stop_token_ids

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): the engine reports, the CLI draws."""

SUMMARY_KEYS = ("rel", "gen", "loc", "avg", "n_edits")


@dataclass
class Scored:
    """Teacher-forced result of one (prompt, answer) pair."""

    preds: list[int]
    answer: list[int]
    nll: float

    @property
    def accuracy(self) -> float:
        return sum(p == a for p, a in zip(self.preds, self.answer)) / max(len(self.answer), 1)


def _model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def score_pairs(
    model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 64,
    progress: Progress | None = None, stage: str = "scoring", on_batch: Callable[[list[str]], None] | None = None,
) -> list[Scored]:
    """Teacher-force every pair once; return argmax predictions and NLL on the answer tokens.

    Pairs are sorted by length before batching so little compute goes to padding. `on_batch(prompts)` after
    each batch's forward, with that batch's prompts in row order.
    """
    encoded = [encode_pair(tokenizer, p, a) for p, a in pairs]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    out: list[Scored | None] = [None] * len(encoded)
    pad = pad_id_of(tokenizer)
    device = _model_device(model)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([encoded[i] for i in idx], pad).to(device)
        logits, answers, rows = answer_logits(model, batch)
        if on_batch:
            on_batch([pairs[i][0] for i in idx])
        preds = logits.argmax(-1)
        nll = torch.nn.functional.cross_entropy(logits.float(), answers, reduction="none")
        for row, i in enumerate(idx):
            m = rows == row
            out[i] = Scored(preds[m].tolist(), answers[m].tolist(), float(nll[m].mean()) if m.any() else 0.0)
        if progress:
            progress(stage, min(start + batch_size, len(order)), len(order))
    return out  # type: ignore[return-value]


def answer_token_accuracy(
    model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 64
) -> list[float]:
    """Token accuracy of each (prompt, answer) pair: the metric behind Rel, Gen, Port and Known."""
    return [s.accuracy for s in score_pairs(model, tokenizer, pairs, batch_size)]


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation for exact match: lower case, no punctuation, articles or extra spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


_CLAUSE_BREAKS = re.compile(r"[,;.:!?\n]")


def free_verdicts(answer: str, target: str) -> tuple[bool, bool, bool]:
    """(exact, clause, first) of a free answer against the target, on normalised text: `exact`, the answer is
    the target; `clause`, the answer cut at one of its clause breaks (or not cut) is the target, so a target
    holding a comma ("Washington, D.C.") is met too; `first`, the answer begins with the target and then
    ends or goes on after a space ("Rome, Italy" and "Rome is" for "Rome"; not "Romeo"). A target that
    normalises to nothing is met only by an answer that does too."""
    a, t = normalize_answer(answer), normalize_answer(target)
    exact = a == t
    clause = exact or any(normalize_answer(answer[: m.start()]) == t for m in _CLAUSE_BREAKS.finditer(answer))
    return exact, clause, exact or (bool(t) and a.startswith(t + " "))


@torch.no_grad()
def generate_ids(
    model, tokenizer, prompts: Sequence[str], new_tokens: Sequence[int], batch_size: int = 32,
    progress: Progress | None = None, stop_ids: Sequence[int] | None = None, groups: Sequence[int] | None = None,
    **generate_kwargs,
) -> list[list[int]]:
    """Decode up to `new_tokens[i]` tokens after each prompt (greedy unless `generate_kwargs` say
    otherwise); returns each prompt's new token ids.

    Prompts are left-padded here (whatever the tokenizer's side) because generation appends on the
    right, and batched by length so little compute goes to padding. `stop_ids`: a row ends at the first
    of these tokens (`generate` stops a batch once every row has one) and is returned without it; None
    leaves the stop to the model's generation config, and the ids as generated. `groups`: prompts are
    batched within their group first (then by length): a batch runs until its last row stops, so rows
    expected to stop early (prompts an edit reaches, trained to end after the answer) go together rather
    than each batch waiting on the one row that runs to the bound.
    """
    device = _model_device(model)
    pad = pad_id_of(tokenizer)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    group = groups if groups is not None else [0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (group[i], len(encoded[i])))
    options = {"do_sample": False, "pad_token_id": pad, **generate_kwargs}
    stops = set(stop_ids or ())
    if stops:
        options["eos_token_id"] = sorted(stops)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i])
            mask[row, width - n :] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max(new_tokens[i] for i in idx), **options)
        for row, i in enumerate(idx):
            out[i] = gen[row, width : width + new_tokens[i]].tolist()
            if stops:
                out[i] = out[i][: next((k for k, t in enumerate(out[i]) if t in stops), len(out[i]))]
        if progress:
            progress("generating", min(start + batch_size, len(order)), len(order))
    return out


FREE_NEW_TOKENS = 32
"""At most this many tokens of a free answer (the protocol in the module docstring)."""


def free_answers(
    model, tokenizer, prompts: Sequence[str], batch_size: int = 32, progress: Progress | None = None,
    max_new_tokens: int = FREE_NEW_TOKENS,
) -> list[str]:
    """Each prompt's free answer: greedy, up to `max_new_tokens`, the text before the first stop token."""
    ids = generate_ids(model, tokenizer, prompts, [max_new_tokens] * len(prompts), batch_size, progress,
                       stop_ids=stop_token_ids(tokenizer, model))
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def generate_answers(
    model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy-decode as many tokens as each reference answer has, after each prompt; the decoded texts."""
    lengths = [len(encode_pair(tokenizer, p, a).answer_ids) for p, a in pairs]
    ids = generate_ids(model, tokenizer, [p for p, _ in pairs], lengths, batch_size, progress)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]


def _answers(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int, progress: Progress | None,
             groups: Sequence[int] | None = None) -> tuple[list[str], list[str]]:
    """(length-bounded answers, free answers) of the pairs, from one free generation: greedy decoding is the
    same whatever the bound, so the length-bounded answer is the free one's first tokens (the batches are
    the same); only a target longer than the free bound is decoded again."""
    lengths = [len(encode_pair(tokenizer, p, a).answer_ids) for p, a in pairs]
    ids = generate_ids(model, tokenizer, [p for p, _ in pairs], [FREE_NEW_TOKENS] * len(pairs), batch_size,
                       progress, stop_ids=stop_token_ids(tokenizer, model), groups=groups)
    free = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    bounded = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(ids, lengths)]
    long = [k for k, n in enumerate(lengths) if n > FREE_NEW_TOKENS]
    for k, text in zip(long, generate_answers(model, tokenizer, [pairs[k] for k in long], batch_size, progress)):
        bounded[k] = text
    return bounded, free


BASE_ANSWER_TOKENS = 3
"""Tokens of the unedited model's own answer that stand in for a locality answer nobody gave."""


def fill_base_answers(
    model, tokenizer, records: Sequence[EditRecord], batch_size: int = 32, n_tokens: int = BASE_ANSWER_TOKENS,
) -> list[EditRecord]:
    """Give every locality pair without an answer the unedited model's greedy continuation.

    Why: Loc is agreement with the unedited model, so it needs no ground truth, only answer positions
    to compare at. The prompts moecli builds itself (same-subject probes, CounterFact ROME neighbours
    without a stated answer) are scored at the positions of what the model itself would say. Call it
    before any edit is in the model. Where the model would stop at once (an instruct model after a
    question: SmolLM2 ends most ZsRE questions with its end-of-turn token, which left half of ZsRE's
    records without a same-subject probe), its most likely continuation that does not stop is taken
    (`min_new_tokens`): whether an edit moves the model's first answer token is what the probe asks. A pair
    whose continuation still decodes to nothing is dropped.
    """
    todo = [(i, j) for i, r in enumerate(records) for j, lp in enumerate(r.locality) if not lp.answer.strip()]
    if not todo:
        return list(records)
    answers: dict[tuple[int, int], str] = {}
    for options in ({}, {"min_new_tokens": n_tokens}):
        prompts = [records[i].locality[j].prompt for i, j in todo]
        ids = generate_ids(model, tokenizer, prompts, [n_tokens] * len(prompts), batch_size, **options)
        answers.update((key, tokenizer.decode(row, skip_special_tokens=True).strip()) for key, row in zip(todo, ids))
        todo = [key for key in todo if not answers[key]]
        if not todo:
            break
    out = []
    for i, r in enumerate(records):
        pairs = [dataclasses.replace(lp, answer=answers[(i, j)]) if (i, j) in answers else lp
                 for j, lp in enumerate(r.locality)]
        out.append(dataclasses.replace(r, locality=[lp for lp in pairs if lp.answer.strip()]))
    return out


@dataclass
class Baseline:
    """What the unedited model said: argmax on every locality pair, its Known accuracy, and (when computed
    with `generation`) its free answer to every locality prompt."""

    loc_preds: dict[str, list[list[int]]] = field(default_factory=dict)  # record id -> per pair
    known: dict[str, float] = field(default_factory=dict)  # record id -> token acc on ground_truth
    loc_free: dict[str, list[str]] | None = None  # record id -> free answer per locality pair


def _loc_pairs(records: Sequence[EditRecord]) -> list[tuple[str, str]]:
    return [(lp.prompt, lp.answer) for r in records for lp in r.locality]


def compute_baseline(
    model, tokenizer, records: Sequence[EditRecord], batch_size: int = 64,
    progress: Progress | None = None, generation: bool = False,
) -> Baseline:
    """Run the unedited model once on every locality prompt and ground truth, before editing; with
    `generation`, also keep its free answer to every locality prompt (what `loc_free` compares with)."""
    base = Baseline()
    loc = _loc_pairs(records)
    scored = iter(score_pairs(model, tokenizer, loc, batch_size, progress, "baseline"))
    for r in records:
        base.loc_preds[r.id] = [next(scored).preds for _ in r.locality]
    if generation:
        answers = iter(free_answers(model, tokenizer, [p for p, _ in loc], batch_size, progress))
        base.loc_free = {r.id: [next(answers) for _ in r.locality] for r in records}
    known_recs = [r for r in records if r.ground_truth]
    known = score_pairs(model, tokenizer, [(r.prompt, r.ground_truth) for r in known_recs], batch_size)
    for r, s in zip(known_recs, known):
        base.known[r.id] = s.accuracy
    return base


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass
class EvalReport:
    """Per-edit metrics and their summary (the keys scripts rely on are in `SUMMARY_KEYS`)."""

    per_edit: list[dict]
    summary: dict


def evaluate_records(
    model, tokenizer, records: Sequence[EditRecord], baseline: Baseline | None = None, *,
    batch_size: int = 64, generation: bool = True, perplexity: bool = False,
    progress: Progress | None = None, unedited: bool = False, unchanged: frozenset[str] = frozenset(),
    on_scored: Callable[[list[str]], None] | None = None, group_of: Callable[[str], int] | None = None,
) -> EvalReport:
    """Score every record: Rel on `prompt`, Gen on rephrases, Loc vs `baseline`, Port, Known.

    With `baseline=None` the model is its own baseline (Loc = 1 by definition; used to evaluate
    an unedited model). `perplexity=True` adds `rel_ppl`, the perplexity of the target (the
    hallucination protocol, lower is better). `generation=True` adds the free-generation verdicts (module
    docstring) and the older length-bounded `rel_em` / `gen_em`; `loc_free` needs a baseline computed
    with `generation`. `unedited=True` says the model is the one the baseline was computed on (the engine's
    "before" column): its free locality answers are the baseline's, not generated again. Locality prompts in
    `unchanged` are ones the adapter is known to leave alone (no edit reaches them: `engine.adapters.
    evaluate_edited`): the edited model's answers to them are the baseline's by construction, so they are
    counted unchanged without being run, which is most of an evaluation's time (their free generation).
    `on_scored(prompts)` is called after each teacher-forced batch (the edited model's routes are read then).
    `group_of(prompt)`, asked after the teacher-forced pass: the generation batch group of a Rel/Gen prompt
    (`generate_ids`' `groups`).
    """
    if baseline is None:
        baseline = compute_baseline(model, tokenizer, records, batch_size, progress, generation=generation)
        unedited = True
    pairs: list[tuple[str, str]] = []
    slots: list[tuple[int, str, str]] = []  # (record index, kind, group)
    for i, r in enumerate(records):
        pairs.append((r.prompt, r.target))
        slots.append((i, "rel", ""))
        for q in r.rephrases:
            pairs.append((q, r.target))
            slots.append((i, "gen", ""))
        for lp in r.locality:
            pairs.append((lp.prompt, lp.answer))
            slots.append((i, "loc", lp.group))
        for pp in r.portability:
            pairs.append((pp.prompt, pp.answer))
            slots.append((i, "port", pp.group))
    run = [k for k, (i, kind, _) in enumerate(slots) if kind != "loc" or pairs[k][0] not in unchanged]
    scored_run = iter(score_pairs(model, tokenizer, [pairs[k] for k in run], batch_size, progress, "evaluating",
                                  on_batch=on_scored))
    ran = set(run)
    scored = [next(scored_run) if k in ran else None for k in range(len(pairs))]
    gen_text: dict[int, str] = {}
    free_text: dict[int, str] = {}
    loc_free_same: dict[int, bool] = {}
    if generation:
        gen_idx = [k for k, s in enumerate(slots) if s[1] in ("rel", "gen")]
        groups = [group_of(pairs[k][0]) for k in gen_idx] if group_of is not None else None
        gen_text, free_text = _answers(model, tokenizer, [pairs[k] for k in gen_idx], batch_size, progress, groups)
        gen_text, free_text = dict(zip(gen_idx, gen_text)), dict(zip(gen_idx, free_text))
        if baseline.loc_free is not None:
            # the locality prompts alone, in baseline order: the same batches as the baseline's generation
            loc_idx = [k for k, s in enumerate(slots) if s[1] == "loc"]
            before = [a for r in records for a in baseline.loc_free[r.id]]
            asked = [n for n, k in enumerate(loc_idx) if k in ran and not unedited]
            now = list(before)
            for n, a in zip(asked, free_answers(model, tokenizer, [pairs[loc_idx[n]][0] for n in asked], batch_size,
                                                progress)):
                now[n] = a
            loc_free_same = {k: a == b for k, a, b in zip(loc_idx, now, before)}

    per: list[dict] = [defaultdict(list) for _ in records]
    loc_pos = [0] * len(records)
    for k, ((i, kind, group), s) in enumerate(zip(slots, scored)):
        d = per[i]
        if kind == "loc":
            before = baseline.loc_preds[records[i].id][loc_pos[i]]
            loc_pos[i] += 1
            same = 1.0 if s is None else sum(a == b for a, b in zip(s.preds, before)) / max(len(before), 1)
            d["loc"].append(same)
            d["loc_strict"].append(float(same == 1.0))
            d[f"loc:{group}"].append(same)
            if k in loc_free_same:
                d["loc_free"].append(float(loc_free_same[k]))
                d[f"loc_free:{group}"].append(float(loc_free_same[k]))
            continue
        d[kind].append(s.accuracy)
        d[f"{kind}_strict"].append(float(s.accuracy == 1.0))
        if kind == "rel":
            d["rel_nll"].append(s.nll)
        if k in gen_text:
            em = normalize_answer(gen_text[k]) == normalize_answer(pairs[k][1])
            d[f"{kind}_em"].append(float(em))
        if k in free_text:
            exact, clause, first = free_verdicts(free_text[k], pairs[k][1])
            d[f"{kind}_free_exact"].append(float(exact))
            d[f"{kind}_free_clause"].append(float(clause))
            d[f"{kind}_free_first"].append(float(first))
            d[f"{kind}_free_answer"].append(free_text[k])
    per_edit: list[dict] = []
    for r, d in zip(records, per):
        row: dict = {"id": r.id, "prompt": r.prompt, "target": r.target}
        for key, vals in d.items():
            if key.endswith("_free_answer"):  # the texts themselves, to read what the model said
                row[key] = vals[0] if key.startswith("rel") else list(vals)
                continue
            row[key] = _mean(vals)
        if d.get("gen"):
            row["gen_each"] = list(d["gen"])  # per rephrase, in record order (the routing diagnosis reads it)
        if r.id in baseline.known:
            row["known"] = baseline.known[r.id]
        if perplexity and "rel_nll" in d:
            row["rel_ppl"] = math.exp(d["rel_nll"][0])
        row.pop("rel_nll", None)
        per_edit.append(row)
    return EvalReport(per_edit, summarize(per_edit))


def summarize(per_edit: Sequence[dict]) -> dict:
    """Mean of each metric over the edits that have it; Avg = mean of Rel, Gen, Loc present."""
    summary: dict = {}
    keys = sorted({k for row in per_edit for k in row if k not in ("id", "prompt", "target")})
    for key in keys:
        vals = [row[key] for row in per_edit if isinstance(row.get(key), (int, float))]
        if vals:
            summary[key] = sum(vals) / len(vals)
    loc_groups = {k.split(":", 1)[1]: summary.pop(k) for k in list(summary) if k.startswith("loc:")}
    if loc_groups:
        summary["loc_by_group"] = loc_groups
    free_groups = {k.split(":", 1)[1]: summary.pop(k) for k in list(summary) if k.startswith("loc_free:")}
    if free_groups:
        summary["loc_free_by_group"] = free_groups
    parts = [summary[k] for k in ("rel", "gen", "loc") if k in summary]
    summary["avg"] = sum(parts) / len(parts) if parts else None
    for k in ("rel", "gen", "loc"):
        summary.setdefault(k, None)
    summary["n_edits"] = len(per_edit)
    return summary


EVAL_CACHE_DIR = "evaluations"  # under `$MOECLI_CACHE`


@dataclass
class Unedited:
    """What the unedited model says on a run's records (see `unedited_evaluation`)."""

    records: list[EditRecord]  # the records, their locality probes answered where they had no answer
    baseline: Baseline
    before: EvalReport | None  # the "before" column, when asked for
    cached: bool  # read from the cache, not computed


def unedited_evaluation(
    model, tokenizer, records: Sequence[EditRecord], model_fingerprint: dict, *, batch_size: int = 64,
    generation: bool = True, perplexity: bool = False, before: bool = True, progress: Progress | None = None,
) -> Unedited:
    """The unedited model's side of a run: base answers for unanswered probes, the locality baseline and,
    with `before`, the "before" column; computed once per model and records, then read from the cache.

    Why: none of it changes between runs on the same model and records, and on a 1000-edit CounterFact run
    with three same-subject probes per edit it took longer than the editing (free generation of every
    prompt). The key hashes the model's fingerprint, the records, the options, the torch and transformers
    versions and the source of the evaluation code itself, so a changed metric never reads an old result;
    JSON keeps every float exactly, so a cached column equals a computed one. `MOECLI_EVAL_CACHE=off`
    computes it every time (the test suite does, unless a test asks for the cache)."""
    import transformers

    from moecli.fsutil import atomic_write_json
    from moecli.paths import cache_root

    use_cache = os.environ.get("MOECLI_EVAL_CACHE", "on") != "off"
    code = b"".join(Path(m.__file__).read_bytes() for m in (sys.modules[__name__], batching, probes))
    key = hashlib.sha256(json.dumps({
        "model": model_fingerprint, "records": [r.to_dict() for r in records], "batch_size": batch_size,
        "generation": generation, "perplexity": perplexity, "code": hashlib.sha256(code).hexdigest(),
        "versions": [torch.__version__, transformers.__version__],
    }, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = cache_root() / EVAL_CACHE_DIR / f"{key}.json"
    if use_cache and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            was = data["before"]
            if was is not None or not before:  # an entry without the before column serves only runs without it
                return Unedited([EditRecord.from_dict(d) for d in data["records"]], Baseline(**data["baseline"]),
                                EvalReport(**was) if was is not None else None, cached=True)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged entry is computed again (and replaced)
    filled = fill_base_answers(model, tokenizer, records, batch_size)
    baseline = compute_baseline(model, tokenizer, filled, batch_size, progress, generation=generation)
    report = (evaluate_records(model, tokenizer, filled, baseline, batch_size=batch_size, generation=generation,
                               perplexity=perplexity, progress=progress, unedited=True) if before else None)
    if use_cache:
        try:
            atomic_write_json(path, {"records": [r.to_dict() for r in filled],
                                     "baseline": dataclasses.asdict(baseline),
                                     "before": dataclasses.asdict(report) if report is not None else None})
        except OSError:
            pass  # a read-only cache costs the next run this time again, nothing else
    return Unedited(filled, baseline, report, cached=False)
