"""Edit records: the `EditRecord` type every command edits with, and the checks a usable record passes.

An `EditRecord` is one requested change of knowledge: a prompt, the new target, the subject it is about,
rephrasings that should give the new target too, and locality prompts that should keep their answers.
Reading the formats people already have (ZsRE, CounterFact, hallucination, JSONL) is `readers`.

Why the subject must be a literal substring of the prompt: later code finds the subject tokens by plain
substring search. All 23,906 records of the five shared data files satisfy this literally (none needs a
case-insensitive match), so no case folding is done; the error message points out a case-only mismatch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass
class LocalityPair:
    """A (prompt, answer) pair that must NOT change after editing.

    `group` names the kind of locality (e.g. "nq", "neighborhood", "same_relation",
    "same_subject") so reports can show each kind separately.
    """

    prompt: str
    answer: str
    group: str = "locality"


@dataclass
class PortabilityPair:
    """A (prompt, answer) pair that should follow from the edit (e.g. one-hop reasoning)."""

    prompt: str
    answer: str
    group: str = "portability"


@dataclass
class EditRecord:
    """One requested change of knowledge: `prompt` should now be answered with `target`."""

    prompt: str
    target: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrases: list[str] = field(default_factory=list)
    locality: list[LocalityPair] = field(default_factory=list)
    portability: list[PortabilityPair] = field(default_factory=list)
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            # surrogatepass: a lone surrogate (from a "\\ud800" JSON escape) must not crash;
            # every valid string hashes exactly as with plain .encode().
            key = f"{self.prompt}\x1f{self.target}".encode("utf-8", "surrogatepass")
            self.id = hashlib.sha1(key).hexdigest()[:12]

    def to_dict(self) -> dict:
        """The moecli JSONL form of this record (round-trips through the jsonl reader).

        Same result as `dataclasses.asdict(self)`, built by hand because asdict's generic deep copy
        is ~10x slower and dominated the time to write 10,000 records.
        """
        return {
            "prompt": self.prompt,
            "target": self.target,
            "subject": self.subject,
            "ground_truth": self.ground_truth,
            "rephrases": list(self.rephrases),
            "locality": [{"prompt": p.prompt, "answer": p.answer, "group": p.group} for p in self.locality],
            "portability": [{"prompt": p.prompt, "answer": p.answer, "group": p.group} for p in self.portability],
            "id": self.id,
        }

    @classmethod
    def from_dict(cls, d: dict) -> EditRecord:
        """Build from the moecli JSONL form (no validation: readers validate)."""
        return cls(
            prompt=d["prompt"],
            target=d["target"],
            subject=d.get("subject"),
            ground_truth=d.get("ground_truth"),
            rephrases=list(d.get("rephrases") or []),
            locality=[LocalityPair(**p) for p in d.get("locality") or []],
            portability=[PortabilityPair(**p) for p in d.get("portability") or []],
            id=d.get("id") or "",
        )



MAX_TEXT_CHARS = 10_000
"""Longest text of one field (prompt, target, a rephrase, a locality prompt, ...). The longest in the
five shared benchmark files is 678 characters; an edit is one fact, and a field of millions of
characters (a paste gone wrong) would otherwise reach the model and ask it for terabytes."""
MAX_RECORD_CHARS = 100_000
"""Most text of one record in all its fields together (e.g. thousands of rephrases)."""

def json_type(value: object) -> str:
    """The JSON name of a Python value's type, for messages users read next to their JSON file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def validate_record(rec: EditRecord) -> str | None:
    """What is wrong with a record (the first problem found), or None if it is usable.

    Checked here rather than in `EditRecord.__post_init__` because records built in code (tests,
    generators) may be in flux; readers and the CLI call this at the boundary instead.
    """
    prompt, target, subject = rec.prompt, rec.target, rec.subject
    if type(prompt) is not str:
        return f"field 'prompt' must be a string, got {json_type(prompt)}"
    if type(target) is not str:
        return f"field 'target' must be a string, got {json_type(target)}"
    if not prompt.strip():
        return "empty prompt"
    if not target.strip():
        return "empty target"
    if subject is not None:
        if type(subject) is not str:
            return f"field 'subject' must be a string, got {json_type(subject)}"
        if not subject.strip():
            return "empty subject (leave it out instead)"
        if subject not in prompt:
            where = prompt.lower().find(subject.lower())
            if where >= 0 and len(prompt.lower()) == len(prompt):
                span = prompt[where : where + len(subject)]
                return f"subject {subject!r} not found in prompt (it appears with different case: {span!r})"
            return f"subject {subject!r} not found in prompt"
    if rec.ground_truth is not None and type(rec.ground_truth) is not str:
        return f"field 'ground_truth' must be a string, got {json_type(rec.ground_truth)}"
    if type(rec.id) is not str or not rec.id:
        return "field 'id' must be a non-empty string"
    if type(rec.rephrases) is not list:
        return f"field 'rephrases' must be a list, got {json_type(rec.rephrases)}"
    for i, r in enumerate(rec.rephrases, 1):
        if type(r) is not str:
            return f"rephrase {i} must be a string, got {json_type(r)}"
        if not r.strip():
            return f"rephrase {i} is empty"
    for name, pairs, cls in (
        ("locality", rec.locality, LocalityPair),
        ("portability", rec.portability, PortabilityPair),
    ):
        if type(pairs) is not list:
            return f"field '{name}' must be a list, got {json_type(pairs)}"
        for i, p in enumerate(pairs, 1):
            if not isinstance(p, cls):
                return f"{name} item {i} must be a {cls.__name__}, got {type(p).__name__}"
            if type(p.prompt) is not str or type(p.answer) is not str or type(p.group) is not str:
                return f"{name} item {i}: prompt, answer and group must be strings"
            if not p.prompt.strip():
                return f"{name} item {i} has an empty prompt"
            # An empty answer is allowed: 12 real WISE hallucination records have one.
    return _size_problem(rec)


def _size_problem(rec: EditRecord) -> str | None:
    """A field over MAX_TEXT_CHARS, or a record over MAX_RECORD_CHARS in all (types already checked)."""
    lengths = [len(rec.prompt), len(rec.target), len(rec.subject or ""), len(rec.ground_truth or "")]
    lengths += map(len, rec.rephrases)
    for pairs in (rec.locality, rec.portability):
        for p in pairs:
            lengths += (len(p.prompt), len(p.answer))
    total = sum(lengths)
    if max(lengths) <= MAX_TEXT_CHARS and total <= MAX_RECORD_CHARS:
        return None
    named = [("prompt", rec.prompt), ("target", rec.target), ("subject", rec.subject or ""),
             ("ground_truth", rec.ground_truth or "")]
    named += [(f"rephrase {i}", r) for i, r in enumerate(rec.rephrases, 1)]
    for kind, pairs in (("locality", rec.locality), ("portability", rec.portability)):
        for i, p in enumerate(pairs, 1):
            named += [(f"{kind} item {i} prompt", p.prompt), (f"{kind} item {i} answer", p.answer)]
    for name, text in named:
        if len(text) > MAX_TEXT_CHARS:
            return f"{name} is {len(text):,} characters long, over the limit of {MAX_TEXT_CHARS:,}; shorten it"
    return f"{total:,} characters of text in all, over the limit of {MAX_RECORD_CHARS:,} per record; shorten it"
