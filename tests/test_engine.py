"""The MoE bypass engine and MEMoE on tiny models: no-op at init, clean removal, edits that take,
checkpoints that reload exactly, seeds that reproduce, and refusal on another base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moecli.data.records import EditRecord, LocalityPair
from moecli.engine.adapters import load_edited
from moecli.engine.evaluation import compute_baseline, evaluate_records
from moecli.engine.run import RunSpec, run_edits
from moecli.errors import UserError
from moecli.methods.memoe import MEMoE, MEMoEConfig
from moecli.model.loading import load_model
from moecli.model.tiny import make_tiny_model

RECORDS = [
    EditRecord(prompt="Alice Moreau was born in", target="Tokyo", subject="Alice Moreau",
               rephrases=["Where was Alice Moreau born?"],
               locality=[LocalityPair("Carl Jung was born in", "Paris", "same_relation")]),
    EditRecord(prompt="Bruno Keller works for", target="Northwind", subject="Bruno Keller",
               locality=[LocalityPair("The capital of France is", "Paris", "other")]),
]
FAST = {"lr": 0.02, "max_steps": 200, "retain": "none", "stop_prob": 0.0}  # argmax is enough here


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


def _logits(loaded, text: str) -> torch.Tensor:
    enc = loaded.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**enc).logits.clone()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("form", ["dense", "lowrank"])
def test_fresh_adapter_is_exact_noop_and_removal_restores(tmp_path, family, form):
    loaded = load_model(make_tiny_model(family, tmp_path / family))
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    text = "Alice Moreau was born in Paris"
    before = _logits(loaded, text)
    method = MEMoE(loaded, MEMoEConfig(expert_form=form, null_route=False), seed=0)
    method.register_anchors(RECORDS)
    assert torch.equal(_logits(loaded, text), before)  # zero-initialised experts: identity
    method.apply_batch(RECORDS, 0)
    method.remove()
    assert torch.equal(_logits(loaded, text), before)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # base weights bit-identical


def test_edit_changes_answer_and_null_route_keeps_unrelated(tiny_dir):
    loaded = load_model(tiny_dir)
    base = compute_baseline(loaded.model, loaded.tokenizer, RECORDS)
    before = evaluate_records(loaded.model, loaded.tokenizer, RECORDS, base, generation=False).summary
    method = MEMoE(loaded, MEMoEConfig(**FAST), seed=0)
    stats = method.apply_batch(RECORDS, 0)
    after = evaluate_records(loaded.model, loaded.tokenizer, RECORDS, base, generation=True).summary
    assert stats["all_correct"]
    assert before["rel"] < 0.5 and after["rel"] == 1.0
    assert after["rel_em"] == 1.0  # greedy generation says the new answer too (anchor kept in generate)
    assert after["loc"] == 1.0  # locality prompts name no edited subject: null route, untouched


def _spec(tiny_dir: Path, out: Path, seed: int = 0) -> RunSpec:
    from moecli.engine.recipes import build_config

    return RunSpec(command="batch-edit", method="memoe", config=build_config("memoe", overrides=FAST),
                   records=RECORDS, batch_size=2, out_dir=out, model_path=tiny_dir, seed=seed,
                   generation=False)


def test_checkpoint_reload_reproduces_metrics_and_seed_reproduces_adapter(tiny_dir, tmp_path):
    r1 = run_edits(_spec(tiny_dir, tmp_path / "a"))
    r2 = run_edits(_spec(tiny_dir, tmp_path / "b"))
    from moecli.engine.checkpoint import load_checkpoint

    t1 = load_checkpoint(tmp_path / "a" / "adapter").tensors
    t2 = load_checkpoint(tmp_path / "b" / "adapter").tensors
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert r1["summary"] == r2["summary"]
    ledger = (tmp_path / "a" / "adapter" / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in ledger] == [r.id for r in RECORDS]

    loaded = load_model(tiny_dir)
    base = compute_baseline(loaded.model, loaded.tokenizer, RECORDS)
    load_edited(loaded, tmp_path / "a")
    again = evaluate_records(loaded.model, loaded.tokenizer, RECORDS, base, generation=False).summary
    assert again == {k: v for k, v in r1["summary"].items() if k != "routing"}  # the engine adds its routing


def test_adapter_refused_on_another_base_model(tiny_dir, tmp_path):
    run_edits(_spec(tiny_dir, tmp_path / "run"))
    other = load_model(make_tiny_model("llama", tmp_path / "other", seed=1))
    with pytest.raises(UserError, match="another base model"):
        load_edited(other, tmp_path / "run" / "adapter")


def test_adapter_written_before_query_feature_loads_as_input_matching(tiny_dir, tmp_path):
    """An adapter whose config does not name `query_feature` was made when matching was on inputs."""
    from moecli.engine.adapters import checked_checkpoint, restore_method
    from moecli.engine.recipes import build_config
    from moecli.model.loading import fingerprint

    spec = _spec(tiny_dir, tmp_path / "run")
    spec.config = build_config("memoe", overrides={**FAST, "query_feature": "input"})
    report = run_edits(spec)
    loaded = load_model(tiny_dir)
    base = compute_baseline(loaded.model, loaded.tokenizer, RECORDS)
    ckpt = checked_checkpoint(tmp_path / "run" / "adapter", fingerprint(loaded.model))
    del ckpt.config["query_feature"]  # as written by moecli before the option existed
    method, _ = restore_method(loaded, tmp_path / "run" / "adapter", ckpt=ckpt)
    assert method.matcher.feature == "input"
    again = evaluate_records(loaded.model, loaded.tokenizer, RECORDS, base, generation=False).summary
    assert again == {k: v for k, v in report["summary"].items() if k != "routing"}


def test_an_edit_that_routes_nowhere_trains_nothing_and_does_not_crash(tiny_dir):
    """A batch of one edit whose input reaches no expert (say, its entity is not found) gives a loss
    without a gradient: training must report it not learned, not stop the stream with a torch error."""
    from moecli.adapter.training import TrainConfig, train_on_pairs

    loaded = load_model(tiny_dir)
    loose = torch.nn.Parameter(torch.zeros(3))  # on no path of the model
    stats = train_on_pairs(loaded.model, loaded.tokenizer, [loose], [("Alice Moreau was born in", "Tokyo")],
                           TrainConfig(lr=0.1, max_steps=3))
    assert stats.steps == 3 and not stats.all_correct and torch.equal(loose, torch.zeros(3))


def test_stop_prob_trains_on_past_the_argmax_and_still_ends_where_it_cannot_be_reached(tiny_dir):
    """Early stop at the first all-argmax step leaves a thin margin; with `stop_prob` the same edit trains on,
    until every target token has that probability or, where it cannot get there, at the first all-argmax
    step from twice the first one on: later than the thin run, well before max_steps. (How much later depends
    on where the argmax is lost and regained past twice the first step: no tighter bound holds.)"""
    loaded = load_model(tiny_dir)

    def steps(stop_prob: float) -> tuple[int, bool]:
        # the target alone: the end-of-sequence token after "Tokyo" can reach 0.9 on this model
        torch.manual_seed(0)  # MEMoE's gate noise draws from torch's generator, which the engine seeds per batch
        method = MEMoE(loaded, MEMoEConfig(**{**FAST, "max_steps": 400, "stop_prob": stop_prob, "eos_target": False}),
                       seed=0)
        stats = method.apply_batch(RECORDS[:1], 0)
        method.remove()
        return stats["steps"], stats["all_correct"]

    (thin, ok_thin), (wide, ok_wide) = steps(0.0), steps(0.9)
    assert ok_thin and ok_wide and thin < wide < 400


def test_stop_prob_needs_every_target_token_at_that_probability():
    from moecli.adapter.training import _hits

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]))
    answers = torch.tensor([0, 1])
    assert _hits(logits, answers, 0.0) == (True, True) and _hits(logits, answers, 0.6) == (True, True)
    assert _hits(logits, answers, 0.65) == (True, False) and _hits(logits, torch.tensor([1, 1]), 0.0) == (False, False)


@pytest.mark.parametrize("method", ["memoe", "lemoe", "scen"])
def test_an_edit_whose_subject_is_not_in_its_prompt_is_reached_by_that_prompt(tiny_dir, method):
    """One edit whose subject is not written in its prompt: the prompt itself is anchored on the subject
    (`AnchorTrie.add_exact`) and reaches its edit; other wordings that do not name the subject do not;
    the stream goes on."""
    from moecli.engine.recipes import build_config
    from moecli.methods import get_method

    loaded = load_model(tiny_dir)
    m = get_method(method)(loaded, build_config(method, overrides={"max_steps": 2}), seed=0)
    m.apply_batch([EditRecord(prompt="What is the capital of Atlantis?", target="Poseidonia",
                              subject="Atlantis City")], 0)
    assert len(m.matcher) == 1
    assert m.routes(["What is the capital of Atlantis?", "Which city is the capital of Atlantis?"]) == [0, None]
    m.apply_batch(RECORDS[:1], 1)  # the next edit is stored and reachable as usual
    assert m.routes([RECORDS[0].prompt, "What is the capital of Atlantis?"]) == [1, 0]
    config, tensors, files = m.export_state()
    m.remove()
    again = get_method(method)(loaded, build_config(method, overrides={"max_steps": 2}), seed=0)
    again.load_state(config, tensors, files)  # what a saved adapter holds
    assert again.routes([RECORDS[0].prompt, "What is the capital of Atlantis?"]) == [1, 0]


def test_routing_diagnosis_says_where_each_input_went(tiny_dir, tmp_path):
    """Report rows say whether the edit prompt, each rephrase and each locality prompt reached the
    record's own edit, another one, or none; the summary gives the shares."""
    spec = RunSpec(command="batch-edit", method="memoe", config=MEMoEConfig(**FAST), records=RECORDS, batch_size=2,
                   out_dir=tmp_path / "run", model_path=tiny_dir, generation=False)
    report = run_edits(spec)
    rows = {r["id"]: r for r in report["per_edit"]}
    assert [rows[r.id]["route_rel"] for r in RECORDS] == ["own", "own"]
    assert rows[RECORDS[0].id]["route_loc"] == ["none"]  # "Carl Jung was born in" names no edited entity
    routing = report["summary"]["routing"]
    assert routing["rel_own"] == 1.0 and routing["loc_none"] == 1.0
    assert len(rows[RECORDS[0].id]["route_gen"]) == len(RECORDS[0].rephrases) == 1


def test_memoe_expert_rank_grows_with_the_edits_each_expert_takes(tiny_dir, tmp_path):
    """`rank: None` (the default) is settled from the run's batch size before run.json records it: 16 per
    50 edits an expert takes; the experts are built at that rank; a rank the user sets is kept."""
    from moecli.engine.checkpoint import load_checkpoint
    from moecli.engine.recipes import build_config

    records = [EditRecord(prompt=f"Person {i} was born in", target="Tokyo", subject=f"Person {i}", id=str(i))
               for i in range(51)]
    spec = RunSpec(command="batch-edit", method="memoe", records=records, batch_size=51, out_dir=tmp_path / "run",
                   config=build_config("memoe", overrides={**FAST, "max_steps": 1, "n_experts": 1}),
                   model_path=tiny_dir, generation=False, evaluate_before=False)
    run_edits(spec)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["rank"] == 32
    tensors = load_checkpoint(tmp_path / "run" / "adapter").tensors
    assert {t.shape[0] for k, t in tensors.items() if k.endswith(".A")} == {32}
    small = MEMoEConfig(query_feature="output", n_experts=1)
    small.resolve(torch.nn.Linear(2, 2), batch_size=50)
    kept = MEMoEConfig(query_feature="output", rank=8)
    kept.resolve(torch.nn.Linear(2, 2), batch_size=1000)
    assert (small.rank, kept.rank) == (16, 8)


def test_without_early_stop_the_ledger_still_says_whether_the_edit_took(tiny_dir):
    """WISE trains every step (early_stop off); its ledger said `train_all_correct: false` for every edit."""
    loaded = load_model(tiny_dir)
    for steps, took in ((150, True), (1, False)):
        method = MEMoE(loaded, MEMoEConfig(**{**FAST, "max_steps": steps, "early_stop": False}), seed=0)
        stats = method.apply_batch(RECORDS[:1], 0)
        method.remove()
        assert stats["steps"] == steps and stats["all_correct"] is took


@pytest.mark.parametrize("method", ["memoe", "lemoe", "scen"])
def test_an_edit_prompt_reaches_its_edit_when_a_later_subject_is_named_before_its_own(tiny_dir, method):
    """The trie finds the leftmost known name: once "Paris" is edited, "In Paris, Alice Moreau works as a"
    names Paris first. The prompt Alice's edit was trained on is still anchored on Alice, as when trained."""
    from moecli.engine.recipes import build_config
    from moecli.methods import get_method

    loaded = load_model(tiny_dir)
    m = get_method(method)(loaded, build_config(method, overrides={"max_steps": 1}), seed=0)
    alice = "In Paris, Alice Moreau works as a"
    m.apply_batch([EditRecord(prompt=alice, target="pilot", subject="Alice Moreau")], 0)
    anchor_then = m.probe([alice])[0]
    m.apply_batch([EditRecord(prompt="Paris is the capital of", target="Italy", subject="Paris")], 1)
    assert m.routes([alice, "Paris is the capital of"]) == [0, 1]
    assert torch.equal(m.probe([alice])[0], anchor_then)  # the anchor its experts were trained with
    assert not torch.equal(m.probe(["In Paris, Alice Moreau lives in"])[0], anchor_then)  # another prompt: Paris


def test_every_edit_prompt_reaches_its_edit_among_many_on_one_subject(tiny_dir):
    """Twenty edits of one subject (more than the matcher's sixteen anchor candidates, all tied): each
    edit prompt still routes to its own edit, whatever its question key says."""
    from moecli.engine.recipes import build_config
    from moecli.methods import get_method

    loaded = load_model(tiny_dir)
    m = get_method("lemoe")(loaded, build_config("lemoe", overrides={"max_steps": 1}), seed=0)
    prompts = [f"Fact number {i} about Alice Moreau is" for i in range(20)]
    m.apply_batch([EditRecord(prompt=p, target=f"answer{i}", subject="Alice Moreau") for i, p in enumerate(prompts)], 0)
    assert m.routes(prompts) == list(range(20))


def test_the_unedited_models_answers_are_computed_once_per_model_and_records(tiny_dir, tmp_path, monkeypatch):
    """A second run on the same model and records reads the unedited model's answers (probe answers, the
    locality baseline, the before column) from the cache, with the same figures; other records do not."""
    import dataclasses

    import moecli.engine.evaluation as evaluation

    monkeypatch.setenv("MOECLI_EVAL_CACHE", "on")
    monkeypatch.setenv("MOECLI_CACHE", str(tmp_path / "cache"))
    computed = []
    real = evaluation.compute_baseline
    monkeypatch.setattr(evaluation, "compute_baseline", lambda *a, **k: (computed.append(1), real(*a, **k))[1])
    spec = _spec(tiny_dir, tmp_path / "a")
    spec.generation = True
    first = run_edits(spec)
    second = run_edits(dataclasses.replace(spec, out_dir=tmp_path / "b"))
    assert (first["unedited_from_cache"], second["unedited_from_cache"], len(computed)) == (False, True, 1)
    assert second["columns"] == first["columns"] and second["per_edit"] == first["per_edit"]
    other = [dataclasses.replace(RECORDS[0], target="Lisbon", id="other"), *RECORDS[1:]]
    third = run_edits(dataclasses.replace(spec, records=other, out_dir=tmp_path / "c"))
    assert not third["unedited_from_cache"] and len(computed) == 2
