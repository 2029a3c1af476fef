"""Generation keeps each prompt's routes for all of its generated tokens, whatever way `generate` runs.

The reference is moecli's own teacher-forced scoring: greedy decoding must pick, token by token, what
scoring `prompt + tokens so far` picks. That must hold with and without a KV cache, for beam search,
sampling, batched left-padded prompts and a hand-written decoding loop, on two families (Llama's
rotary positions, GPT-2's learned positions table) and for a bypass method (MEMoE), SCEN and GRACE.
The transformers 5.24 release renamed the cache argument of `forward`, which silently turned every
later generation step into a new prompt: these tests are what would have caught it.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from moecli.data.records import EditRecord
from moecli.methods.grace import GRACE, GRACEConfig
from moecli.methods.memoe import MEMoE, MEMoEConfig
from moecli.methods.scen import SCEN, SCENConfig
from moecli.model.batching import EncodedPair, collate, encode_pair, encode_prompt, forward, pad_id_of
from moecli.model.loading import load_model
from moecli.model.tiny import make_tiny_model

EDIT = EditRecord(prompt="Alice Moreau was born in", target="Tokyo", subject="Alice Moreau")
SHORT = EditRecord(prompt="Alice Moreau was born in", target="London", subject="Alice Moreau")
OTHER = "The capital of France is"
NEW = 4  # generated tokens per test

# Targets trained without the end-of-sequence token: these tests compare generated tokens with the target's
# own, over NEW tokens (and beam search would rank a beam that stops early first).
METHODS = {
    "memoe": (MEMoE, MEMoEConfig, {"lr": 0.02, "max_steps": 200, "retain": "none", "stop_prob": 0.0,
                                   "eos_target": False}, EDIT),
    "scen": (SCEN, SCENConfig, {"lr": 0.02, "max_steps": 60, "neuron_loss": "hinge", "neuron_steps": 200,
                                "stop_prob": 0.0, "eos_target": False}, EDIT),
    "grace": (GRACE, GRACEConfig, {}, SHORT),  # one-token answer: see tests/test_baselines.py
}


@pytest.fixture(scope="module", params=[(f, m) for f in ("llama", "gpt2") for m in METHODS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def edited(request, tmp_path_factory):
    family, name = request.param
    loaded = load_model(make_tiny_model(family, tmp_path_factory.mktemp(family) / family))
    cls, config_cls, options, record = METHODS[name]
    base_other = _generate(loaded, [OTHER])
    method = cls(loaded, config_cls(**options), seed=0)
    torch.manual_seed(0)  # MEMoE's gate noise draws from torch's generator (the engine seeds it per batch)
    stats = method.apply_batch([record], 0)
    assert stats["all_correct"]
    return loaded, record, base_other, name


def _left_padded(loaded, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    pad = pad_id_of(loaded.tokenizer)
    enc = [encode_prompt(loaded.tokenizer, p) for p in prompts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for row, e in enumerate(enc):
        ids[row, width - len(e):] = torch.tensor(e)
        mask[row, width - len(e):] = 1
    return ids.to(loaded.device), mask.to(loaded.device)


def _generate(loaded, prompts: list[str], **kwargs) -> torch.Tensor:
    ids, mask = _left_padded(loaded, prompts)
    options = {"do_sample": False, "max_new_tokens": NEW, "pad_token_id": pad_id_of(loaded.tokenizer), **kwargs}
    with torch.no_grad():
        out = loaded.model.generate(input_ids=ids, attention_mask=mask, **options)
    return out[:, ids.shape[1]:]


@torch.no_grad()
def _greedy_by_scoring(loaded, prompt: str, n: int = NEW) -> list[int]:
    """Greedy decoding done by teacher-forced scoring: each step scores prompt + tokens so far."""
    prompt_ids = encode_prompt(loaded.tokenizer, prompt)
    got: list[int] = []
    for _ in range(n):
        item = EncodedPair(ids=prompt_ids + got, answer_start=len(prompt_ids))
        logits = forward(loaded.model, collate([item], pad_id_of(loaded.tokenizer)).to(loaded.device))
        got.append(int(logits[0, -1].argmax()))
    return got


def test_greedy_generation_with_cache_is_teacher_forced_greedy_and_says_the_edit(edited):
    loaded, record, *_ = edited
    expect = _greedy_by_scoring(loaded, record.prompt)
    assert _generate(loaded, [record.prompt])[0].tolist() == expect
    answer = encode_pair(loaded.tokenizer, record.prompt, record.target).answer_ids
    assert expect[: len(answer)] == answer  # the edit shows in generation, not only when scored


def test_generation_without_cache_equals_with_cache(edited):
    loaded, record, *_ = edited
    prompts = [record.prompt, OTHER]
    assert torch.equal(_generate(loaded, prompts, use_cache=False), _generate(loaded, prompts, use_cache=True))


def test_batched_left_padded_prompts_route_each_row_alone(edited):
    loaded, record, base_other, name = edited
    out = _generate(loaded, [OTHER, record.prompt])
    assert out[1].tolist() == _greedy_by_scoring(loaded, record.prompt)
    assert out[0].tolist() == _greedy_by_scoring(loaded, OTHER)
    if name != "grace":  # GRACE's radius, not an entity test, decides; on a random model it may reach OTHER
        assert torch.equal(out[0], base_other[0])  # a prompt naming no edited entity is generated as before


def test_beam_search_keeps_the_routes_of_every_beam(edited):
    loaded, record, *_ = edited
    answer = encode_pair(loaded.tokenizer, record.prompt, record.target).answer_ids
    for use_cache in (True, False):
        out = _generate(loaded, [record.prompt, OTHER], num_beams=3, num_return_sequences=2, use_cache=use_cache)
        assert out.shape[0] == 4
        assert out[0, : len(answer)].tolist() == answer  # the best beam of the edited prompt


def test_sampling_routes_every_returned_sequence(edited):
    loaded, record, *_ = edited
    torch.manual_seed(0)
    out = _generate(loaded, [record.prompt], do_sample=True, top_k=1, num_return_sequences=3)
    expect = _greedy_by_scoring(loaded, record.prompt)
    assert [row.tolist() for row in out] == [expect] * 3  # top-k 1 sampling is greedy, on every copy
    torch.manual_seed(1)
    a = _generate(loaded, [record.prompt], do_sample=True, temperature=0.7)
    torch.manual_seed(1)
    b = _generate(loaded, [record.prompt], do_sample=True, temperature=0.7, use_cache=False)
    assert torch.equal(a, b)


def test_hand_written_decoding_loop_with_a_cache_object(edited):
    loaded, record, *_ = edited
    ids, mask = _left_padded(loaded, [record.prompt])
    got: list[int] = []
    # the name transformers gives the cache argument (5.24 renamed it): the route must not depend on it
    cache_arg = "cache" if "cache" in inspect.signature(loaded.model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = loaded.model(input_ids=ids, attention_mask=mask, use_cache=True)
        for _ in range(NEW):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            got.append(int(token))
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            cache = getattr(out, "cache", None) or out.past_key_values
            out = loaded.model(input_ids=token, attention_mask=mask, use_cache=True, **{cache_arg: cache})
    assert got == _greedy_by_scoring(loaded, record.prompt)
