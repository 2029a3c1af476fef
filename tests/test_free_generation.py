"""Free generation (what the model says, nothing of the answer given) and edits trained to stop after the target.

The verdicts on hand-written answers; the stop tokens and the end token of a trained target, for a plain and a
chat prompt; a tiny edited model that answers its target and stops (and does not stop with `eos_target` off);
an editing command's report carrying the free metrics.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_moecli

from moecli.data.readers import write_jsonl
from moecli.data.records import EditRecord, LocalityPair
from moecli.engine.evaluation import FREE_NEW_TOKENS, compute_baseline, evaluate_records, free_answers, free_verdicts
from moecli.methods.memoe import MEMoE, MEMoEConfig
from moecli.model.batching import (
    answer_end_id,
    chat_prompt,
    encode_pair,
    end_of_turn_id,
    is_chat_prompt,
    stop_token_ids,
)
from moecli.model.loading import load_model
from moecli.model.tiny import BOS_ID, EOS_ID, TINY_TEXTS, make_tiny_model
from moecli.model.tokenizer import train_tokenizer


@pytest.mark.parametrize(("answer", "target", "exact", "clause", "first"), [
    ("Rome", "Rome", True, True, True),
    ("rome.", "Rome", True, True, True),  # case and punctuation
    ("The Rome", "Rome", True, True, True),  # articles
    ("Rome, Italy", "Rome", False, True, True),  # said first, the phrase ended, then more
    ("Rome; later Milan", "Rome", False, True, True),
    ("Rome.\nQuestion: what is", "Rome", False, True, True),
    ("Rome is the capital of Italy", "Rome", False, False, True),  # said first, the phrase went on
    ("Rome Rome Rome", "Rome", False, False, True),  # the answer that does not stop
    ("Washington, D.C., USA", "Washington, D.C.", False, True, True),  # a target holding a break
    ("Romeo", "Rome", False, False, False),  # not at a word boundary
    ("Paris", "Rome", False, False, False),
    ("", "Rome", False, False, False),
    ("I think Rome", "Rome", False, False, False),  # said, but not first
    ("I think, Rome", "Rome", False, False, False),
    ("New York City", "New York", False, False, True),
    ("New Yorker", "New York", False, False, False),
    ("the", "The", True, True, True),  # a target that normalises to nothing
    ("Italy", "the", False, False, False),
])
def test_free_verdicts(answer, target, exact, clause, first):
    assert free_verdicts(answer, target) == (exact, clause, first)


@pytest.fixture(scope="module")
def chat_tok():
    """The test tokenizer with a chat template whose end of turn (`<unk>`, 3) is not its end of sequence (2)."""
    tok = train_tokenizer(TINY_TEXTS, vocab_size=512)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}<unk>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    return tok


def test_end_token_of_a_plain_and_a_chat_prompt(chat_tok):
    unk = chat_tok.convert_tokens_to_ids("<unk>")
    assert end_of_turn_id(chat_tok) == unk != EOS_ID
    assert stop_token_ids(chat_tok) == [EOS_ID, unk]
    plain = "The capital of France is"
    chat = chat_prompt(chat_tok, plain)
    assert is_chat_prompt(chat_tok, chat) and not is_chat_prompt(chat_tok, plain)
    assert answer_end_id(chat_tok, plain) == EOS_ID and answer_end_id(chat_tok, chat) == unk
    for prompt, end in ((plain, EOS_ID), (chat, unk)):
        bare, ended = encode_pair(chat_tok, prompt, "Rome"), encode_pair(chat_tok, prompt, "Rome", end=True)
        assert ended.ids == [*bare.ids, end] and ended.answer_ids == [*bare.answer_ids, end]
        assert ended.answer_start == bare.answer_start


def test_a_tokenizer_without_end_tokens_trains_the_target_alone():
    tok = train_tokenizer(TINY_TEXTS, vocab_size=512)
    tok.eos_token = None
    assert answer_end_id(tok, "The capital of France is") is None
    assert encode_pair(tok, "The capital of France is", "Rome", end=True) == encode_pair(
        tok, "The capital of France is", "Rome")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


EDIT = EditRecord(prompt="Alice Moreau was born in", target="Tokyo", subject="Alice Moreau",
                  locality=[LocalityPair("The capital of France is", "", "other")])
FAST = {"lr": 0.02, "max_steps": 200, "retain": "none", "stop_prob": 0.0}


@pytest.mark.parametrize("eos_target", [True, False])
def test_trained_labels_end_with_eos_unless_turned_off(tiny_dir, monkeypatch, eos_target):
    import moecli.adapter.training as training

    seen = []
    real = training.collate

    def spy(items, pad):
        seen.extend(items)
        return real(items, pad)

    monkeypatch.setattr(training, "collate", spy)
    loaded = load_model(tiny_dir)
    MEMoE(loaded, MEMoEConfig(**{**FAST, "max_steps": 1}, eos_target=eos_target), seed=0).apply_batch([EDIT], 0)
    target = encode_pair(loaded.tokenizer, EDIT.prompt, EDIT.target).answer_ids
    assert [it.answer_ids for it in seen] == [[*target, EOS_ID] if eos_target else target]


@pytest.mark.parametrize("eos_target", [True, False])
def test_an_edit_trained_with_eos_answers_and_stops(tiny_dir, eos_target):
    loaded = load_model(tiny_dir)
    model, tok = loaded.model, loaded.tokenizer
    base = compute_baseline(model, tok, [EDIT], generation=True)
    stats = MEMoE(loaded, MEMoEConfig(**FAST, eos_target=eos_target), seed=0).apply_batch([EDIT], 0)
    assert stats["all_correct"]
    answer = free_answers(model, tok, [EDIT.prompt])[0]
    report = evaluate_records(model, tok, [EDIT], base, generation=True)
    s = report.summary
    assert s["rel"] == 1.0 and s["rel_em"] == 1.0  # the target itself is said either way (teacher-forced, EM)
    assert answer.startswith("Tokyo") and report.per_edit[0]["rel_free_answer"] == answer
    assert s["loc_free"] == 1.0  # the unrelated prompt reaches no expert: its free answer is the unedited one
    if eos_target:
        assert answer == "Tokyo" and s["rel_free_exact"] == 1.0 and s["rel_free_first"] == 1.0
    else:  # the random model goes on after the target (here without a space: not even `first`)
        assert answer != "Tokyo" and s["rel_free_exact"] == 0.0
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        assert EOS_ID not in ids and BOS_ID not in ids


def test_free_answers_stop_at_most_after_the_token_budget(tiny_dir):
    loaded = load_model(tiny_dir)
    prompts = ["The capital of France is", "Shakespeare wrote", "Water boils at"]
    from moecli.engine.evaluation import generate_ids

    ids = generate_ids(loaded.model, loaded.tokenizer, prompts, [FREE_NEW_TOKENS] * 3, batch_size=2,
                       stop_ids=stop_token_ids(loaded.tokenizer, loaded.model))
    assert all(len(row) <= FREE_NEW_TOKENS and EOS_ID not in row for row in ids)
    one_by_one = [free_answers(loaded.model, loaded.tokenizer, [p])[0] for p in prompts]
    assert free_answers(loaded.model, loaded.tokenizer, prompts, batch_size=2) == one_by_one  # left padding
    assert one_by_one == [loaded.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def test_an_editing_command_reports_the_free_metrics(tiny_dir, tmp_path, capsys):
    data = tmp_path / "edits.jsonl"
    write_jsonl([EditRecord(prompt="Alice Moreau was born in", target="Tokyo", subject="Alice Moreau",
                            rephrases=["Where was Alice Moreau born?"],
                            locality=[LocalityPair("The capital of France is", "Paris", "other")])], data)
    sets = ["--set", "max_steps=200", "--set", "lr=0.02", "--set", "retain=none", "--set", "stop_prob=0"]
    code, out, _ = run_moecli(["batch-edit", "--model", str(tiny_dir), "--data", str(data), "--batch-size", "1",
                               "--method", "memoe", "--out", str(tmp_path / "on"), "--json", *sets], capsys)
    assert code == 0
    summary = json.loads(out)
    free = ("rel_free_exact", "rel_free_clause", "rel_free_first", "gen_free_exact", "gen_free_clause",
            "gen_free_first", "loc_free")
    assert all(summary.get(k) is not None for k in free), summary
    assert summary["rel_free_exact"] == 1.0 and summary["loc_free"] == 1.0
    report = json.loads((tmp_path / "on" / "report.json").read_text())
    assert report["columns"]["before"]["loc_free"] == 1.0 and report["config"]["eos_target"] is True
    md = (tmp_path / "on" / "report.md").read_text()
    assert "| Rel free exact |" in md and "| Loc free |" in md
    code, out, _ = run_moecli(["batch-edit", "--model", str(tiny_dir), "--data", str(data), "--batch-size", "1",
                               "--method", "memoe", "--out", str(tmp_path / "off"), "--json", *sets,
                               "--set", "eos_target=false"], capsys)
    assert code == 0
    off = json.loads(out)
    assert off["rel"] == 1.0 and off["rel_free_exact"] == 0.0
    assert json.loads((tmp_path / "off" / "report.json").read_text())["config"]["eos_target"] is False


def test_generation_batches_group_their_rows_first(tiny_dir):
    """`groups` batches prompts within their group (routed rows apart from the rest, so a batch of rows that
    stop after the answer is not held to the token bound by one that runs on); the answers do not change."""
    loaded = load_model(tiny_dir)
    prompts = ["The capital of France is", "Shakespeare wrote", "Water boils at", "The Eiffel Tower is in"]
    from moecli.engine.evaluation import encode_prompt, generate_ids

    batches: list[list[int]] = []
    real = loaded.model.generate

    def generate(*args, **kwargs):
        batches.append(kwargs["attention_mask"].sum(-1).tolist())
        return real(*args, **kwargs)

    loaded.model.generate = generate
    stops = stop_token_ids(loaded.tokenizer, loaded.model)
    grouped = generate_ids(loaded.model, loaded.tokenizer, prompts, [4] * 4, batch_size=2, stop_ids=stops,
                           groups=[1, 0, 1, 0])
    lengths = [len(encode_prompt(loaded.tokenizer, p)) for p in prompts]
    assert [sorted(b) for b in batches] == [sorted([lengths[1], lengths[3]]), sorted([lengths[0], lengths[2]])]
    assert grouped == [generate_ids(loaded.model, loaded.tokenizer, [p], [4], stop_ids=stops)[0] for p in prompts]
