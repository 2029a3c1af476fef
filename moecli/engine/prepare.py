"""Records made ready for a job, the same way for every command and benchmark: read and checked, locality
probes added (`read_edit_records`), then fitted to the model (`for_model`: chat template, lengths)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moecli.data.probes import with_probes
from moecli.data.readers import ReadResult, read_records
from moecli.data.records import EditRecord
from moecli.errors import UserError
from moecli.model.batching import chat_records
from moecli.model.loading import LoadedModel


@dataclass
class Prepared:
    """Records read for a job: what `read_records` found, with probes added; `dropped`: neighbourhood probes
    left out because they ask another record's edited fact."""

    read: ReadResult
    dropped: int

    @property
    def records(self) -> list[EditRecord]:
        return self.read.records


def read_edit_records(data: str | Path, fmt: str | None = None, *, skip_invalid: bool = False,
                      limit: int | None = None, same_subject: int = 0, what: str = "valid records") -> Prepared:
    """Read `data`, refuse a file with no usable record, add `same_subject` probes per record and drop the
    neighbourhood probes that ask another record's edit (`probes.with_probes`)."""
    read = read_records(data, fmt, skip_invalid=skip_invalid, limit=limit)
    if not read.records:
        note = f" ({read.skipped} skipped, the first: {read.problems[0]})" if read.problems else ""
        raise UserError(f"{data}: no {what}{note}")
    read.records, dropped = with_probes(read.records, data, same_subject, fmt)
    return Prepared(read, dropped)


def for_model(loaded: LoadedModel, records: list[EditRecord], *, chat: bool = False,
              data: str | None = None) -> list[EditRecord]:
    """The records as the model will see them: inside its chat template with `chat`, and none longer than it
    can read (`check_lengths`)."""
    records = chat_records(records, loaded.tokenizer) if chat else records
    check_lengths(loaded, records, data)
    return records


def check_lengths(loaded: LoadedModel, records: list[EditRecord], data: str | None) -> None:
    """Refuse a record longer than the model can run at all (GPT-2 and OPT have a position table).

    Without this, such a record ends the run deep inside torch ("index out of range in self").
    Only texts that could be too long are tokenized: a token covers at least one UTF-8 byte.
    """
    from moecli.model.batching import encode_pair
    from moecli.model.loading import position_limit

    limit = position_limit(loaded.model)
    if limit is None:
        return
    for n, rec in enumerate(records, 1):
        pairs = [("prompt + target", rec.prompt, rec.target)]
        pairs += [(f"rephrase {i} + target", r, rec.target) for i, r in enumerate(rec.rephrases, 1)]
        pairs += [(f"locality item {i}", p.prompt, p.answer) for i, p in enumerate(rec.locality, 1)]
        pairs += [(f"portability item {i}", p.prompt, p.answer) for i, p in enumerate(rec.portability, 1)]
        for what, prompt, answer in pairs:
            if _utf8_len(prompt) + _utf8_len(answer) + 8 <= limit:
                continue
            tokens = len(encode_pair(loaded.tokenizer, prompt, answer).ids)
            if tokens > limit:
                raise UserError(
                    f"{data or 'records'}: edit {n} (id {rec.id}): {what} is {tokens} tokens, longer than the "
                    f"{limit} positions this {loaded.family} model can read; shorten it or leave it out"
                )


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))
