"""LEMoE and the lifelong loop on a tiny model: routing keeps old edits, resume equals no interruption."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_resume_is_exact

from moecli.data.records import EditRecord, LocalityPair
from moecli.engine.checkpoint import load_checkpoint
from moecli.engine.recipes import build_config
from moecli.engine.run import RunSpec, run_edits
from moecli.model.tiny import make_tiny_model

NAMES = ["Alice Moreau", "Bruno Keller", "Clara Novak", "Daniel Silva", "Elena Rossi", "Felix Okafor"]
CITIES = ["Tokyo", "Lima", "Cairo", "Oslo", "Rome", "Kyoto"]
RECORDS = [
    EditRecord(prompt=f"{n} was born in", target=c, subject=n, rephrases=[f"Where was {n} born?"],
               locality=[LocalityPair("The capital of France is", "Paris", "other")])
    for n, c in zip(NAMES, CITIES)
]
FAST = {"lr": 0.02, "max_steps": 200, "retain": "none"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


def _spec(tiny_dir: Path, out: Path, router: str = "knn", eval_every: int = 0) -> RunSpec:
    config = build_config("lemoe", overrides={**FAST, "router": router})
    return RunSpec(command="lifelong", method="lemoe", config=config,
                   records=RECORDS, batch_size=2, out_dir=out, model_path=tiny_dir, generation=False,
                   protocol="lifelong", eval_every=eval_every)


def test_knn_lemoe_keeps_every_edit(tiny_dir, tmp_path):
    report = run_edits(_spec(tiny_dir, tmp_path / "run", eval_every=1))
    assert report["summary"]["rel"] == 1.0  # the knn router never forgets an earlier batch
    assert report["summary"]["loc"] == 1.0
    assert [p["step"] for p in report["retention"]] == [1, 2, 3]
    ckpt = load_checkpoint(tmp_path / "run" / "adapter")
    assert ckpt.config["n_experts"] == 3
    assert [e["expert"] for e in ckpt.ledger] == [0, 0, 1, 1, 2, 2]


def test_paper_kv_router_runs(tiny_dir, tmp_path):
    report = run_edits(_spec(tiny_dir, tmp_path / "kv", router="kv"))
    assert report["summary"]["n_edits"] == len(RECORDS)
    assert report["columns"]["after"]["rel"] > report["columns"]["before"]["rel"]


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("when", ["after_save", "mid_batch"])
def test_interrupted_run_resumes_to_the_same_adapter(tiny_dir, tmp_path, monkeypatch, when):
    assert_resume_is_exact(lambda out: _spec(tiny_dir, out), tmp_path, monkeypatch, when)


def test_context_prefixes_train_each_edit_behind_prefixes_the_unedited_model_writes(tiny_dir, tmp_path):
    """`context_prefixes: 2`: every edit is trained as written and behind two prefixes; the prefixes are the
    unedited model's text, the same for the same seed (a resumed run trains the same pairs), each ending in
    ". "; the edits still hold."""
    from moecli.adapter import augment
    from moecli.methods.lemoe import LEMoE
    from moecli.model.loading import load_model

    loaded = load_model(tiny_dir)
    config = build_config("lemoe", overrides={**FAST, "context_prefixes": 2})
    one = LEMoE(loaded, config, seed=3)
    pairs = one.edit_pairs(RECORDS[:2])
    one.remove()
    two = LEMoE(loaded, config, seed=3)
    assert pairs == two.edit_pairs(RECORDS[:2]) and len(pairs) == 6
    two.remove()
    prefixes = [p[: -len(RECORDS[0].prompt)] for p, _ in pairs[1:3]]
    assert all(p.endswith(". ") and p[:-2].strip() for p in prefixes) and prefixes[0] != prefixes[1]
    assert all(p.startswith(s) for p, s in zip(prefixes, augment.PREFIX_STARTS))
    assert [t for _, t in pairs] == [RECORDS[0].target] * 3 + [RECORDS[1].target] * 3
    spec = _spec(tiny_dir, tmp_path / "run")
    spec.config = config
    report = run_edits(spec)
    assert report["summary"]["rel"] == 1.0
    assert load_checkpoint(tmp_path / "run").config["context_prefixes"] == 2


def test_prefixed_copies_reach_their_edit_while_training_and_leave_nothing_behind(tiny_dir):
    """A prefixed copy the key would not match could not be trained: while its batch trains, the hash of each
    copy as a forward sees it is pinned to its edit's row, as the edit prompt is; afterwards the matcher is as a
    reloaded adapter's (nothing of it is saved)."""
    from moecli.methods.lemoe import LEMoE
    from moecli.model.loading import load_model

    method = LEMoE(load_model(tiny_dir), build_config("lemoe", overrides={**FAST, "context_prefixes": 3}), seed=0)
    records = RECORDS[:2]
    method.register_anchors(records)
    method.store_edits(records, [method.bypass.add_expert(method.generator)] * 2)
    prefixed = [p + r.prompt for r in records for p in method.prefix_texts()]
    before = dict(method.matcher._row_of_prompt)
    with method.augmented_routes(records):
        pinned = dict(method.matcher._row_of_prompt)
        assert method.routes(prefixed) == [0, 0, 0, 1, 1, 1]
        seen = list(method.context.prompt_hashes)  # the prompts' hashes as the routed forward computed them
    assert [pinned.get(h) for h in seen] == [0, 0, 0, 1, 1, 1] and not set(seen) & set(before)
    assert method.matcher._row_of_prompt == before
    method.remove()


def test_locality_prompts_no_edit_reaches_are_not_run_and_score_as_if_they_were(tiny_dir, tmp_path, monkeypatch):
    """The evaluation takes the baseline's answers for locality prompts that reach no edit (LEMoE's knn
    router gives them exactly the base output): the report equals the one that runs every prompt."""
    from moecli.engine import evaluation
    from moecli.engine.evaluate import evaluate_model
    from moecli.methods.lemoe import LEMoE

    records = [EditRecord(r.prompt, r.target, subject=r.subject, rephrases=r.rephrases,
                          locality=[*r.locality, LocalityPair(f"{r.subject} works as a", "teacher", "same_subject")])
               for r in RECORDS]
    spec = _spec(tiny_dir, tmp_path / "run")
    spec.records, spec.generation, spec.evaluate = records, True, False
    run_edits(spec)
    scored: list[int] = []
    real = evaluation.score_pairs

    def counting(model, tokenizer, pairs, *args, **kwargs):
        scored.append(len(pairs))
        return real(model, tokenizer, pairs, *args, **kwargs)

    monkeypatch.setattr(evaluation, "score_pairs", counting)

    def report() -> dict:
        scored.clear()
        return evaluate_model(tiny_dir, records, data="x", data_format="jsonl", adapter=tmp_path / "run",
                              generation=True)

    skipping = report()
    skipped_scored = list(scored)
    monkeypatch.setattr(LEMoE, "leaves_unrouted_alone", lambda self: False)
    running = report()
    assert skipping["per_edit"] == running["per_edit"]
    assert skipping["summary"] == running["summary"]
    assert skipping["summary"]["routing"]["loc_none"] > 0  # some locality prompts were skipped ...
    assert sum(skipped_scored) < sum(scored)  # ... and not run


def test_routes_skip_the_forward_of_prompts_naming_no_edited_entity_and_agree_with_it(tiny_dir, tmp_path):
    from moecli.engine.adapters import load_edited
    from moecli.model.loading import load_model

    run_edits(_spec(tiny_dir, tmp_path / "run"))
    method = load_edited(load_model(tiny_dir), tmp_path / "run")
    prompts = [r.prompt for r in RECORDS] + [f"Where was {n} born?" for n in NAMES[:3]] + \
        ["The capital of France is", "Nobody Here was born in", f"{NAMES[0]} works as a"]
    fast = method.routes(prompts)
    assert method._routed_pass(prompts)  # what routes did before: every prompt through the model
    slow = [int(r) if r >= 0 else None for r in method.matcher.rows.tolist()]
    assert fast == slow
    assert fast[: len(RECORDS)] == list(range(len(RECORDS)))  # every edit prompt reaches its own edit
    assert fast[len(RECORDS) + 3] is None and fast[len(RECORDS) + 4] is None


def test_routes_read_off_the_scoring_pass_are_the_prompts_own(tiny_dir, tmp_path):
    """The diagnosis takes the rephrasings' routes from the teacher-forced pass: they must be what a forward
    of the prompt alone gives (`routes`)."""
    from moecli.engine.adapters import evaluate_edited, load_edited
    from moecli.engine.evaluation import compute_baseline
    from moecli.model.loading import load_model

    run_edits(_spec(tiny_dir, tmp_path / "run"))
    loaded = load_model(tiny_dir)
    records = [EditRecord(r.prompt, r.target, subject=r.subject, locality=r.locality,
                          rephrases=[*r.rephrases, f"{r.subject}'s birthplace is", "Nobody Here was born in"])
               for r in RECORDS]
    baseline = compute_baseline(loaded.model, loaded.tokenizer, records)
    method = load_edited(loaded, tmp_path / "run")
    report = evaluate_edited(method, records, baseline, generation=False)

    def label(route, own):
        return "none" if route is None else "own" if route == own else "other"

    for own, (r, row) in enumerate(zip(records, report.per_edit)):
        assert row["route_rel"] == label(method.routes([r.prompt])[0], own)
        assert row["route_gen"] == [label(x, own) for x in method.routes(r.rephrases)]
    assert "own" in {x for row in report.per_edit for x in row["route_gen"]}


def test_a_later_edit_of_the_same_prompt_supersedes_the_earlier_one(tiny_dir, tmp_path):
    """CounterFact edits some prompts twice ("The twin city of Tirana is" Shanghai, later Hamburg): the later
    batch must train (its prompt reaching its own new expert) and the model answer the later target."""
    first = RECORDS[:2]
    again = [EditRecord(RECORDS[0].prompt, "Lima", subject=RECORDS[0].subject, locality=RECORDS[0].locality),
             RECORDS[2]]
    spec = _spec(tiny_dir, tmp_path / "run")
    spec.records = [*first, *again]
    report = run_edits(spec)
    ledger = load_checkpoint(tmp_path / "run" / "adapter").ledger
    assert all(e["train_all_correct"] for e in ledger)
    assert ledger[2]["train_steps"] < FAST["max_steps"]
    by_target = {row["target"]: row for row in report["per_edit"] if row["prompt"] == RECORDS[0].prompt}
    assert by_target["Lima"]["rel"] == 1.0 and by_target["Tokyo"]["rel"] < 1.0





def test_state_substitution_gives_a_routed_input_the_edit_prompts_state_and_the_adapter_keeps_it(tiny_dir, tmp_path):
    """With `state_substitution`, an input matched to an edit leaves the edited decoder layer with exactly the
    states the edit's own prompt and target left there, edit applied: at its last prompt token and at each later
    position holding the target so far (teacher-forced here), not at one holding another token. The states are
    saved with the adapter, and a reloaded one substitutes the same. Without recorded states the input keeps
    its own."""
    import torch

    from moecli.engine.adapters import load_edited
    from moecli.methods.lemoe import LEMoE
    from moecli.model.batching import collate, encode_pair, forward, pad_id_of
    from moecli.model.loading import load_model
    from moecli.routing.anchors import prompt_hash

    edit = RECORDS[0]
    other = EditRecord("Alice Moreau, the painter, was born in", "x", subject=NAMES[0])  # pinned to row 0 below
    config = build_config("lemoe", overrides={**FAST, "state_substitution": True, "eos_target": True})

    def after_edited_layer(method: LEMoE, asked: EditRecord, answer: str) -> tuple[torch.Tensor, int]:
        """The edited layer's output [T, d] for `asked.prompt` + `answer` fed at once (the input pinned to row 0,
        the answer-signature pass inside it left out), and the last prompt column."""
        layers, depth = method.injection._below
        seen: list[torch.Tensor] = []

        def keep(module, args, out):
            if not method.injection._inner:
                seen.append(out[0] if isinstance(out, tuple) else out)

        hook = layers[depth].register_forward_hook(keep)
        pair = encode_pair(method.loaded.tokenizer, asked.prompt, answer)
        try:
            with method.matcher.pinned({prompt_hash(method._prompt_ids(asked)[0]): 0}), torch.no_grad():
                forward(method.loaded.model, collate([pair], pad_id_of(method.loaded.tokenizer)))
        finally:
            hook.remove()
        return seen[-1][0], pair.answer_start - 1

    def run(matcher) -> torch.Tensor:  # the states recorded for row 0: last prompt token, then target tokens
        first, count = int(matcher.state_first[0]), int(matcher.state_count[0])
        return matcher.states[first: first + count]

    method = LEMoE(load_model(tiny_dir), config, seed=0)
    method.apply_batch(RECORDS[:2], 0)
    method.injection._sig_cache.clear()  # recorded again with the answer signature computed inside the forward
    method.record_states(RECORDS[:2])  # (a bypass-off pass of the same layer), as when training fed other rows
    recorded = run(method.matcher)
    n_target = len(encode_pair(method.loaded.tokenizer, edit.prompt, edit.target).answer_ids)
    assert len(recorded) == n_target + 1  # and the position that predicts the end of sequence
    got, last = after_edited_layer(method, other, edit.target)
    assert torch.allclose(got[last: last + n_target], recorded[:n_target])
    wrong, _ = after_edited_layer(method, other, "Paris")  # another answer: only the last prompt token is the edit's
    assert torch.allclose(wrong[last], recorded[0]) and not torch.allclose(wrong[last + 1], recorded[1], atol=1e-3)
    method.matcher.states = torch.zeros(0, 0)  # nothing recorded: the input's own states ...
    own, _ = after_edited_layer(method, other, edit.target)
    assert not torch.allclose(own[last], recorded[0], atol=1e-3)
    mine, mine_last = after_edited_layer(method, edit, edit.target)  # ... and the edit's own, edit applied
    assert torch.allclose(mine[mine_last: mine_last + n_target], recorded[:n_target], atol=1e-5)
    method.remove()

    spec = _spec(tiny_dir, tmp_path / "run")
    spec.config = config
    run_edits(spec)
    tensors = load_checkpoint(tmp_path / "run" / "adapter").tensors
    assert tensors["matcher.state_first"].tolist() == (torch.cumsum(tensors["matcher.state_count"], 0)
                                                       - tensors["matcher.state_count"]).tolist()
    assert len(tensors["matcher.state_count"]) == len(RECORDS) and bool((tensors["matcher.state_count"] > 1).all())
    loaded = load_edited(load_model(tiny_dir), tmp_path / "run" / "adapter")
    got, last = after_edited_layer(loaded, other, edit.target)
    assert torch.allclose(got[last], run(loaded.matcher)[0])
    loaded.remove()
