"""The `same_subject` locality probes built for real datasets: the edited subject asked about another
relation, taken from the file's own prompts; deterministic; never a form of the edited relation."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_moecli, shared_data

from moecli.data.probes import RelationTest, relation_evidence, relation_test, with_same_subject
from moecli.data.readers import read_records
from moecli.data.records import EditRecord, LocalityPair


def _rec(prompt: str, subject: str, target: str, truth: str, rephrase: str = "", neighbour_answer: str = ""):
    loc = [LocalityPair("Someone else " + prompt.replace(subject, "").strip(), neighbour_answer, "neighborhood")]
    return EditRecord(prompt=prompt, target=target, subject=subject, ground_truth=truth,
                      rephrases=[rephrase] if rephrase else [], locality=loc if neighbour_answer else [])


RECORDS = [
    _rec("The mother tongue of Ann Li is", "Ann Li", "English", "French", "Ann Li speaks the language of", "Dutch"),
    _rec("Bo Chan is a native speaker of", "Bo Chan", "Dutch", "Korean"),  # shares "Dutch": the same relation
    _rec("Which river system contains Cy Creek?", "Cy Creek", "Amazon", "Nile"),
    _rec("What river system is Dee Brook in?", "Dee Brook", "Volga", "Rhine"),  # the same words: same relation
    _rec("Eve Moss works for", "Eve Moss", "Google", "Apple"),
    _rec("Fay Ross was born in", "Fay Ross", "Oslo", "Rome"),
]


def _formed(prompt: str, rephrase: str, subject: str, target: str) -> EditRecord:
    """A record whose prompt and rephrasing are forms ("{} died at") put on `subject`."""
    return EditRecord(prompt=prompt.format(subject), target=target, subject=subject,
                      rephrases=[rephrase.format(subject)])


def _probes(rec: EditRecord) -> list[str]:
    return [lp.prompt for lp in rec.locality if lp.group == "same_subject"]


def test_probes_put_the_subject_into_other_relations_prompts():
    out = with_same_subject(RECORDS, per_edit=2)
    assert len(out) == len(RECORDS)
    for rec, new in zip(RECORDS, out):
        probes = _probes(new)
        assert len(probes) == 2
        assert all(rec.subject in p and p != rec.prompt for p in probes)
        assert new.locality[: len(rec.locality)] == rec.locality  # the file's own pairs are kept, first
        assert all(lp.answer == "" for lp in new.locality if lp.group == "same_subject")  # the base model's, later
    ann = _probes(out[0])
    assert not any("native speaker" in p for p in ann)  # Bo Chan's form asks Ann Li's relation (shared answer)
    cy = _probes(out[2])
    assert not any("river system" in p for p in cy)  # Dee Brook's form shares its words


def test_probes_are_deterministic_and_follow_the_seed():
    assert with_same_subject(RECORDS, 2) == with_same_subject(RECORDS, 2)
    seeds = {tuple(_probes(with_same_subject(RECORDS, 2, seed=s)[4])) for s in range(6)}
    assert len(seeds) > 1


def test_no_probes_without_a_subject_or_when_off():
    bare = EditRecord(prompt="Paris is the capital of", target="Spain")
    out = with_same_subject([bare, *RECORDS], per_edit=3)
    assert out[0] == bare
    assert with_same_subject(RECORDS, per_edit=0) == RECORDS


def test_relation_test_is_pairwise_not_transitive():
    """Chains of shared answers must not join relations: A~B share "x", B~C share "y", A and C share nothing."""
    recs = [_rec("P of A1 is", "A1", "x", "p"), _rec("Q of B1 is", "B1", "x", "y"), _rec("R of C1 is", "C1", "y", "q")]
    test = RelationTest(recs)
    assert test.same(0, 1) and test.same(1, 2) and not test.same(0, 2)


def test_forms_that_records_pair_twice_are_one_relation_through_chains():
    """"_ died at" ~ "_ passed away at" ~ "_ expired at" by (prompt, rephrasing) pairs of two records each:
    records asking any of them are one relation; one pairing (support 1) joins nothing; rephrasings that
    carry a random first sentence are compared from the subject's sentence on."""
    died, passed, expired, born = "{} died at", "{} passed away at", "{} expired at", "{} was born in"
    recs = [_formed(died, "It rained. " + passed, "Ann", "Rome"), _formed(died, passed, "Bo", "Oslo"),
            _formed(passed, expired, "Cy", "Lima"), _formed(passed, "Then he left! " + expired, "Di", "Kyiv"),
            _formed(expired, expired, "Ed", "Pune"), _formed(born, died, "Fay", "Riga"),
            _formed(born, born, "Gus", "Baku")]
    test = RelationTest(recs)
    assert test.same(0, 4) and test.same(1, 2)  # chained, no shared answer, no shared content word
    assert not test.same(6, 4)  # "born"–"died" paired once only
    assert RelationTest(recs, support=3).same(0, 4) is False


def test_a_short_list_learns_its_relations_from_the_evidence():
    """Two forms joined only by records outside the edited list (a `--limit` run) still count as one
    relation: the probe "Ann at" (the form of record 1) is not made for Ann, whose relation it asks."""
    edited = [_formed("{} died in", "{} died in", "Ann", "Rome"),
              _formed("{} passed away at", "{} passed away at", "Bo", "Oslo"),
              _formed("{} was born in", "{} was born in", "Cy", "Lima")]
    evidence = [*edited, _formed("{} died in", "{} passed away at", "Di", "Kyiv"),
                _formed("{} died in", "{} passed away at", "Ed", "Pune")]
    assert not RelationTest(edited).same(0, 1)
    assert relation_test(edited, evidence).same(0, 1) and not relation_test(edited, evidence).same(0, 2)
    probes = _probes(with_same_subject(edited, per_edit=2, evidence=evidence)[0])
    assert probes == ["Ann was born in"]  # the only form of another relation
    assert len(_probes(with_same_subject(edited, per_edit=2)[0])) == 2  # without it, "Ann passed away at" too
    with pytest.raises(ValueError):
        relation_test(edited, evidence[1:])  # evidence that does not begin with the list is refused


def test_first_100_counterfact_records_get_no_probe_in_other_words():
    """The case measured on SmolLM2: on its own, the first 100 records' relation test let "Ferrari F40 is
    produced by" be a probe for "Ferrari F40, developed by"; learned from 1000 records it is not."""
    path = shared_data("counterfact_edit.json")
    records = read_records(path, limit=100).records
    ferrari = next(i for i, r in enumerate(records) if r.prompt == "Ferrari F40, developed by")
    evidence = relation_evidence(records, path)
    assert len(evidence) == 1000
    produced = next(j for j, r in enumerate(records) if r.prompt.endswith(" is produced by"))
    assert not relation_test(records).same(ferrari, produced)
    assert relation_test(records, evidence).same(ferrari, produced)
    probes = _probes(with_same_subject(records, 3, evidence=evidence)[ferrari])
    assert len(probes) == 3 and "Ferrari F40 is produced by" not in probes


@pytest.mark.parametrize("name", ["counterfact_edit.json", "zsre_eval_3k.json"])
def test_real_files_get_three_probes_per_edit_that_are_not_its_own_questions(name):
    records = read_records(shared_data(name), limit=300).records
    out = with_same_subject(records, per_edit=3)
    for rec, new in zip(records, out):
        probes = _probes(new)
        if rec.subject and rec.subject in rec.prompt:
            assert len(probes) == 3 and len(set(probes)) == 3
            assert all(rec.subject in p for p in probes)
            assert not set(probes) & {rec.prompt, *rec.rephrases}


def test_cli_option_adds_the_group_and_its_routing(tmp_path, capsys):
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        run_moecli(["world", "export", "--n", "4", "--out", "four.jsonl"], capsys)
        code, out, err = run_moecli(["batch-edit", "--data", "four.jsonl", "--batch-size", "4", "--out", "run",
                                     "--no-generate", "--json", "--same-subject", "2", "--max-steps", "30"], capsys)
        assert code == 0, err
        summary = json.loads(out)
        assert "same_subject" in summary["loc_by_group"]
        routing = summary["routing"]
        assert "loc_own" in routing and "loc_none:same_subject" in routing
        run = json.loads((tmp_path / "run" / "run.json").read_text())  # the probes are recorded with the run
        first = run["records"][0]
        assert sum(lp["group"] == "same_subject" for lp in first["locality"]) >= 2
        code, _, err = run_moecli(["evaluate", "--data", "four.jsonl", "--same-subject", "-1"], capsys)
        assert code == 2 and "--same-subject" in err and "Traceback" not in err
    finally:
        os.chdir(old)


def test_neighbours_that_ask_another_records_edit_are_not_locality_probes():
    from moecli.data.probes import without_edited_neighbours

    def rec(prompt, subject, target, neighbours):
        return EditRecord(prompt=prompt, target=target, subject=subject,
                          locality=[LocalityPair(p, f"{target} {k}", "neighborhood") for k, p in enumerate(neighbours)])

    records = [
        rec("Hank Aaron plays the sport of", "Hank Aaron", "soccer", []),
        rec("Babe Ruth plays the sport of", "Babe Ruth", "golf", [
            "Hank Aaron plays the sport of",  # Hank Aaron's sport is edited: the edit should change it
            "Hank Aaron Stadium plays the sport of",  # a longer name: another subject
            "Ty Cobb plays the sport of",
        ]),
        rec("Ty Cobb was born in", "Ty Cobb", "Oslo", ["Hank Aaron was born in"]),  # not an edited relation
    ]
    out, dropped = without_edited_neighbours(records)
    assert dropped == 1
    assert [lp.prompt for lp in out[1].locality] == ["Hank Aaron Stadium plays the sport of",
                                                      "Ty Cobb plays the sport of"]
    assert out[2].locality == records[2].locality and out[0] is records[0]
