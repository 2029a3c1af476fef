"""Tests for moecli.data.records: the readers on the real benchmark files, the error messages users see
for broken files, the atomic JSONL writer, and property tests (round trip; garbage never crashes).

The real data is read from the shared data folder and never copied into the repository; the tests
that need it skip with a message when it is absent.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import shared_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecli.data.readers import FORMATS, ReadResult, detect_format, read_records, write_jsonl
from moecli.data.records import EditRecord, LocalityPair, PortabilityPair, validate_record
from moecli.errors import UserError

HERE = Path(__file__).resolve().parent
ROME_FIXTURE = HERE / "data" / "counterfact_rome_sample.json"


# file -> (format, number of records, number of records with an empty locality answer)
REAL_FILES = {
    "zsre_eval_3k.json": ("zsre", 3000),
    "counterfact_edit.json": ("counterfact", 10000),
    "counterfact_train.json": ("counterfact", 10000),
    "hallucination_edit.json": ("hallucination", 600),
    "hallucination_train.json": ("hallucination", 306),
}

_cache: dict[str, tuple[ReadResult, list[dict]]] = {}


def real(name: str) -> tuple[ReadResult, list[dict]]:
    """The file read by moecli and by plain json (cached: each real file is parsed once per run)."""
    path = shared_data(name)
    if name not in _cache:
        _cache[name] = (read_records(path), json.loads(path.read_text(encoding="utf-8")))
    return _cache[name]


# ---------------------------------------------------------------------------------------------
# Real data


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_file_counts_and_invariants(name: str) -> None:
    result, raw = real(name)
    fmt, n = REAL_FILES[name]
    assert result.format == fmt
    assert len(raw) == n
    # No real record is invalid, and no ZsRE alt is blank in this sample.
    assert result.skipped == 0 and result.problems == []
    assert len(result.records) == n
    for rec in result.records:
        assert validate_record(rec) is None
        # Later code finds the subject by plain substring search; all real subjects match literally.
        assert rec.subject and rec.subject in rec.prompt


def test_real_zsre_mapping() -> None:
    result, raw = real("zsre_eval_3k.json")
    first = result.records[0]
    assert first == EditRecord(
        prompt="Which river system contains Charity Creek?",
        target="Chichester River",
        subject="Charity Creek",
        ground_truth="Parramatta River",
        rephrases=["What river system is Charity Creek in?"],
        locality=[LocalityPair("nq question: how many series of diary of a wimpy kid are there", "12", "nq")],
    )
    # alt is stripped (67 real ones have stray spaces); the nq prefix is kept everywhere.
    padded = [i for i, r in enumerate(raw) if r["alt"] != r["alt"].strip()]
    assert len(padded) == 67
    for i in padded:
        assert result.records[i].target == raw[i]["alt"].strip()
    assert all(r.locality[0].prompt.startswith("nq question: ") for r in result.records)
    assert all(r.ground_truth == raw[i]["answers"][0] for i, r in enumerate(result.records))
    assert len({r.id for r in result.records}) == 3000


@pytest.mark.parametrize("name", ["counterfact_edit.json", "counterfact_train.json"])
def test_real_counterfact_mapping(name: str) -> None:
    result, raw = real(name)
    for rec, r in zip(result.records[:50], raw[:50]):
        assert rec == EditRecord(
            prompt=r["prompt"],
            target=r["target_new"],
            subject=r["subject"],
            ground_truth=r["ground_truth"],
            rephrases=[r["rephrase_prompt"]],
            locality=[LocalityPair(r["locality_prompt"], r["locality_ground_truth"], "neighborhood")],
            id=str(r["case_id"]),
        )
    assert len({r.id for r in result.records}) == 10000
    if name == "counterfact_edit.json":
        first = result.records[0]
        assert (first.id, first.prompt, first.target, first.ground_truth) == (
            "0",
            "The mother tongue of Danielle Darrieux is",
            "English",
            "French",
        )


@pytest.mark.parametrize(("name", "empty_loc"), [("hallucination_edit.json", 7), ("hallucination_train.json", 5)])
def test_real_hallucination_mapping(name: str, empty_loc: int) -> None:
    result, raw = real(name)
    rec, r = result.records[0], raw[0]
    assert rec == EditRecord(
        prompt=r["prompt"],
        target=r["target_new"],
        subject=r["subject"],
        locality=[LocalityPair(r["locality_prompt"], r["locality_ground_truth"], "web")],
    )
    assert all(not x.rephrases and x.ground_truth is None for x in result.records)
    # Prompts keep their whitespace; empty locality answers are kept as the WISE data has them.
    assert sum(1 for x in result.records if x.locality[0].answer == "") == empty_loc


def test_real_limit_and_jsonl_round_trip(tmp_path: Path) -> None:
    result, _ = real("counterfact_edit.json")
    assert read_records(shared_data("counterfact_edit.json"), limit=5).records == result.records[:5]
    out = tmp_path / "cf.jsonl"
    write_jsonl(result.records[:2000], out)
    back = read_records(out)
    assert back.format == "jsonl" and back.records == result.records[:2000]


# ---------------------------------------------------------------------------------------------
# Format detection and override


def cf(**over) -> dict:
    """A valid CounterFact (EasyEdit) record, with fields replaced or removed (value None)."""
    rec = {
        "case_id": 7,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux grew up speaking",
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    }
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not None}


def zsre(**over) -> dict:
    rec = {
        "subject": "Charity Creek",
        "src": "Which river system contains Charity Creek?",
        "pred": "Parramatta River",
        "rephrase": "What river system is Charity Creek in?",
        "alt": " Chichester River ",
        "answers": ["Parramatta River"],
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare",
        "cond": "x",
    }
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not None}


def write(tmp_path: Path, obj, name: str = "data.json") -> Path:
    path = tmp_path / name
    if isinstance(obj, bytes):
        path.write_bytes(obj)
    elif isinstance(obj, str):
        path.write_text(obj, encoding="utf-8")
    else:
        path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    return path


def test_detect_format() -> None:
    assert detect_format(zsre()) == "zsre"
    assert detect_format(cf()) == "counterfact"
    assert detect_format(cf(case_id=None, ground_truth=None, rephrase_prompt=None)) == "hallucination"
    assert detect_format(json.loads(ROME_FIXTURE.read_text())[0]) == "counterfact-rome"
    assert detect_format(EditRecord("p", "t").to_dict()) == "jsonl"
    assert detect_format({"question": "q", "answer": "a"}) is None
    assert detect_format([1, 2]) is None  # type: ignore[arg-type]


def test_zsre_record_strip_and_skip_empty_alt(tmp_path: Path) -> None:
    path = write(tmp_path, [zsre(), zsre(alt="   ", src="Where is Charity Creek?"), zsre(src="Is Charity Creek wet?")])
    result = read_records(path)
    assert [r.target for r in result.records] == ["Chichester River", "Chichester River"]
    assert result.skipped == 1
    assert result.problems == [f"{path}:record 2: empty target ('alt' is blank); skipped as ZsRE readers do"]
    # limit counts valid records, after skipping
    assert [r.prompt for r in read_records(path, limit=2).records] == [
        "Which river system contains Charity Creek?",
        "Is Charity Creek wet?",
    ]
    assert read_records(path, limit=0) == ReadResult([], "zsre", 0, [])


def test_format_override(tmp_path: Path) -> None:
    # Without CounterFact-only fields this is detected as WISE hallucination ...
    path = write(tmp_path, [cf(case_id=None, ground_truth=None, rephrase_prompt=None)])
    assert read_records(path).records[0].locality[0].group == "web"
    # ... and --format counterfact reads it as CounterFact.
    forced = read_records(path, format="counterfact")
    assert forced.format == "counterfact"
    assert forced.records[0].locality[0].group == "neighborhood"
    with pytest.raises(UserError) as e:
        read_records(path, format="zsre")
    assert str(e.value) == f"{path}:record 1: missing required field 'src'"
    with pytest.raises(UserError, match="unknown format 'csv'; known formats: zsre, counterfact"):
        read_records(path, format="csv")


def test_rome_fixture() -> None:
    result = read_records(ROME_FIXTURE)
    assert result.format == "counterfact-rome" and result.skipped == 0
    first, second = result.records
    assert first == EditRecord(
        prompt="The mother tongue of Danielle Darrieux is",
        target="English",
        subject="Danielle Darrieux",
        ground_truth="French",
        rephrases=["Danielle Darrieux grew up speaking", "The first language of Danielle Darrieux is"],
        locality=[
            LocalityPair("The mother tongue of Jean Gabin is", "French", "neighborhood"),
            LocalityPair("The native language of Michel Rocard is", "French", "neighborhood"),
            LocalityPair("Simone Signoret spoke the language", "French", "neighborhood"),
        ],
        id="0",
    )
    assert (second.prompt, second.id, second.target) == ("BBC One, by", "10", "Sega")


def test_rome_bad_fields(tmp_path: Path) -> None:
    rec = json.loads(ROME_FIXTURE.read_text())[1]
    rec["requested_rewrite"]["prompt"] = "BBC One, by"
    rec2 = json.loads(ROME_FIXTURE.read_text())[1]
    del rec2["requested_rewrite"]["target_new"]["str"]
    path = write(tmp_path, [rec, rec2])
    result = read_records(path, skip_invalid=True)
    assert result.problems == [
        f"{path}:record 1: field 'requested_rewrite.prompt' has no '{{}}' where the subject goes",
        f"{path}:record 2: missing required field 'requested_rewrite.target_new.str'",
    ]


def test_containers(tmp_path: Path) -> None:
    recs = [cf(), cf(case_id=8)]
    lines = "\n".join(json.dumps(r) for r in recs)
    # JSON lines with blank lines and CRLF, with a non-.jsonl name; {"data": [...]}; a BOM.
    for path in (
        write(tmp_path, "\n" + lines.replace("\n", "\r\n\r\n") + "\n\n", "a.json"),
        write(tmp_path, lines, "b.jsonl"),
        write(tmp_path, {"data": recs}, "c.json"),
        write(tmp_path, b"\xef\xbb\xbf" + json.dumps(recs).encode(), "d.json"),
    ):
        result = read_records(path)
        assert [r.id for r in result.records] == ["7", "8"], path
    single = read_records(write(tmp_path, cf(), "e.json"))
    assert [r.id for r in single.records] == ["7"]


def test_jsonl_bad_line_is_a_bad_record(tmp_path: Path) -> None:
    good = json.dumps(EditRecord("Paris is in", "Italy").to_dict())
    other = json.dumps(EditRecord("Rome is in", "France").to_dict())
    path = write(tmp_path, f"{good}\n\n{good[:-5]}\n{other}\n", "x.jsonl")
    with pytest.raises(UserError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}:record 2: not valid JSON (line 3, column ")
    result = read_records(path, skip_invalid=True)
    assert len(result.records) == 2 and result.skipped == 1


# ---------------------------------------------------------------------------------------------
# Broken files: exact messages


BAD_RECORDS = [
    (cf(target_new=None), "missing required field 'target_new'"),
    (cf(target_new="  "), "empty target"),
    (cf(prompt=""), "empty prompt"),
    (cf(subject="Audrey Hepburn"), "subject 'Audrey Hepburn' not found in prompt"),
    (
        cf(subject="danielle darrieux"),
        "subject 'danielle darrieux' not found in prompt (it appears with different case: 'Danielle Darrieux')",
    ),
    (cf(subject=""), "empty subject (leave it out instead)"),
    (cf(prompt=5), "field 'prompt' must be a string, got number"),
    (cf(subject=["x"]), "field 'subject' must be a string, got list"),
    (cf(case_id=1.5), "field 'case_id' must be a number or a string, got number"),
    (cf(rephrase_prompt=[1]), "field 'rephrase_prompt' must be a string or a list of strings, got list"),
    (cf(rephrase_prompt=" "), "rephrase 1 is empty"),
    (cf(locality_ground_truth=None), "field 'locality_prompt' is given but 'locality_ground_truth' is missing"),
    (
        cf(locality_prompt=["a", "b"], locality_ground_truth=["c"]),
        "fields 'locality_prompt' and 'locality_ground_truth' have different lengths (2 vs 1)",
    ),
    ([1, 2], "expected a JSON object, got list"),
]


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS, ids=[m for _, m in BAD_RECORDS])
def test_bad_record_message(tmp_path: Path, record, message: str) -> None:
    path = write(tmp_path, [cf(case_id=1), record, cf(case_id=3)])
    with pytest.raises(UserError) as e:
        read_records(path, format="counterfact")
    assert str(e.value) == f"{path}:record 2: {message}"
    result = read_records(path, format="counterfact", skip_invalid=True)
    assert [r.id for r in result.records] == ["1", "3"]
    assert result.skipped == 1 and result.problems == [f"{path}:record 2: {message}"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "p", "target": "t", "locality": [{"prompt": "q"}]}, "missing required field 'locality[1].answer'"),
        (
            {"prompt": "p", "target": "t", "portability": {}},
            "field 'portability' must be a list of objects, got object",
        ),
        ({"prompt": "p", "target": "t", "id": []}, "field 'id' must be a string, got list"),
        ({"prompt": "p", "target": "t", "rephrases": "r"}, "field 'rephrases' must be a list of strings, got string"),
        (zsre(answers="Parramatta"), "field 'answers' must be a list of strings, got string"),
        (zsre(src=None), "missing required field 'src'"),
    ],
)
def test_bad_record_message_other_formats(tmp_path: Path, record: dict, message: str) -> None:
    fmt = "zsre" if "cond" in record else "jsonl"
    path = write(tmp_path, json.dumps(record) + "\n", "r.jsonl")
    with pytest.raises(UserError) as e:
        read_records(path, format=fmt)
    assert str(e.value) == f"{path}:record 1: {message}"


def test_bad_files(tmp_path: Path) -> None:
    def msg(path: Path) -> str:
        with pytest.raises(UserError) as e:
            read_records(path)
        return str(e.value)

    missing = tmp_path / "nope.json"
    assert msg(missing) == f"{missing}: no such file"
    assert msg(tmp_path) == f"{tmp_path}: is a directory, not a file"
    empty = write(tmp_path, "  \n", "empty.json")
    assert msg(empty) == f"{empty}: empty file"
    no_records = write(tmp_path, "[]", "none.json")
    assert msg(no_records) == f"{no_records}: contains no records"
    truncated = write(tmp_path, '[\n  {"prompt": "a", "target": "b"},\n  {"prompt": "c", "tar', "trunc.json")
    assert msg(truncated) == f"{truncated}: not valid JSON (line 3, column 19: Unterminated string starting at)"
    broken_obj = write(tmp_path, '{"prompt": "a",', "obj.json")
    assert msg(broken_obj).startswith(f"{broken_obj}: not valid JSON (line 1, column 16: ")
    scalar = write(tmp_path, '"just a string"', "s.json")
    assert msg(scalar) == f"{scalar}: expected a JSON list of records or JSON lines, got a JSON string"
    latin1 = write(tmp_path, b'[{"prompt": "Caf' + b"\xe9" + b'"}]', "latin1.json")
    assert msg(latin1) == f"{latin1}: not valid UTF-8 (byte 0xe9 at offset 16); re-save the file as UTF-8"


def test_undetectable_format(tmp_path: Path) -> None:
    path = write(tmp_path, [{"prompt": "Paris is in", "answer": "France"}])
    with pytest.raises(UserError) as e:
        read_records(path)
    assert str(e.value) == (
        f"{path}:record 1: cannot tell the format from the fields (seen: answer, prompt); "
        "closest is counterfact, missing field 'target_new', 'rephrase_prompt'; "
        "known formats: zsre (src, alt); counterfact-rome (requested_rewrite); "
        "counterfact (prompt, target_new, rephrase_prompt); hallucination (prompt, target_new); "
        "jsonl (prompt, target); choose one with --format"
    )
    # Detection failure is about the file, so skip_invalid does not hide it.
    with pytest.raises(UserError, match="cannot tell the format"):
        read_records(path, skip_invalid=True)
    nothing = write(tmp_path, [{"q": 1}], "n.json")
    with pytest.raises(UserError, match=r"\(seen: q\); known formats: zsre"):
        read_records(nothing)


def test_skip_invalid_counts_everything(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [cf(case_id=1), cf(target_new=""), cf(subject="Nobody"), cf(prompt=None), "x", cf(case_id=6)],
    )
    result = read_records(path, skip_invalid=True)
    assert [r.id for r in result.records] == ["1", "6"]
    assert result.skipped == 4
    assert [p.split(": ", 1)[0] for p in result.problems] == [f"{path}:record {n}" for n in (2, 3, 4, 5)]
    assert read_records(path, skip_invalid=True, limit=1).skipped == 0


def test_validate_record_direct() -> None:
    assert validate_record(EditRecord("Paris is in", "Italy", subject="Paris")) is None
    assert validate_record(EditRecord("Paris is in", "")) == "empty target"
    assert validate_record(EditRecord("Paris is in", "x", locality=[LocalityPair(" ", "a")])) == (
        "locality item 1 has an empty prompt"
    )
    assert validate_record(EditRecord("Paris is in", "x", portability=[("a", "b")])) == (  # type: ignore[list-item]
        "portability item 1 must be a PortabilityPair, got tuple"
    )


# ---------------------------------------------------------------------------------------------
# Writing


def test_round_trip_and_to_dict(tmp_path: Path) -> None:
    recs = [
        EditRecord(
            "Ünïcode\u2028prompt with Paris",
            "target",
            subject="Paris",
            ground_truth="old",
            rephrases=["r1", "r2"],
            locality=[LocalityPair("l", "a", "nq")],
            portability=[PortabilityPair("p", "a")],
            id="x1",
        ),
        EditRecord("lone \ud800 surrogate", "t"),
    ]
    assert [r.to_dict() for r in recs] == [asdict(r) for r in recs]
    path = tmp_path / "out.jsonl"
    write_jsonl(recs, path)
    assert path.read_text(encoding="utf-8").count("\n") == 2
    assert read_records(path).records == recs
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("precious\n")
    calls = {"n": 0}
    real_dumps = json.dumps

    def flaky(obj, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_dumps(obj, **kw)

    monkeypatch.setattr(json, "dumps", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        write_jsonl([EditRecord(f"p{i}", "t") for i in range(5)], path)
    monkeypatch.undo()
    assert path.read_text() == "precious\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_write_creates_directory_and_reports_errors(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir" / "out.jsonl"
    write_jsonl([EditRecord("p", "t")], out)
    assert read_records(out).records == [EditRecord("p", "t")]
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot create directory"):
        write_jsonl([EditRecord("p", "t")], blocker / "out.jsonl")
    with pytest.raises(UserError, match="cannot write"):
        write_jsonl([EditRecord("p", "t")], tmp_path / "new")  # a directory is in the way


# ---------------------------------------------------------------------------------------------
# Properties

_text = st.text(min_size=1, max_size=30).filter(lambda s: s.strip())
_pair = st.tuples(_text, st.text(max_size=10), st.sampled_from(["nq", "web", "neighborhood"]))


def draw_prompt_and_subject(draw, text) -> tuple[str, str | None]:
    """A prompt, and sometimes a non-blank slice of it as the subject (shared by the reader properties)."""
    prompt = draw(text)
    subject = None
    if draw(st.booleans()):
        i = draw(st.integers(0, len(prompt) - 1))
        j = draw(st.integers(i + 1, len(prompt)))
        subject = prompt[i:j] if prompt[i:j].strip() else None
    return prompt, subject


@st.composite
def edit_records(draw) -> EditRecord:
    prompt, subject = draw_prompt_and_subject(draw, _text)
    return EditRecord(
        prompt=prompt,
        target=draw(_text),
        subject=subject,
        ground_truth=draw(st.none() | st.text(max_size=10)),
        rephrases=draw(st.lists(_text, max_size=3)),
        locality=[LocalityPair(*p) for p in draw(st.lists(_pair, max_size=3))],
        portability=[PortabilityPair(*p) for p in draw(st.lists(_pair, max_size=2))],
        id=draw(st.just("") | _text),
    )


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(edit_records(), min_size=1, max_size=5, unique_by=lambda r: r.id))
def test_property_round_trip(recs: list[EditRecord]) -> None:
    assert all(validate_record(r) is None for r in recs)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.jsonl"
        write_jsonl(recs, path)
        result = read_records(path)
    assert result.format == "jsonl" and result.skipped == 0
    assert result.records == recs


_FIELDS = sorted(
    {"src", "alt", "answers", "rephrase", "loc", "loc_ans", "subject", "prompt", "target_new", "target"}
    | {"ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth", "case_id"}
    | {"requested_rewrite", "paraphrase_prompts", "neighborhood_prompts", "str", "locality", "id"}
    | {"portability", "rephrases", "answer", "group", "target_true", "data"}
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_FIELDS), inner, max_size=6),
    max_leaves=12,
)


def _read_garbage(data: bytes, fmt: str | None, skip: bool, name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        try:
            read_records(path, format=fmt, skip_invalid=skip)
        except UserError:
            pass


_formats = st.sampled_from((None, *FORMATS))
_names = st.sampled_from(["g.json", "g.jsonl"])


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(max_size=200), _formats, st.booleans(), _names)
def test_property_garbage_bytes_only_raise_user_error(data: bytes, fmt, skip: bool, name: str) -> None:
    _read_garbage(data, fmt, skip, name)


@settings(max_examples=120, deadline=None, database=None)
@given(st.lists(_json, max_size=4), _formats, st.booleans(), _names, st.booleans())
def test_property_garbage_json_only_raises_user_error(values, fmt, skip: bool, name: str, lines: bool) -> None:
    text = "\n".join(json.dumps(v) for v in values) if lines else json.dumps(values)
    _read_garbage(text.encode(), fmt, skip, name)
