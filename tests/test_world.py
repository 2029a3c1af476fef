"""The fact world: generator determinism and minimums, export validity, a tiny trainer run, caching."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moecli.data.readers import read_records, write_jsonl
from moecli.errors import UserError
from moecli.world import store
from moecli.world.commands import world_app
from moecli.world.generator import RELATIONS, build_world
from moecli.world.trainer import KnowledgeModelConfig, train_knowledge_model

TINY = KnowledgeModelConfig(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=128,
    vocab_size=300,
    lr=1e-2,
    warmup_steps=5,
    batch_size=8,
    max_epochs=150,
    target_accuracy=1.0,
    num_threads=1,
)
TINY_FACTS = [
    ("Alice Moreau was born in", "Paris"),
    ("Bruno Keller was born in", "Lima"),
    ("Clara Novak was born in", "Tokyo"),
    ("Daniel Silva was born in", "Cairo"),
    ("Alice Moreau works for", "Northwind"),
    ("Bruno Keller works for", "Bluepeak"),
    ("Clara Novak works for", "Corvane"),
    ("Daniel Silva works for", "Dellmark"),
]


@pytest.fixture(scope="module")
def world():
    return build_world(0)


# ---------------------------------------------------------------- generator
def test_same_seed_same_world(world):
    again = build_world(0)
    assert again.facts() == world.facts()
    assert [r.to_dict() for r in again.edit_records(200)] == [r.to_dict() for r in world.edit_records(200)]


def test_different_seed_different_world(world):
    other = build_world(1)
    assert other.facts() != world.facts()
    assert [r.to_dict() for r in other.edit_records(50)] != [r.to_dict() for r in world.edit_records(50)]


def test_minimum_sizes(world):
    assert sum(len(v) for v in world.entities.values()) >= 300
    assert len({t for t, v in world.entities.items() if v}) >= 5
    assert len(RELATIONS) >= 6
    for rel in RELATIONS:
        assert len(rel.templates) >= 3
        assert any(t.rstrip().endswith("?") or "?" in t for t in rel.templates), rel.name  # a question form
    assert world.max_edits() >= 1000


def test_subject_in_every_prompt_and_typed_objects(world):
    for rel in RELATIONS:
        objects = set(world.entities[rel.object_type])
        for s in world.subjects(rel.name):
            assert world.obj(s, rel.name) in objects
            for t in rel.templates:
                assert s in t.format(s=s)


def test_edit_records_are_valid_edits(world):
    records = world.edit_records(1000)
    assert len({r.id for r in records}) == 1000
    pairs = [(r.subject, r.id.split("-")[1]) for r in records]
    assert len(set(pairs)) == 1000  # never two edits of one (subject, relation)
    by_rel = Counter(rel for _, rel in pairs)
    assert len(by_rel) == len(RELATIONS)  # spread over every relation
    edited = set(pairs)
    for r, (subject, rel_name) in zip(records, pairs):
        rel = next(x for x in RELATIONS if x.name == rel_name)
        assert r.ground_truth == world.obj(subject, rel_name)
        assert r.target != r.ground_truth and r.target in world.entities[rel.object_type]
        assert r.subject in r.prompt and all(r.subject in p for p in r.rephrases)
        assert len(r.rephrases) == len(rel.templates) - 1
        groups = {lp.group for lp in r.locality}
        assert groups == {"same_relation", "same_subject"}
        for lp in r.locality:  # locality facts are never edited by any record of the set
            loc_subject = next(s for s in world.subjects(rel_name) + [subject] if s in lp.prompt)
            assert lp.answer
            assert (loc_subject, rel_name) not in edited or lp.group == "same_subject"
        for pp in r.portability:
            assert pp.group == "one_hop" and subject in pp.prompt
    assert sum(1 for r in records if r.portability) > 100


def test_prefix_stability(world):
    assert [r.id for r in world.edit_records(100)] == [r.id for r in world.edit_records(300)[:100]]


def test_export_passes_reader(tmp_path, world):
    path = tmp_path / "edits.jsonl"
    records = world.edit_records(300)
    write_jsonl(records, path)
    back = read_records(path)
    assert back.skipped == 0
    assert [r.to_dict() for r in back.records] == [r.to_dict() for r in records]


def test_export_command(tmp_path):
    path = tmp_path / "fw.jsonl"
    res = CliRunner().invoke(world_app, ["export", "--n", "25", "--out", str(path)])
    assert res.exit_code == 0, res.output
    assert len(read_records(path).records) == 25
    res = CliRunner().invoke(world_app, ["export", "--n", "100000", "--out", str(path)])
    assert isinstance(res.exception, UserError)


def test_facts_cover_every_template_and_one_hop(world):
    by_template = world.facts_by_template()
    assert len(by_template) == sum(len(r.templates) for r in RELATIONS) + len(world.one_hops)
    # the pre-edit answer of every portability prompt is a trained fact
    facts = dict(world.facts())
    for r in world.edit_records(200):
        for pp in r.portability:
            assert pp.prompt in facts


# ---------------------------------------------------------------- trainer and store
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    result = train_knowledge_model(TINY_FACTS, out, TINY)
    return out, result


def test_tiny_trainer_learns_facts(tiny_model):
    out, result = tiny_model
    assert result.accuracy >= 0.9
    assert result.reached_target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecli.engine.evaluation import answer_token_accuracy

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    accs = answer_token_accuracy(model.eval(), tok, TINY_FACTS)
    assert sum(accs) / len(accs) >= 0.9
    info = json.loads((out / "knowledge.json").read_text())
    assert info["accuracy"] >= 0.9 and info["n_facts"] == len(TINY_FACTS)


def test_benchmark_model_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECLI_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "mini.jsonl"
    world = build_world(0)
    write_jsonl(world.edit_records(4), data)
    cfg = KnowledgeModelConfig(**{**TINY.__dict__, "max_epochs": 2, "target_accuracy": 0.0})
    calls = []

    real = store.train_knowledge_model

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(store, "train_knowledge_model", counting)
    first = store.benchmark_model_dir(data, 4, config=cfg)
    assert len(calls) == 1 and (first / "config.json").is_file()
    info = json.loads((first / "knowledge.json").read_text())
    assert info["group_counts"] == {"prompt": 4, "rephrase": 8, "locality": 8}

    def fail(*a, **k):
        raise AssertionError("the cached model must be reused")

    monkeypatch.setattr(store, "train_knowledge_model", fail)
    assert store.benchmark_model_dir(data, 4, config=cfg) == first
    # another n is another model
    with pytest.raises(AssertionError):
        store.benchmark_model_dir(data, 3, config=cfg)


def test_build_from_prints_dir_last(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECLI_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "mini.jsonl"
    write_jsonl(build_world(0).edit_records(3), data)
    small = KnowledgeModelConfig(**{**TINY.__dict__, "max_epochs": 1, "target_accuracy": 0.0})
    orig = store.benchmark_model_dir

    def with_small_config(path, n=1000, progress=None, **kw):
        return orig(path, n, progress, **{**kw, "config": small})

    monkeypatch.setattr(store, "benchmark_model_dir", with_small_config)
    res = CliRunner().invoke(world_app, ["build", "--from", str(data), "--n", "3", "--quiet"])
    assert res.exit_code == 0, res.output
    last = res.stdout.strip().splitlines()[-1]
    assert (tmp_path / "cache") in Path(last).parents
    res = CliRunner().invoke(world_app, ["build", "--from", str(tmp_path / "missing.json")])
    assert isinstance(res.exception, UserError)
    res = CliRunner().invoke(world_app, ["build", "--n", "5"])  # --n needs --from
    assert isinstance(res.exception, UserError)


def test_default_model_dir_prefers_committed(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECLI_CACHE", str(tmp_path / "cache"))
    committed = store.committed_model_dir()
    if committed is None:
        pytest.skip("no committed fact-world model (run `moecli world build --rebuild`)")
    assert store.default_model_dir() == committed
    info = json.loads((committed / "world.json").read_text())
    assert min(info["group_accuracy"].values()) >= 0.95
    assert sum(f.stat().st_size for f in committed.iterdir()) <= 8_000_000
    # a sample of every template, scored by the evaluator's metric, confirms the recorded figure
    facts, groups = store.fact_world_training_set(build_world(0))
    sample = [i for i in range(len(facts)) if i % 20 == 0]
    acc, _ = store.measure_model(committed, [facts[i] for i in sample], [groups[i] for i in sample])
    assert acc >= 0.95
