"""Edit records and the readers for the formats people already have.

An `EditRecord` is one requested change of knowledge (see EVALUATION.md). Readers for ZsRE,
CounterFact (EasyEdit and ROME), WISE hallucination and moecli JSONL live below.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field


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
            self.id = hashlib.sha1(f"{self.prompt}\x1f{self.target}".encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        """The moecli JSONL form of this record (round-trips through the jsonl reader)."""
        return asdict(self)

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
