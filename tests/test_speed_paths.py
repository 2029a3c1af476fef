"""The fast paths of training are exact: replaying the frozen layers below the edited one
(`FrozenPrefix`) and computing logits only at answer positions (`answer_logits`) give the same loss,
the same gradients and the same final adapter as full forward passes, on two families."""

from __future__ import annotations

import pytest
import torch

from moecli.adapter.training import FrozenPrefix, PromptCache
from moecli.data.records import EditRecord
from moecli.methods.memoe import MEMoE, MEMoEConfig
from moecli.model.batching import answer_logits, collate, encode_pair, forward, pad_id_of
from moecli.model.loading import SUPPORTED_FAMILIES, decoder_layers, load_model
from moecli.model.tiny import make_tiny_model

RECORDS = [
    EditRecord(prompt="Alice Moreau was born in", target="Tokyo", subject="Alice Moreau"),
    EditRecord(prompt="Bruno Keller works for", target="Northwind", subject="Bruno Keller"),
]


@pytest.fixture(params=["llama", "gpt2"])
def loaded(request, tmp_path):
    return load_model(make_tiny_model(request.param, tmp_path / request.param))


def _batch(loaded):
    pad = pad_id_of(loaded.tokenizer)
    return collate([encode_pair(loaded.tokenizer, r.prompt, r.target) for r in RECORDS], pad)


def test_answer_logits_equal_the_full_logits_at_answer_positions(loaded):
    batch = _batch(loaded)
    with torch.no_grad():
        full = forward(loaded.model, batch)
        packed, answers, rows = answer_logits(loaded.model, batch)
    r, c = torch.nonzero(batch.labels[:, 1:] != -100, as_tuple=True)
    assert torch.allclose(packed, full[r, c], atol=1e-5)
    assert torch.equal(rows, r) and torch.equal(answers, batch.labels[r, c + 1])


def _loss_and_grads(loaded, method, cached: bool):
    params = method.trainable([method.bypass.experts, method.bypass.router])
    for p in params:
        p.grad = None
    batch = _batch(loaded)
    prefix = FrozenPrefix(loaded.model, params if cached else [])
    with prefix:
        for _ in range(2):  # the second pass replays the prefix when cached
            with prefix.batch(0):
                logits, answers, _ = answer_logits(loaded.model, batch)
        loss = torch.nn.functional.cross_entropy(logits, answers)
    loss.backward()
    return loss.detach(), [None if p.grad is None else p.grad.clone() for p in params], prefix.depth


def test_replayed_prefix_gives_the_same_loss_and_gradients(loaded):
    method = MEMoE(loaded, MEMoEConfig(layer=2, null_route=False, scope=False, n_experts=2), seed=0)
    method.register_anchors(RECORDS)
    with torch.no_grad():  # non-zero experts, so the gradients reach every parameter
        for p in method.bypass.experts.parameters():
            p.normal_(0, 0.1)
    layers = list(decoder_layers(loaded.model))
    full_loss, full_grads, depth0 = _loss_and_grads(loaded, method, cached=False)
    fast_loss, fast_grads, depth = _loss_and_grads(loaded, method, cached=True)
    assert depth0 == 0 and depth == 2  # layers 0 and 1 replayed, the bypass sits in layer 2
    assert torch.allclose(full_loss, fast_loss, atol=1e-6)
    assert sum(g is not None for g in full_grads) >= 3  # the experts and the gate get gradients
    for a, b in zip(full_grads, fast_grads):
        assert (a is None) == (b is None)
        assert a is None or torch.allclose(a, b, atol=1e-6)
    assert list(decoder_layers(loaded.model)) == layers  # the original layers are back


def test_same_adapter_with_and_without_the_prefix_cache(loaded):
    states = []
    for cache in (True, False):
        config = MEMoEConfig(lr=0.02, max_steps=40, retain="none", prefix_cache=cache, noisy_gate=False)
        method = MEMoE(loaded, config, seed=0)  # no gate noise: it is drawn per fed position
        torch.manual_seed(0)
        stats = method.apply_batch(RECORDS, 0)
        states.append((stats["steps"], {k: v.clone() for k, v in method.bypass.state_dict().items()
                                        if not k.startswith("base.")}))
        method.remove()
    (steps_a, a), (steps_b, b) = states
    assert steps_a == steps_b
    for k in a:  # fp32 rounding of the two attention layouts, carried through the Adam steps
        assert torch.allclose(a[k], b[k], atol=1e-4), k


def test_signature_shares_the_prefix_and_equals_a_full_pass(loaded):
    """The base-output signature of an input naming an edited entity is computed from the layers below
    the bypass as the pass under way ran them; it equals the signature of a whole separate pass."""
    method = MEMoE(loaded, MEMoEConfig(lr=0.02, max_steps=5, retain="none"), seed=0)
    method.apply_batch(RECORDS, 0)
    injection, ctx = method.injection, method.context
    batch = collate([encode_pair(loaded.tokenizer, r.prompt, r.target) for r in RECORDS]
                    + [encode_pair(loaded.tokenizer, "The capital of France is", "Paris")], pad_id_of(loaded.tokenizer))
    signatures, calls = [], []
    real = injection._signature

    def spy(*args, **kwargs):
        calls.append(kwargs.get("prefix_output") is not None)
        return real(*args, **kwargs)

    injection._signature = spy
    for below in (injection._below, None):
        injection._below, injection._sig_cache = below, []
        with torch.no_grad():
            forward(loaded.model, batch)
        signatures.append(ctx.signature.clone())
    assert injection._below is None and calls[0]  # the first pass went through the shared prefix
    assert torch.allclose(signatures[0], signatures[1], atol=1e-5)
    assert signatures[0][2].abs().sum() == 0  # the third input names no edited entity: no signature


MIXED = RECORDS + [
    EditRecord(prompt="The mother tongue of Carla Duarte Pereira is", target="Danish", subject="Carla Duarte Pereira"),
    EditRecord(prompt="Dan Ito plays", target="the violin", subject="Dan Ito"),
]


def _mixed_batch(loaded):
    pad = pad_id_of(loaded.tokenizer)
    return collate([encode_pair(loaded.tokenizer, r.prompt, r.target) for r in MIXED], pad)


@pytest.mark.parametrize("family", sorted(SUPPORTED_FAMILIES))
def test_prompt_cache_gives_the_answer_logits_of_a_whole_pass(family, tmp_path):
    """Every family: the columns before each prompt's last token run once, into a KV cache, and each row
    fed from its own last prompt token gives the same answer logits as the whole batch (prompts of 4
    lengths, so rows start at different columns and some cached columns are masked)."""
    loaded = load_model(make_tiny_model(family, tmp_path / family))
    method = MEMoE(loaded, MEMoEConfig(layer=2, null_route=False, scope=False, n_experts=2), seed=0)
    method.register_anchors(MIXED)
    with torch.no_grad():
        for p in method.bypass.experts.parameters():
            p.normal_(0, 0.1)
    batch = _mixed_batch(loaded)
    assert len(set(batch.prompt_lengths)) > 1
    widths = []
    hook = loaded.model.register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    cache = PromptCache(loaded.model, method.unedited())
    with torch.no_grad():
        whole, answers, _ = answer_logits(loaded.model, batch)
        widths.clear()
        for _ in range(2):  # the second pass copies the cache the first filled
            fast, fast_answers = cache.answer_logits(0, batch)
    hook.remove()
    assert cache.caches[0] is not None, f"{family}: no KV cache to reuse"
    starts = [n - 1 for n in batch.prompt_lengths]
    window = getattr(loaded.model.config, "sliding_window", None)
    if isinstance(window, int) and batch.input_ids.shape[1] > window:  # tiny Gemma 3: a 16-token window
        starts = [min(starts)] * len(starts)  # its masks count columns: every row from one column
    fed = max(int(n) - s for n, s in zip(batch.attention_mask.sum(1), starts))  # the longest row from its start
    # filled once, checked once against a whole pass (the whole batch, then the cached path), then fed twice
    assert widths == [max(starts), batch.input_ids.shape[1], fed, fed, fed] and fed < batch.input_ids.shape[1]
    assert torch.equal(answers, fast_answers)
    assert torch.allclose(whole, fast, atol=1e-4), (whole - fast).abs().max()


def test_prompt_cache_gives_the_same_loss_and_gradients(loaded):
    method = MEMoE(loaded, MEMoEConfig(layer=2, null_route=False, scope=False, n_experts=2, noisy_gate=False),
                   seed=0)
    method.register_anchors(MIXED)
    params = method.trainable([method.bypass.experts, method.bypass.router])
    with torch.no_grad():
        for p in method.bypass.experts.parameters():
            p.normal_(0, 0.1)
    batch = _mixed_batch(loaded)
    results = []
    for unedited in (None, method.unedited()):
        for p in params:
            p.grad = None
        cache = PromptCache(loaded.model, unedited)
        cache.answer_logits(0, batch)  # fills the cache
        logits, answers = cache.answer_logits(0, batch)
        loss = torch.nn.functional.cross_entropy(logits, answers)
        loss.backward()
        results.append((loss.detach(), [None if p.grad is None else p.grad.clone() for p in params]))
    (full_loss, full_grads), (fast_loss, fast_grads) = results
    assert torch.allclose(full_loss, fast_loss, atol=1e-5)
    assert sum(g is not None for g in full_grads) >= 3
    for a, b in zip(full_grads, fast_grads):
        assert (a is None) == (b is None)
        assert a is None or torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("method_name", ["lemoe", "scen"])
def test_same_adapter_with_and_without_the_caches(loaded, method_name):
    """LEMoE (key-matched routes, key substitution, signatures) and SCEN (a forced expert, then its
    neuron) end with the same adapter whether the prompt columns are cached or fed every step."""
    from moecli.methods import get_method

    cls = get_method(method_name)
    states = []
    for cache in (True, False):
        method = cls(loaded, cls.config_class(lr=0.02, max_steps=40, prefix_cache=cache), seed=0)
        torch.manual_seed(0)
        stats = method.apply_batch(MIXED, 0)
        states.append((stats["steps"], {k: v.clone() for k, v in method.bypass.state_dict().items()
                                        if not k.startswith("base.")}, method.routes([r.prompt for r in MIXED])))
        method.remove()
    (steps_a, a, routes_a), (steps_b, b, routes_b) = states
    assert steps_a == steps_b and routes_a == routes_b
    for k in a:  # fp32 rounding of the two attention layouts, carried through 40 Adam steps
        assert torch.allclose(a[k], b[k], atol=1e-4), k


def test_a_batch_whose_cached_pass_is_not_the_whole_one_is_fed_whole(tmp_path, monkeypatch):
    """The prompt cache is checked once per batch against a whole pass (on Gemma 3 270M a batch's cached pass
    was not, and its edits trained on it did not hold); where the two differ the batch is fed whole."""
    loaded = load_model(make_tiny_model("llama", tmp_path / "llama"))
    method = MEMoE(loaded, MEMoEConfig(layer=2, null_route=False, scope=False, n_experts=2), seed=0)
    method.register_anchors(MIXED)
    batch = _mixed_batch(loaded)
    real = PromptCache._cached_logits

    def off(self, *args):
        logits, answers = real(self, *args)
        return logits + 1.0, answers  # a cached pass that is not the whole one

    monkeypatch.setattr(PromptCache, "_cached_logits", off)
    cache = PromptCache(loaded.model, method.unedited())
    with torch.no_grad():
        whole, answers, _ = answer_logits(loaded.model, batch)
        got, got_answers = cache.answer_logits(0, batch)
    assert cache.caches[0] is None and torch.equal(got, whole) and torch.equal(got_answers, answers)


def test_the_prompt_cache_under_the_frozen_prefix_when_the_cached_columns_are_as_many_as_the_fed_ones(tmp_path):
    """Training runs both caches at once. A batch whose cache holds as many columns as it then feeds (4 and 4
    here) has a filling pass and a fed pass of one shape; the frozen layers' replay once gave the fed pass the
    filling pass's hidden states (on Gemma 3 270M such batches trained to every target and answered as the
    unedited model). The two are told apart: the batch keeps its cached path, with the whole pass's logits."""
    from moecli.model.batching import EncodedPair

    loaded = load_model(make_tiny_model("llama", tmp_path / "llama"))
    method = MEMoE(loaded, MEMoEConfig(layer=2, null_route=False, scope=False, n_experts=2), seed=0)
    method.register_anchors(MIXED)
    params = method.trainable([method.bypass.experts, method.bypass.router])
    with torch.no_grad():
        for p in method.bypass.experts.parameters():
            p.normal_(0, 0.1)
    # rows start at their last prompt token, columns 4 and 2: 4 columns cached, max(8 - 4, 6 - 2) = 4 fed
    batch = collate([EncodedPair(ids=[5, 9, 14, 20, 27, 33, 38, 41], answer_start=5),
                     EncodedPair(ids=[7, 12, 18, 25, 30, 36], answer_start=3)], pad_id_of(loaded.tokenizer))
    prefix = FrozenPrefix(loaded.model, params)
    assert prefix.depth == 2
    cache = PromptCache(loaded.model, method.unedited())
    method.bypass.eval()  # no gate noise: the passes compared must differ only by the caches
    with torch.no_grad():
        whole, answers, _ = answer_logits(loaded.model, batch)
        with prefix:
            for _ in range(2):  # the second pass replays the frozen layers of the first
                with prefix.batch(0):
                    fast, fast_answers = cache.answer_logits(0, batch)
                assert cache.caches[0] is not None, "the cached path was found inexact"
                assert torch.equal(answers, fast_answers)
                assert torch.allclose(whole, fast, atol=1e-4), (whole - fast).abs().max()
