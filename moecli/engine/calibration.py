"""The calibration data moecli ships, and the automatic question key calibrated from it.

Why: the learned question key (`moecli.routing.question`) is what keeps an edit from answering other questions
about its subject on a real model, and it needs calibrating per model. moecli ships the train splits it
is calibrated on (`assets/calibration/`, gzip JSON, trimmed to the fields calibration reads; provenance
and licences in the `SOURCES.md` beside them), so that `moecli calibrate --model M` needs no `--data`,
and so that the first editing run on a real model without a key calibrates one itself (`auto_key`),
installs it in `$MOECLI_CACHE/questions/` (where `find_encoder` looks) and every later run, `evaluate`
and `ask` reuse it.

[choice] The automatic calibration runs only where `query_feature` is `auto` (the default), no key is
installed or shipped for the model, `auto_calibrate` is on (recipe `auto_calibrate: false`, or
`--set auto_calibrate=false`, skips it) and the model has a pretrained tokenizer: a vocabulary of at
least `MIN_VOCAB` tokens (every pretrained family moecli supports has 32,000 or more). The fact world
(1,024 tokens), the benchmark knowledge models (at most 8,192) and the tiny test models (512) do not: they
know no text beyond their own facts, and on them `auto` keeps the answer-distribution test.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from moecli.data.records import EditRecord
from moecli.errors import UserError
from moecli.paths import ASSETS

CALIBRATION_DIR = ASSETS / "calibration"
MIN_VOCAB = 16384  # [choice] a pretrained tokenizer (32,000 and more); fact world 1,024, knowledge models ≤ 8,192


@dataclass(frozen=True)
class Source:
    """A shipped train file and the records of it that calibration reads by default (`start:end`)."""

    name: str
    file: str
    start: int
    end: int

    @property
    def path(self) -> Path:
        return CALIBRATION_DIR / self.file

    @property
    def label(self) -> str:
        return f"shipped:{self.name}[{self.start}:{self.end}]"


# [choice] The default ranges: every ZsRE train record and the first 6,000 CounterFact train records (see
# benchmarks/results/calibration.md: held-out recall against the number of records, and the wall time).
SHIPPED: tuple[Source, ...] = (
    Source("counterfact_train", "counterfact_train.json.gz", 0, 6000),
    Source("zsre_train_1k", "zsre_train_1k.json.gz", 0, 1000),
)


def calibration_records(path: str | Path, start: int = 0, end: int | None = None, same_subject: int = 3,
                        seed: int = 0, fmt: str | None = None) -> list[EditRecord]:
    """Records `start:end` of a train file as calibration reads them: the neighbourhood probes that name
    another record's subject dropped (`locality.with_probes`), and `same_subject` probes built per
    `RELATION_EVIDENCE` records (the relation test's joins grow with the list: lists of its size, as the
    benchmarks build them)."""
    from moecli.data.probes import RELATION_EVIDENCE, with_probes, with_same_subject
    from moecli.data.readers import read_records

    read = read_records(path, fmt, limit=end)
    if not read.records:
        raise UserError(f"{path}: no valid records")
    kept, _ = with_probes(read.records, path, 0, fmt)
    chosen = kept[start:]
    picked: list[EditRecord] = []
    for at in range(0, len(chosen), RELATION_EVIDENCE):
        picked += with_same_subject(chosen[at:at + RELATION_EVIDENCE], same_subject, seed)
    return picked


def shipped_records(sources: Sequence[Source] | None = None, same_subject: int = 3, seed: int = 0,
                    ) -> tuple[list[EditRecord], list[str], list[int]]:
    """(records, labels, records per source) of the shipped train files' default ranges (`SHIPPED`)."""
    sources = SHIPPED if sources is None else sources
    records: list[EditRecord] = []
    counts = []
    for src in sources:
        if not src.path.is_file():
            raise UserError(f"the shipped calibration data is missing ({src.path}); reinstall moecli or give --data")
        part = calibration_records(src.path, src.start, src.end, same_subject, seed)
        records += part
        counts.append(len(part))
    return records, [s.label for s in sources], counts


def install_path(encoder) -> Path:
    """Where `calibrate --install` and the automatic calibration put `encoder` (found by `find_encoder`):
    `$MOECLI_CACHE/questions/<weights hash>[-text].safetensors` (a text and a layers-only key may sit side
    by side)."""
    from moecli.paths import cache_root
    from moecli.routing.question import QUESTIONS_DIR

    kind = "-text" if encoder.text_dim else ""
    return cache_root() / QUESTIONS_DIR / f"{encoder.info['fingerprint']['weights_hash'][:16]}{kind}.safetensors"


def install(encoder) -> Path:
    """Save `encoder` atomically where `find_encoder` finds it; a RunError when it cannot be written."""
    from moecli.errors import RunError

    where = install_path(encoder)
    try:
        encoder.save(where)  # atomic: an interrupted save leaves no file a later run could take for a key
    except OSError as exc:
        raise RunError(f"cannot write the question key {where}: {exc.strerror or exc}") from exc
    encoder.info["installed"] = str(where)
    return where


def ineligible(loaded, config) -> str | None:
    """Why the automatic calibration does not apply to `loaded` with `config` (None: it does)."""
    from moecli.model.loading import num_layers
    from moecli.routing.question import default_layers

    if not getattr(config, "auto_calibrate", False):
        return "auto_calibrate is off"
    vocab = len(loaded.tokenizer)
    if vocab < MIN_VOCAB:
        return f"vocabulary of {vocab} tokens: not a pretrained tokenizer (fewer than {MIN_VOCAB})"
    layer = getattr(config, "layer", None)
    if layer is not None and layer <= max(default_layers(num_layers(loaded.model))):
        return f"layer {layer} is not above the layers a question key reads"
    return None


def is_shipped(path: str | Path) -> bool:
    from moecli.routing.question import QUESTIONS_DIR

    return Path(path).resolve().parent == (ASSETS / QUESTIONS_DIR)


def auto_key(loaded, config, model_fingerprint: dict | None = None,
             progress: Callable[..., None] | None = None) -> dict:
    """Which question key the run with `config` routes by, calibrating and installing one first where
    `query_feature` is `auto`, none is installed or shipped for the model and `ineligible` finds no reason
    against it. Returns the record `run.json` and the report keep: `source` (`shipped`, `cache`,
    `calibrated-now`, `file`: a `question_encoder` given, or `none`), `path`, and for a key calibrated
    now `seconds` and its held-out measures. `progress` is the CLI's reporter: its `note` (if it has one)
    prints the line saying that a key is being calibrated, and how long it should take."""
    from moecli.routing.question import find_encoder

    feature = getattr(config, "query_feature", None)
    if feature is None:
        return {"source": "none", "reason": "the method routes by no question key"}
    if feature == "learned":
        return {"source": "file", "path": config.question_encoder}
    if feature != "auto":
        return {"source": "none", "reason": f"query_feature {feature}"}
    found = find_encoder(loaded.model, model_fingerprint)
    aside: dict = {}
    if found is not None and not is_shipped(found) and _outdated(found):
        aside["outdated_key_set_aside"] = str(found.rename(found.with_suffix(".outdated")))
        found = find_encoder(loaded.model, model_fingerprint)
    if found is not None:
        return {"source": "shipped" if is_shipped(found) else "cache", "path": str(found), **aside}
    why = ineligible(loaded, config)
    if why is not None:
        return {"source": "none", "reason": why}
    encoder, seconds = calibrate_shipped(loaded, progress)
    encoder.info["automatic"] = True
    where = install(encoder)
    info = encoder.info
    return {"source": "calibrated-now", "path": str(where), "seconds": round(seconds, 1),
            **{k: info[k] for k in ("records", "prompts", "auc", "recall_at_threshold", "false_match_rate",
                                    "per_source") if k in info}, **aside}


def _outdated(path: Path) -> bool:
    """[choice] A key the automatic calibration made from other data than today's defaults (`SHIPPED`: an older
    moecli's) is set aside (renamed `*.outdated`, kept): the shipped key for the model is taken instead if there
    is one, else one is calibrated again. A key a user made with `moecli calibrate` is never replaced."""
    from moecli.routing.question import encoder_info

    info = encoder_info(path) or {}
    return bool(info.get("automatic")) and info.get("sources") != [s.label for s in SHIPPED]


def calibrate_shipped(loaded, progress: Callable[..., None] | None = None, seed: int = 0,
                      text: bool | None = None) -> tuple[object, float]:
    """(encoder, seconds): a question key for `loaded` from the shipped data's default ranges, with the
    MiniLM skeleton where MiniLM is installed (`text` None), announced through `progress.note`."""
    from moecli.routing import sentence
    from moecli.routing.question import calibrate

    t0 = time.perf_counter()
    text = sentence.available() if text is None else text
    records, labels, counts = shipped_records(seed=seed)
    note = getattr(progress, "note", None)

    def announce(seconds: float, prompts: int) -> None:
        if note is not None:
            note(f"question key: none for this model yet; calibrating one from the shipped train data "
                 f"({len(records)} records, {prompts} prompts, about {_duration(seconds)}; once per model, "
                 f"cached in $MOECLI_CACHE/questions; auto_calibrate=false skips it)")

    encoder = calibrate(loaded, records, seed=seed, sources=labels, progress=progress, text=text,
                        groups=[label for label, n in zip(labels, counts) for _ in range(n)], estimate=announce)
    return encoder, time.perf_counter() - t0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min"


def calibration_sources(data: list[Path] | None, spans: list[str], same_subject: int, seed: int,
                        fmt: str | None = None) -> tuple[list, list[str], list[str]]:
    """The records `calibrate` trains a key on: the `--data` files (the shipped train files when there are
    none), each cut to its `START:END` span; returns the records, each record's source label, and the labels
    in order (held-out figures are reported per source)."""
    if data:
        sources = [(path, spans[i] if spans else None) for i, path in enumerate(data)]
        if spans and len(spans) != len(data):
            raise UserError(f"--records: give one START:END per --data file ({len(data)} files, {len(spans)} ranges)")
    else:  # the shipped train files, their default ranges unless --records gives others
        if spans and len(spans) != len(SHIPPED):
            raise UserError(f"--records: give one START:END per shipped file ({', '.join(s.name for s in SHIPPED)})")
        sources = [(s.path, spans[i] if spans else f"{s.start}:{s.end}") for i, s in enumerate(SHIPPED)]
    picked, groups, labels = [], [], []
    for path, span in sources:
        start, end = 0, None
        if span is not None:
            try:
                start, end = (int(v) for v in span.split(":"))
            except ValueError:
                raise UserError(f"--records {span!r}: expected START:END, e.g. 0:1000") from None
        part = calibration_records(path, start, end, same_subject, seed, fmt)
        name = str(path) if data else f"shipped:{Path(path).name.split('.')[0]}"
        label = f"{name}[{span}]" if span else name
        picked += part
        groups += [label] * len(part)
        labels.append(label)
    return picked, groups, labels
