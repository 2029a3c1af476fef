"""Locality probes moecli builds itself: where an edit must leave the model's answers alone.

Loc is agreement with the unedited model, so a probe needs no ground truth: its answer is left empty
and filled with the unedited model's own greedy continuation before any edit (`evaluation.
fill_base_answers`). Two kinds:

- `neighborhood`: other subjects. Under entity routing an input that names no edited entity gets the
  base output by construction, so this group is 1.0 for every bypass method and measures little.
- `same_subject`: the edited subject asked about something else, the case where routing by entity can
  fail. CounterFact and ZsRE have none, so they are built from the file itself: the edited subject put
  into the prompts of other records that ask another relation (`with_same_subject`).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from moecli.data.readers import read_records
from moecli.data.records import EditRecord, LocalityPair

# [choice] What a single edit given on the command line is checked against, so that `moecli edit
# --prompt ...` reports locality too: general-knowledge prompts about other subjects and the edited
# subject asked about something else.
NEIGHBORHOOD_PROBES = (
    "The capital of France is",
    "The Colosseum is located in the city of",
    "The author of Hamlet is",
    "The largest planet of the solar system is",
)
SAME_SUBJECT_PROBES = ("{} is a", "{} is famous for", "The history of {} began")
# [choice] The relation test reads at least this many records of the file, whatever the number edited:
# its joins grow with the list (a form pair needs `support` records), so on the first 100 CounterFact
# records alone 11 of the 12 probes a LEMoE run took for its own edit asked the edited relation in other
# words ("Ferrari F40 is produced by" for "Ferrari F40, developed by"); read from 1000 records the test
# knows those forms for one relation. Lists of 1000 or more records are their own evidence, as before.
RELATION_EVIDENCE = 1000

BLANK = "\x00"
# words that say nothing about the relation a prompt asks
STOPWORDS = frozenset(
    "a an the of in on at to for by with from and or is are was were be been it its this that which who whom "
    "whose what where when how why does do did has have had as into than then there their they he she his her "
    "s one".split())


def default_locality(subject: str | None) -> list[LocalityPair]:
    """Locality probes for one edit without any of its own (see NEIGHBORHOOD_PROBES)."""
    pairs = [LocalityPair(p, "", "neighborhood") for p in NEIGHBORHOOD_PROBES]
    if subject:
        pairs += [LocalityPair(t.format(subject), "", "same_subject") for t in SAME_SUBJECT_PROBES]
    return pairs


SENTENCE_END = re.compile(r"[.!?]\s")


def skeleton(text: str, subject: str) -> str | None:
    """`text` with `subject` blanked, from the last sentence end before it ("Shayna goes home. _ was born
    in" → "_ was born in": CounterFact's rephrasings carry a random sentence first); None without it."""
    at = text.find(subject)
    if at < 0:
        return None
    return blanked(text[:at], text[at + len(subject):])


def blanked(head: str, tail: str) -> str:
    """`head` + BLANK + `tail`, from the last sentence end in `head` (the text around an entity, however it
    was found: a string match here, the router's token span in `AnchorContext.skeletons`)."""
    cut = [m.end() for m in SENTENCE_END.finditer(head)]
    return head[cut[-1]:] + BLANK + tail if cut else head + BLANK + tail


def _skeletons(r: EditRecord) -> list[str]:
    """The record's prompt and rephrasings with its subject blanked (those that contain it)."""
    if not r.subject:
        return []
    return [sk for t in (r.prompt, *r.rephrases) if (sk := skeleton(t, r.subject)) is not None]


def _words(skeleton: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z]+", skeleton.lower()) if w not in STOPWORDS)


class RelationTest:
    """Whether two records of a list may ask the same relation (then neither's prompt is a probe for the other).

    [choice] The shared files carry no relation id. Two records are taken to ask the same relation when
    they share an answer (new target, old answer, or a `neighborhood` pair's answer: CounterFact's
    neighbours ask the same relation of another subject), a question form (prompt or rephrasing with the
    subject blanked: "_, in" has no content word to compare), or two forms with at least `overlap` of
    their content words in common (Jaccard: "Which river system contains _?" and "What river system is
    _ in?"). Forms are joined transitively where records support it: a record's prompt and its rephrasings
    ask one relation, so two forms that are (prompt, rephrasing) of at least `support` records are joined,
    and so on through chains ("_ died at" ~ "_ expired at" through records that have one as prompt and the
    other as rephrasing). Without the joins many probes ask the record's own relation in other words ("_ was
    employed in" for "_ took up work in"), and a learned question key rightly takes those for the same
    question, which would count as locality failures (figures: docs/design.md). [choice]
    `support` 2: with 1, forms CounterFact uses for several relations ("_ originated from") join languages,
    birthplaces and manufacturers into one class; with 2 the classes stay one kind of question each (work
    place, headquarters, death place, ...), the widest being the "_ is known for / is incredible at"
    forms CounterFact shares between occupation, field, instrument and position. Answers stay pairwise:
    chains of shared answers ("English" → "France" → "Paris") would join every relation into one. Taking
    two relations for one only drops a candidate.
    """

    def __init__(self, records: Sequence[EditRecord], overlap: float = 0.5, support: int = 2) -> None:
        self.overlap = overlap
        self.answers = [{a.strip().lower() for a in (r.target, r.ground_truth or "",
                                                     *(lp.answer for lp in r.locality if lp.group == "neighborhood"))
                         if a.strip()} for r in records]
        self.texts = [set(_skeletons(r)) for r in records]
        self.forms = [[_words(sk) for sk in texts] for texts in self.texts]
        links: Counter[tuple[str, str]] = Counter()
        for texts in self.texts:
            first, *rest = sorted(texts) or [""]
            links.update((first, sk) for sk in rest)
        self._parent: dict[str, str] = {}
        for (a, b), n in links.items():
            if n >= support:
                self._join(a, b)
        self.classes = [{self._find(sk) for sk in texts} for texts in self.texts]

    def _find(self, form: str) -> str:
        parent = self._parent
        root = form
        while parent.get(root, root) != root:
            root = parent[root]
        while form != root:  # path compression
            parent[form], form = root, parent[form]
        return root

    def _join(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def same(self, i: int, j: int) -> bool:
        if self.answers[i] & self.answers[j] or self.classes[i] & self.classes[j]:
            return True
        return any(len(a & b) >= self.overlap * len(a | b) for a in self.forms[i] for b in self.forms[j] if a | b)


def with_same_subject(records: Sequence[EditRecord], per_edit: int = 3, seed: int = 0,
                      evidence: Sequence[EditRecord] | None = None) -> list[EditRecord]:
    """The records with up to `per_edit` `same_subject` locality probes each: the prompt of another record
    of the list that asks another relation (`RelationTest`), with this record's subject in place of its
    own. Deterministic: the choice depends on `seed`, the record's position and the list. Answers are
    left empty (the unedited model's continuation is compared). A record without a subject in its
    prompt gets none. `evidence`: more records of the file, for the relation test (`relation_test`,
    `RELATION_EVIDENCE`); the probes' prompts still come from `records`."""
    if per_edit <= 0:
        return list(records)
    test = relation_test(records, evidence)
    forms: dict[str, int] = {}  # prompt skeleton -> the first record that has it
    for j, r in enumerate(records):
        if r.subject and (sk := skeleton(r.prompt, r.subject)) is not None:
            forms.setdefault(sk, j)
    out = []
    for i, r in enumerate(records):
        if not (r.subject and r.subject in r.prompt):
            out.append(r)
            continue
        rng = random.Random(f"{seed}:{i}")
        order = list(forms.items())
        rng.shuffle(order)
        picked = []
        for sk, j in order:  # shuffled, then the first that ask another relation: no O(n) test per record
            if len(picked) == per_edit:
                break
            if not test.same(i, j):
                picked.append(sk)
        probes = [LocalityPair(sk.replace(BLANK, r.subject), "", "same_subject") for sk in picked]
        out.append(dataclasses.replace(r, locality=[*r.locality, *probes]))
    return out


def _names(text: str, name: str) -> bool:
    """Whether `text` names `name` as a whole: not inside a word, not followed by more of a name (the text
    form of `anchors.continues_name`: "Nissan Primera P12" does not name "Nissan Primera")."""
    for m in re.finditer(re.escape(name), text):
        before, after = text[m.start() - 1 : m.start()], text[m.end() : m.end() + 2]
        if before.isalnum() or after[:1].isalnum():
            continue
        if after[:1] == " " and after[1:2] and (after[1].isupper() or after[1].isdigit()):
            continue
        return True
    return False


def relation_test(records: Sequence[EditRecord], evidence: Sequence[EditRecord] | None = None) -> RelationTest:
    """The relation test of `records`, learned from `evidence` when that is longer: more records of the same
    file that begin with `records` (same prompts, same order), so indices into `records` stay valid."""
    if evidence is None or len(evidence) <= len(records):
        return RelationTest(records)
    if any(a.prompt != b.prompt or a.subject != b.subject for a, b in zip(records, evidence)):
        raise ValueError("relation evidence must begin with the records themselves")
    return RelationTest(evidence)


def relation_evidence(records: Sequence[EditRecord], path: str | Path, format: str | None = None) -> list[EditRecord]:
    """What the relation test of `records` (read from `path`) learns from: the first `RELATION_EVIDENCE`
    valid records of the file when `records` are fewer (a `--limit` run), else `records` themselves."""
    if len(records) >= RELATION_EVIDENCE:
        return list(records)
    return read_records(path, format, skip_invalid=True, limit=RELATION_EVIDENCE).records


def with_probes(records: Sequence[EditRecord], path: str | Path, per_edit: int,
                format: str | None = None) -> tuple[list[EditRecord], int]:
    """The records of `path` as moecli scores them, for the CLI and the benchmarks alike: the neighbourhood
    probes that ask another record's edit dropped, `per_edit` same_subject probes added, both judged by the
    relation test learned from `relation_evidence`; and how many neighbourhood probes were dropped."""
    evidence = relation_evidence(records, path, format)
    kept, dropped = without_edited_neighbours(records, evidence)
    return with_same_subject(kept, per_edit, evidence=evidence), dropped


def without_edited_neighbours(records: Sequence[EditRecord],
                              evidence: Sequence[EditRecord] | None = None) -> tuple[list[EditRecord], int]:
    """The records without the `neighborhood` probes that ask another record's edit, and how many went.

    Why: CounterFact's neighbours of record i are other subjects asked i's relation; when one of them is
    the subject of record j of the same list and j asks that relation too ("What sport does Hank Aaron
    play?" among one record's neighbours, Hank Aaron's sport edited by another), the edited model *should*
    answer it differently: the probe is j's rephrasing, not a locality probe (such probes were a large part of
    a LEMoE run's neighbourhood misses; docs/design.md). Same relation
    by `RelationTest` (learned from `evidence`, see `relation_test`), names matched as whole names (`_names`).
    """
    test = relation_test(records, evidence)
    subjects = [(j, r.subject) for j, r in enumerate(records) if r.subject]
    out, dropped = [], 0
    for i, r in enumerate(records):
        keep = []
        for lp in r.locality:
            if lp.group == "neighborhood" and any(
                    j != i and s in lp.prompt and _names(lp.prompt, s) and test.same(i, j) for j, s in subjects):
                dropped += 1
                continue
            keep.append(lp)
        out.append(r if len(keep) == len(r.locality) else dataclasses.replace(r, locality=keep))
    return out, dropped
