"""SCEN on a tiny model: stage 1 makes the edit, stage 2's neuron gates it, the router thresholds."""

from __future__ import annotations

import torch

from moecli.data.records import EditRecord
from moecli.engine.evaluation import compute_baseline, evaluate_records
from moecli.methods.scen import SCEN, SCENConfig
from moecli.model.loading import load_model
from moecli.model.tiny import make_tiny_model
from moecli.routing.context import AnchorContext
from moecli.routing.routers import IndexingNeuronRouter


def test_single_edit_takes_and_is_gated(tmp_path):
    loaded = load_model(make_tiny_model("llama", tmp_path / "m"))
    rec = EditRecord(prompt="Alice Moreau was born in", target="Tokyo", subject="Alice Moreau")
    base = compute_baseline(loaded.model, loaded.tokenizer, [rec])
    method = SCEN(loaded, SCENConfig(lr=0.02, max_steps=60, neuron_loss="hinge", neuron_steps=200, stop_prob=0.0),
                  seed=0)
    stats = method.apply_batch([rec], 0)
    assert stats["all_correct"]
    after = evaluate_records(loaded.model, loaded.tokenizer, [rec], base, generation=True).summary
    assert after["rel"] == 1.0 and after["rel_em"] == 1.0
    h = method.last_token_inputs([rec.prompt])
    score, idx = method.bypass.router.best(h)
    assert idx.item() == 0 and score.item() > method.config.threshold


def test_router_thresholds_and_faiss_agrees_with_matmul():
    torch.manual_seed(0)
    router = IndexingNeuronRouter(d_in=8, threshold=0.65, faiss_above=1000)
    neurons = torch.randn(5, 8) * 3
    for w in neurons:
        router.add_neuron(w)
    h = torch.randn(16, 8)
    s1, i1 = router.best(h)
    router.faiss_above = 0
    s2, i2 = router.best(h)
    assert torch.equal(i1, i2) and torch.allclose(s1, s2, atol=1e-5)
    ctx = AnchorContext()
    ctx.prompt_last = torch.tensor([2] * 16)
    x = torch.zeros(16, 4, 8)
    x[:, 2] = h
    gates, idx = router(x, ctx)
    expect = torch.where(s1 > 0.65, i1, torch.full_like(i1, -1))
    assert torch.equal(idx[:, 0, 0], expect)
    assert torch.equal(gates[:, 0, 0], (expect >= 0).float())


def test_scoped_edits_one_at_a_time_each_reach_their_own_expert(tmp_path):
    """Several edits in one batch (each its own expert and neuron), routed through the key matcher."""
    loaded = load_model(make_tiny_model("llama", tmp_path / "m"))
    recs = [EditRecord(prompt=f"{s} was born in", target=t, subject=s)
            for s, t in (("Alice Moreau", "Tokyo"), ("Bruno Silva", "Lima"), ("Chen Wei", "Oslo"))]
    unrelated = EditRecord(prompt="Dora Blum was born in", target="Rome", subject="Dora Blum")
    base = compute_baseline(loaded.model, loaded.tokenizer, recs + [unrelated])
    method = SCEN(loaded, SCENConfig(lr=0.02, max_steps=60, neuron_loss="hinge", neuron_steps=200, stop_prob=0.0),
                  seed=0)
    assert method.config.scope and method.matcher is not None
    method.apply_batch(recs, 0)
    assert method.expert_of(2) == 2
    after = evaluate_records(loaded.model, loaded.tokenizer, recs, base).summary
    assert after["rel"] == 1.0
    assert method.routes([unrelated.prompt]) == [None]  # names no edited entity: null route
    assert method.routes([r.prompt for r in recs]) == [0, 1, 2]


def test_stage_one_trains_an_edit_that_names_no_entity_with_scope_on(tmp_path):
    """Stage 1 forces every input to the new expert, those that name no edited entity too: the bypass's shortcut
    for a forward in which no input names one is off while it trains, and back on after."""
    loaded = load_model(make_tiny_model("llama", tmp_path / "m"))
    rec = EditRecord(prompt="The sky on that day was", target="green")
    method = SCEN(loaded, SCENConfig(lr=0.02, max_steps=60, neuron_loss="hinge", neuron_steps=50, stop_prob=0.0),
                  seed=0)
    assert method.config.scope and method.bypass.unmatched_get_nothing
    stats = method.apply_batch([rec], 0)
    assert stats["all_correct"] and method.bypass.experts[0].B.abs().sum() > 0
    assert method.bypass.unmatched_get_nothing and method.bypass.router.forced is None
