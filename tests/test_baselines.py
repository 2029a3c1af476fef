"""The comparison baselines (FT-L, LoRA, GRACE) on tiny models: edits that take, removal that restores
the base model bit for bit, checkpoints that reload to the same metrics, GRACE's codebook rules and
exact locality, and LoRA on GPT-2's Conv1D.

GRACE's records have one-token answers: on a tiny random model one value vector cannot spell a
multi-token answer (it moves every answer position the same way), whatever the replacement mode;
FT-L and LoRA change a weight matrix, which acts per position, so they get multi-token answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_resume_is_exact

from moecli.data.records import EditRecord, LocalityPair
from moecli.engine.adapters import load_edited
from moecli.engine.evaluation import compute_baseline, evaluate_records
from moecli.engine.recipes import build_config
from moecli.engine.run import RunSpec, run_edits
from moecli.errors import UserError
from moecli.methods import get_method
from moecli.methods.finetune import DELTA_KEY
from moecli.model.loading import find_target_module, fingerprint, load_model
from moecli.model.tiny import make_tiny_model

RECORDS = [
    EditRecord(prompt="Alice Moreau was born in", target="Tokyo", subject="Alice Moreau",
               rephrases=["Where was Alice Moreau born?"],
               locality=[LocalityPair("Carl Jung was born in", "Paris", "same_relation")]),
    EditRecord(prompt="Bruno Keller works for", target="Northwind", subject="Bruno Keller",
               locality=[LocalityPair("The capital of France is", "Paris", "other")]),
]
SHORT = [  # one-token answers (see the module docstring)
    EditRecord(prompt="Alice Moreau was born in", target="London", subject="Alice Moreau",
               rephrases=["Where was Alice Moreau born?"],
               locality=[LocalityPair("Carl Jung was born in", "Paris", "same_relation")]),
    EditRecord(prompt="Bruno Keller works for", target="Rome", subject="Bruno Keller",
               locality=[LocalityPair("The capital of France is", "Paris", "other")]),
]
# Fast settings. GRACE: the tiny models' activations are ~0.05 in norm, so EasyEdit's ε = 1 would
# cover every prompt; 0.01 keeps the two edits and the locality prompts apart.
FAST = {
    "ft": {"lr": 0.05, "max_steps": 60},
    "lora": {"lr": 0.05, "max_steps": 100},  # 72 steps with the end-of-sequence token trained
    "grace": {"lr": 0.5, "max_steps": 40, "eps": 0.01},
    # WISE: margins scaled to the tiny models' activations; one edit per shard, two shards merged (Ties)
    "wise": {"lr": 0.05, "optimizer": "adam", "max_steps": 150, "mask_ratio": 0.5, "early_stop": True, "prefixes": 2,
             "alpha": 0.0, "beta": 0.5, "gamma": 0.2, "shard_edits": 1, "merge_edits": 2},
    "locft": {"lr": 0.05, "max_steps": 60, "mini_batch": 1},  # one Adam step per edit, epochs until loss < 0.01
}
DATA = {"ft": RECORDS, "lora": RECORDS, "grace": SHORT, "wise": RECORDS, "locft": RECORDS}
METHODS = tuple(FAST)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_model(family, root / family) for family in ("llama", "gpt2", "opt")}


def _build(loaded, method: str, **over):
    return get_method(method)(loaded, build_config(method, overrides={**FAST[method], **over}), 0)


def _logits(loaded, text: str) -> torch.Tensor:
    enc = loaded.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**enc).logits.clone()


@pytest.mark.parametrize(("method", "over"), [
    ("ft", {}), ("lora", {}), ("grace", {}), ("grace", {"replacement": "last"}), ("ft", {"norm_constraint": 0.2}),
    ("wise", {"shard_edits": 500, "merge_edits": 1000}), ("locft", {}),
])
def test_edit_changes_the_answer(tiny, method, over):
    loaded = load_model(tiny["llama"])
    records = DATA[method]
    base = compute_baseline(loaded.model, loaded.tokenizer, records)
    before = evaluate_records(loaded.model, loaded.tokenizer, records, base, generation=False).summary
    stats = _build(loaded, method, **over).apply_batch(records, 0)
    after = evaluate_records(loaded.model, loaded.tokenizer, records, base, generation=True).summary
    assert stats["all_correct"]
    assert before["rel"] < 0.5 and after["rel"] == 1.0
    assert after["rel_em"] == 1.0  # greedy generation agrees with the teacher-forced score


@pytest.mark.parametrize("method", ["grace", "wise"])
def test_codebook_and_side_memory_route_opts_flattened_ffn_rows(tiny, method):
    """OPT runs its FFN on the batch's tokens flattened to [B·T, d]: each row must still be routed as the
    input it belongs to (GRACE indexed it as [B, T, d] and failed)."""
    loaded = load_model(tiny["opt"])
    records = DATA[method]
    base = compute_baseline(loaded.model, loaded.tokenizer, records)
    # the target alone: the tiny random OPT does not learn to stop after it in WISE's side memory (600 steps)
    stats = _build(loaded, method, eos_target=False).apply_batch(records, 0)
    after = evaluate_records(loaded.model, loaded.tokenizer, records, base, generation=True).summary
    assert stats["all_correct"] and after["rel"] == 1.0 and after["rel_em"] == 1.0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_base_model_exactly(tiny, family, method):
    loaded = load_model(tiny[family])
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    fp = fingerprint(loaded.model)
    text = DATA[method][0].prompt  # an edited prompt, so the edit is live on it (GRACE keys on the prompt)
    before = _logits(loaded, text)
    m = _build(loaded, method)
    m.apply_batch(DATA[method], 0)
    assert not torch.equal(_logits(loaded, text), before)  # the edit is live
    m.remove()
    assert torch.equal(_logits(loaded, text), before)
    state = loaded.model.state_dict()
    assert state.keys() == weights.keys()
    for k, v in state.items():
        assert torch.equal(v, weights[k]), k
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert fingerprint(loaded.model) == fp


def _spec(model_dir: Path, out: Path, method: str, batch_size: int) -> RunSpec:
    return RunSpec(command="lifelong" if batch_size == 1 else "batch-edit", method=method,
                   config=build_config(method, overrides=FAST[method]), records=DATA[method],
                   batch_size=batch_size, out_dir=out, model_path=model_dir, seed=0, generation=True)


@pytest.mark.parametrize(("method", "family", "batch_size"), [
    ("ft", "llama", 1), ("lora", "llama", 2), ("lora", "gpt2", 1), ("grace", "llama", 1), ("grace", "gpt2", 2),
    ("wise", "llama", 1), ("wise", "gpt2", 2), ("locft", "llama", 1), ("locft", "gpt2", 2),
])
def test_checkpoint_reload_reproduces_metrics(tiny, tmp_path, method, family, batch_size):
    """batch_size 1 is the lifelong protocol: the second batch continues the first one's state."""
    report = run_edits(_spec(tiny[family], tmp_path / "run", method, batch_size))
    if method == "wise":  # two shards Ties-merged into one memory: the merge may lose part of an edit
        assert report["summary"]["rel"] > 0.3
    elif method in ("grace", "locft") or batch_size == len(DATA[method]):  # FT-L and LoRA may forget in lifelong
        assert report["summary"]["rel"] == 1.0
    loaded = load_model(tiny[family])
    base = compute_baseline(loaded.model, loaded.tokenizer, DATA[method], generation=True)
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    edited = load_edited(loaded, tmp_path / "run")
    again = evaluate_records(loaded.model, loaded.tokenizer, DATA[method], base, generation=True).summary
    assert again == report["summary"]
    edited.remove()
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.state_dict().items())


def test_grace_leaves_prompts_outside_every_radius_exactly_unchanged(tiny):
    loaded = load_model(tiny["llama"])
    unrelated = "The capital of France is"
    before = _logits(loaded, unrelated)
    m = _build(loaded, "grace")
    m.apply_batch(SHORT, 0)
    key, _ = m.probe(unrelated)
    dist, idx = m.grace.nearest(key.reshape(1, -1))
    assert dist[0] > m.grace.radii[idx[0]]  # outside ε: GRACE defers to the base model
    assert torch.equal(_logits(loaded, unrelated), before)
    assert [m.expert_of(i) for i in range(2)] == [0, 1] and m.targets == ["London", "Rome"]


def test_grace_codebook_add_expand_split_retarget(tiny):
    """Alg. 1 of the paper on hand-made keys: ε₀ = 1, distances chosen to hit each rule."""
    loaded = load_model(tiny["llama"])
    m = _build(loaded, "grace", eps=1.0)
    d_in, d_out = m.d_in, m.d_out
    e = torch.zeros(d_in)
    e[0] = 1.0
    out = torch.zeros(d_out)
    assert m._place(torch.zeros(d_in), out, "A") == (0, "add")
    assert m._place(1.5 * e, out, "A") == (0, "expand")  # 1.5 ≤ ε₀ + ε_0 = 2, same answer
    assert float(m.grace.radii[0]) == pytest.approx(1.5, rel=1e-3)
    assert m._place(-1.0 * e, out, "B") == (1, "split")  # 1.0 ≤ 1 + 1.5, another answer
    assert m.grace.radii.tolist() == pytest.approx([0.5, 0.5])
    assert m._place(torch.zeros(d_in), out + 1, "C") == (0, "retarget")  # the very same key
    assert m.targets == ["C", "B"] and torch.equal(m.grace.values[0].detach(), out + 1)
    assert m._place(10.0 * e, out, "D") == (2, "add")  # farther than ε₀ + ε_c from every key
    assert m.grace.route(torch.stack([0.4 * e, -0.8 * e, 0.6 * e, 10 * e])).tolist() == [0, 1, -1, 2]


def test_lora_on_gpt2_conv1d(tiny):
    loaded = load_model(tiny["gpt2"])
    base = compute_baseline(loaded.model, loaded.tokenizer, RECORDS)
    m = _build(loaded, "lora")
    assert m.tuner.peft_config["moecli"].fan_in_fan_out  # Conv1D stores its weight (d_in, d_out)
    name, module = find_target_module(loaded.model, m.layer)  # still found while peft wraps it
    assert name == m.target_name and hasattr(module, "base_layer")
    assert m.apply_batch(RECORDS, 0)["all_correct"]
    assert evaluate_records(loaded.model, loaded.tokenizer, RECORDS, base, generation=False).summary["rel"] == 1.0


def test_ft_norm_constraint_bounds_the_change_and_checkpoint_holds_the_delta(tiny):
    loaded = load_model(tiny["llama"])
    m = _build(loaded, "ft", norm_constraint=1e-3, max_steps=5)
    w0 = m.weight.detach().clone()
    m.apply_batch(RECORDS, 0)
    change = m.weight.detach() - w0
    assert change.abs().max() <= 1e-3 + 1e-7 and change.abs().max() > 0
    config, tensors, _ = m.export_state()
    assert config["method"] == "ft" and set(tensors) == {DELTA_KEY}
    assert torch.equal(w0 + tensors[DELTA_KEY], m.weight.detach())


@pytest.mark.parametrize(("method", "bad", "message"), [
    ("ft", {"norm_constraint": 0.0}, "norm_constraint"),
    ("ft", {"weight_decay": -1.0}, "weight_decay"),
    ("lora", {"rank": 0}, "rank"),
    ("lora", {"alpha": 0.0}, "alpha"),
    ("grace", {"eps": 0.0}, "eps"),
    ("grace", {"replacement": "prompt"}, "replacement"),
    ("grace", {"layer_fraction": 1.5}, "layer_fraction"),
    ("wise", {"mask_ratio": 0.0}, "mask_ratio"), ("wise", {"optimizer": "lbfgs"}, "optimizer"),
    ("wise", {"merge_edits": 10, "shard_edits": 20}, "merge_edits"),
])
def test_configs_refuse_out_of_range_values(method, bad, message):
    with pytest.raises(UserError, match=message):
        build_config(method, overrides=bad)


@pytest.mark.parametrize("when", ["after_save", "mid_batch"])
@pytest.mark.parametrize("method", METHODS)
def test_interrupted_lifelong_run_resumes_to_the_same_adapter(tiny, tmp_path, monkeypatch, method, when):
    records = [*DATA[method], EditRecord(prompt="Clara Novak was born in", target="Spanish", subject="Clara Novak")]

    def spec(out: Path) -> RunSpec:
        return RunSpec(command="lifelong", method=method, config=build_config(method, overrides=FAST[method]),
                       records=records, batch_size=1, out_dir=out, model_path=tiny["llama"], generation=False,
                       protocol="lifelong")

    assert_resume_is_exact(spec, tmp_path, monkeypatch, when)


def test_wise_ties_merge_trims_elects_sign_and_averages():
    from moecli.methods.wise import ties_merge

    a = torch.tensor([[4.0, -1.0, 2.0, 0.0]])
    b = torch.tensor([[2.0, 3.0, -6.0, 0.1]])
    merged = ties_merge([a, b], [0.5, 0.5], density=0.5)  # a keeps 4, 2; b keeps -6, 3
    # col 0: both agree on +: mean(4, 2)... b's 2 was trimmed, so 4; col 1: only b's 3; col 2: 2 vs -6 -> sign -, -6
    assert merged.tolist() == [[4.0, 3.0, -6.0, 0.0]]


def test_wise_lifelong_shards_and_merges(tiny):
    loaded = load_model(tiny["llama"])
    m = _build(loaded, "wise")
    m.apply_batch(RECORDS[:1], 0)
    assert len(m.wise.memories) == 1 and not m.wise.current.abs().sum()  # the shard closed, a fresh one opens
    m.apply_batch(RECORDS[1:], 1)
    assert len(m.wise.memories) == 1  # two shards, one merged memory (merge_edits 2)
    assert m.edits == 2


def test_wise_merges_when_a_batch_crosses_the_merge_boundary(tiny):
    """Batches of 3 edits never land on a multiple of merge_edits 4: the merge happens on the crossing."""
    loaded = load_model(tiny["llama"])
    m = _build(loaded, "wise", shard_edits=2, merge_edits=4, max_steps=5)
    batch = [*RECORDS, RECORDS[0]]
    sizes = []
    for b in range(3):
        m.apply_batch(batch, b)
        sizes.append(len(m.wise.memories))
    # 3 edits: one shard kept; 6: a second, both merged into one; 9: a third shard beside that merge, merged alone
    assert sizes == [1, 1, 2]


def test_locft_trains_every_edit_so_far_in_each_batch_of_a_stream(tiny):
    """Breadth-first: the second batch of a stream trains the first batch's edit again (`accumulate`), so
    both hold at the end; with `accumulate: false` the second batch trains its own edit only."""
    loaded = load_model(tiny["llama"])
    base = compute_baseline(loaded.model, loaded.tokenizer, RECORDS)
    seen: list[list[str]] = []
    for accumulate in (True, False):
        m = _build(loaded, "locft", accumulate=accumulate)
        real = m.train_weight
        m.train_weight = lambda pairs, *a, real=real, **k: (seen.append([p for p, _ in pairs]), real(pairs, *a, **k))[1]
        for i, record in enumerate(RECORDS):
            m.apply_batch([record], i)
        if accumulate:
            after = evaluate_records(loaded.model, loaded.tokenizer, RECORDS, base, generation=False).summary
            assert after["rel"] == 1.0
        m.remove()
    first, second = RECORDS[0].prompt, RECORDS[1].prompt
    assert seen == [[first], [first, second], [first], [second]]
