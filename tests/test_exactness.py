"""Exactness promises, checked bit for bit (`torch.equal`, never allclose or argmax), on the fact-world model.

1. Locality on mixed batches: after edits, one padded batch that mixes edited and unedited prompts of
   different lengths gives every unedited row exactly the logits the unedited model gives it, at every
   real position, for every routed method, padded on the right (teacher-forced scoring, `batching.collate`)
   or on the left (free generation, as `evaluation.generate_ids` pads).
2. `moecli revert` (memoe, lemoe, scen, grace): the reverted edit's prompts get the unedited model's logits,
   every other edit keeps its logits as they were before the revert, unedited prompts keep theirs.
3. `remove()`: the base model comes back bit for bit, logits, weights, modules and hooks.

Each method promises exactness only for inputs that reach no edit; the tests stay inside that promise and
assert its condition first (`_reached`): MEMoE, LEMoE (knn) and SCEN null-route an input that names no edited
entity (docs/design.md, "Key matcher"); GRACE defers to the base model outside every codebook radius; WISE runs the
main memory when no side memory's routing activation passes its threshold. The unedited prompts name other
subjects than the edits (the fact world's reserved facts: no edit may change them).

Why the fact-world model (the default `--model`, committed, 1.6 M parameters): it knows its facts, so the
edits are real changes of a known answer and the methods' routing tests (the base model's answer signature)
see a trained model's distributions; every edit below trains in a few steps.

The comparison is with the same batch composition run before any edit: padding changes float results, so a
prompt run alone can differ from the same prompt inside a padded batch even on the unedited model (measured
here: up to 4e-6 in the logits of a right-padded row). A prompt alone is compared with itself alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moecli.data.records import EditRecord
from moecli.engine.adapters import load_edited, revert_edits
from moecli.engine.recipes import build_config
from moecli.engine.run import RunSpec, run_edits
from moecli.methods import get_method
from moecli.methods.base import EditMethod
from moecli.methods.bypass_method import BypassMethod
from moecli.methods.grace import GRACE
from moecli.methods.wise import WISE
from moecli.model.batching import collate, encode_pair, encode_prompt, forward, pad_id_of, prompt_only
from moecli.model.loading import LoadedModel, load_model
from moecli.world import default_model_dir
from moecli.world.generator import build_world

ROUTED = ("memoe", "lemoe", "scen", "grace", "wise")
REVERTIBLE = ("memoe", "lemoe", "scen", "grace")  # README, "Day to day": FT-L and LoRA are refused

# query_feature pinned to what `auto` resolves to on a model without a calibrated question key, so that a key
# installed in the user's cache cannot change the test. WISE's margins scaled to this model's activations
# (EasyEdit's α 5, β 20, γ 10 are for LLaMA-7B; here edit inputs reach Δ_act of a few hundred): measured, the
# edits end near 340-410 with a threshold of 300, the unedited prompts below 160.
OVERRIDES: dict[str, dict] = {
    "memoe": {"query_feature": "output"},
    "lemoe": {"query_feature": "output"},
    "scen": {"query_feature": "output"},
    "grace": {},
    "wise": {"lr": 0.01, "optimizer": "adam", "max_steps": 40, "mask_ratio": 0.5, "prefixes": 2,
             "alpha": 5.0, "beta": 100.0, "gamma": 80.0},
}

EDITS: list[EditRecord] = build_world(0).edit_records(3)  # Irene Dubois lives in, Alice Petrov speaks, Brightwater…
# Other subjects, the fact world's reserved facts (the first three are the edits' own same-relation locality
# prompts); lengths 10, 4, 5 and 6 tokens (with BOS) around the edits' 5, 4 and 6.
UNEDITED = ["Which city does Olga Haddad live in? In", "Elena Novak speaks", "Xantia is headquartered in",
            "The capital of Kenya is"]
# Edited and unedited rows interleaved; the longest row is unedited, so edited rows are padded too.
MIXED = [UNEDITED[0], EDITS[0].prompt, UNEDITED[1], EDITS[1].prompt, UNEDITED[2], EDITS[2].prompt, UNEDITED[3]]
IS_EDITED = [p in {r.prompt for r in EDITS} for p in MIXED]
# Two batches (LEMoE gets two experts, SCEN and GRACE edit one at a time anyway), except WISE: on this 3-layer
# model a second batch's training of the same shard lifts the routing activation of every prompt of the edited
# templates, and the open shard keeps the threshold of the smallest activation measured when each batch ended
# (measured: "Elena Novak speaks" 337 against 329), so such prompts would leave the promise's condition (a
# routing miss, not an exactness break).
BATCHES: dict[str, list[list[EditRecord]]] = {name: [EDITS[:2], EDITS[2:]] for name in ROUTED} | {"wise": [EDITS]}
NEW_TOKENS = 3  # generated tokens compared in the left-padded (generation) path

Logits = list[torch.Tensor]  # one tensor per prompt: its logits at its real positions only


@pytest.fixture(scope="module")
def fact_world() -> Path:
    assert not any(r.subject in p for r in EDITS for p in UNEDITED)  # genuinely other subjects
    return default_model_dir()


@torch.no_grad()
def teacher_forced(loaded: LoadedModel, prompts: list[str]) -> Logits:
    """One right-padded batch (`collate`, as training and the teacher-forced metrics feed the model): each
    row's logits at its real positions."""
    items = [prompt_only(loaded.tokenizer, p) for p in prompts]
    logits = forward(loaded.model, collate(items, pad_id_of(loaded.tokenizer)).to(loaded.device))
    return [logits[i, : len(it.ids)].clone() for i, it in enumerate(items)]


@torch.no_grad()
def generated(loaded: LoadedModel, prompts: list[str]) -> Logits:
    """One left-padded greedy `generate` (padded as `evaluation.generate_ids` pads, KV cache on): each row's
    logits at the `NEW_TOKENS` steps. min_new_tokens keeps every row going, so the batch keeps its shape
    whatever the edited rows say."""
    tok = loaded.tokenizer
    encoded = [encode_prompt(tok, p) for p in prompts]
    pad, width = pad_id_of(tok), max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, width - len(e):] = torch.tensor(e)
        mask[row, width - len(e):] = 1
    out = loaded.model.generate(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
    steps = torch.stack(out.logits, 1)  # [B, NEW_TOKENS, vocab], the raw logits before any processor
    return [steps[i].clone() for i in range(len(prompts))]


PATHS: dict[str, Callable[[LoadedModel, list[str]], Logits]] = {"right": teacher_forced, "left": generated}


def edit(loaded: LoadedModel, name: str) -> EditMethod:
    """`name` built on `loaded` with `OVERRIDES`, then its `BATCHES` applied; each edit must take (its prompt's
    argmax is the target's first token)."""
    method = get_method(name)(loaded, build_config(name, overrides=OVERRIDES[name]), 0)
    for b, batch in enumerate(BATCHES[name]):
        method.apply_batch(batch, b)
    for record, logits in zip(EDITS, teacher_forced(loaded, [r.prompt for r in EDITS])):
        assert int(logits[-1].argmax()) == _target_token(loaded, record), (name, record.prompt)
    return method


def _reached(method: EditMethod, loaded: LoadedModel, prompts: list[str]) -> list[bool]:
    """Whether each prompt, in one right-padded batch, took an edit: what the method's own decision for the
    forward says (the condition outside of which it promises the base model's output)."""
    teacher_forced(loaded, prompts)
    if isinstance(method, GRACE):
        decided = method.grace._cached >= 0  # nearest key within its radius
    elif isinstance(method, WISE):
        decided = method.wise.last_choice >= 0  # a side memory's Δ_act above its threshold
    else:
        assert isinstance(method, BypassMethod)
        routes = method.bypass.last_routes  # [B, T, k] expert ids, −1: the null route
        decided = (routes >= 0).flatten(1).any(1) if routes is not None else torch.zeros(len(prompts), dtype=torch.bool)
    return [bool(d) for d in decided.tolist()]


def _target_token(loaded: LoadedModel, record: EditRecord) -> int:
    return encode_pair(loaded.tokenizer, record.prompt, record.target).answer_ids[0]


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", ROUTED)
def test_unedited_rows_of_a_mixed_batch_keep_the_base_logits_bit_for_bit(
        fact_world: Path, name: str, padding: str) -> None:
    """Locality by construction, the promise of every routed method: an input that reaches no edit gets the
    unedited model's output bit for bit, even when the rows beside it in the batch do reach one (a routing
    decision, a mask or a delta computed for the whole batch would leak into them). Checked on both padding
    sides: right as the teacher-forced metrics pad, left as generation pads (with the KV-cache steps after
    it); and each unedited prompt alone, unpadded."""
    run = PATHS[padding]
    loaded = load_model(fact_world)
    base = run(loaded, MIXED)
    base_alone = [run(loaded, [p])[0] for p in UNEDITED]
    method = edit(loaded, name)

    assert _reached(method, loaded, MIXED) == IS_EDITED  # inside the promise: only the edit prompts reach one
    after = run(loaded, MIXED)
    for prompt, edited, got, want in zip(MIXED, IS_EDITED, after, base):
        if edited:
            assert not torch.equal(got, want), f"{name}: the edit of {prompt!r} is not live (the test is vacuous)"
        else:
            assert torch.equal(got, want), f"{name}, {padding} padding: unedited {prompt!r} changed in a mixed batch"
    for prompt, want in zip(UNEDITED, base_alone):
        assert torch.equal(run(loaded, [prompt])[0], want), f"{name}: unedited {prompt!r} changed, alone"


@pytest.mark.parametrize("name", REVERTIBLE)
def test_revert_gives_back_the_base_logits_and_keeps_every_other_edit(
        fact_world: Path, tmp_path: Path, name: str) -> None:
    """`moecli revert` (here `engine.revert_edits`, what it calls, on a checkpoint `run_edits` wrote) promises
    that a reverted edit's prompts get the base model's output bit for bit while every other edit routes
    exactly as before, without retraining anything (README, "Day to day"). The reverted edit is the second
    of three; LEMoE edits in batches of two, so the edit taken back shares its expert with one that stays,
    and the third is another batch's expert."""
    gone, kept = EDITS[1], [EDITS[0], EDITS[2]]
    run_dir = tmp_path / "run"
    run_edits(RunSpec(command="lifelong" if name == "lemoe" else "batch-edit", method=name,
                      config=build_config(name, overrides=OVERRIDES[name]), records=EDITS,
                      batch_size=2 if name == "lemoe" else len(EDITS), out_dir=run_dir, model_path=fact_world,
                      generation=False, evaluate_before=False))
    loaded = load_model(fact_world)
    # the reverted edit's prompt and rephrasings, the kept edits and the unedited prompts, in one batch
    gone_prompts = [gone.prompt, *gone.rephrases]
    prompts = [UNEDITED[0], kept[0].prompt, *gone_prompts, UNEDITED[1], kept[1].prompt, *UNEDITED[2:]]
    role = {p: "gone" for p in gone_prompts} | {r.prompt: "kept" for r in kept} | dict.fromkeys(UNEDITED, "unedited")
    base = teacher_forced(loaded, prompts)
    base_gone_alone = teacher_forced(loaded, [gone.prompt])[0]

    method = load_edited(loaded, run_dir)
    before = teacher_forced(loaded, prompts)
    method.remove()
    for record in [gone, *kept]:  # every edit took before the revert
        row = before[prompts.index(record.prompt)]
        assert int(row[-1].argmax()) == _target_token(loaded, record), (name, record.prompt)
    assert not torch.equal(before[prompts.index(gone.prompt)], base[prompts.index(gone.prompt)])

    result = revert_edits(run_dir, [gone.id], [])
    assert result["reverted"] == [gone.id] and result["remaining"] == len(kept)
    method = load_edited(loaded, run_dir)
    after = teacher_forced(loaded, prompts)
    for prompt, got, was, want in zip(prompts, after, before, base):
        if role[prompt] == "kept":
            assert torch.equal(got, was), f"{name}: kept edit {prompt!r} changed by the revert"
        else:
            assert torch.equal(got, want), f"{name}: {role[prompt]} prompt {prompt!r} is not the base model's"
    assert torch.equal(teacher_forced(loaded, [gone.prompt])[0], base_gone_alone)
    method.remove()


def _hooks(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}


@pytest.mark.parametrize("name", ROUTED)
def test_remove_restores_the_base_model_bit_for_bit(fact_world: Path, name: str) -> None:
    """`remove()` promises the base model exactly as loaded (README, "From Python": "the base model,
    bit-identical"): the same logits in a mixed batch on both padding sides, every parameter and buffer
    equal to its value before editing, the original module objects in place, no hook and no `generate`
    wrapper left behind, nothing trainable."""
    loaded = load_model(fact_world)
    model = loaded.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    hooks, own_generate = _hooks(model), model.__dict__.get("generate")
    base = {side: run(loaded, MIXED) for side, run in PATHS.items()}

    method = edit(loaded, name)
    edited = teacher_forced(loaded, MIXED)
    assert any(not torch.equal(a, b) for a, b in zip(edited, base["right"]))  # the edits are live
    method.remove()

    for side, run in PATHS.items():
        for prompt, got, want in zip(MIXED, run(loaded, MIXED), base[side]):
            assert torch.equal(got, want), f"{name}: {prompt!r} ({side} padding) not restored"
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in after.items():
        assert torch.equal(value, state[key]), key
    assert list(dict(model.named_modules())) == list(modules)
    assert all(module is modules[n] for n, module in model.named_modules())  # the original objects back
    assert _hooks(model) == hooks
    assert model.__dict__.get("generate") is own_generate  # the model's own generate again
    assert not any(p.requires_grad for p in model.parameters())
