"""The learned question key: `moecli calibrate` trains and calibrates it on train records, the key matcher
routes by it (`query_feature: learned`), the adapter keeps a copy, and bad files are refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import run_moecli

from moecli.adapter.training import FrozenPrefix
from moecli.data.records import EditRecord, LocalityPair
from moecli.errors import UserError
from moecli.model.loading import decoder_layers, load_model
from moecli.model.tiny import make_tiny_model
from moecli.routing import sentence
from moecli.routing.question import QuestionEncoder, calibration_pairs, find_encoder, question_text, train_encoder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Fact-world records: 40 to calibrate on, 4 others to edit."""
    root = tmp_path_factory.mktemp("question")
    old = os.getcwd()
    os.chdir(root)
    try:
        from moecli.cli.app import main

        try:
            main(["world", "export", "--n", "44", "--out", "all.jsonl"])
        except SystemExit as exc:
            assert not exc.code
        lines = (root / "all.jsonl").read_text().splitlines()
        (root / "train.jsonl").write_text("\n".join(lines[:40]) + "\n")
        (root / "edit.jsonl").write_text("\n".join(lines[40:]) + "\n")
        yield root
    finally:
        os.chdir(old)


def test_calibrate_then_route_by_the_codes_and_keep_them_in_the_adapter(world, capsys):
    code, out, err = run_moecli(["calibrate", "--data", str(world / "train.jsonl"), "--out",
                                 str(world / "q.safetensors"), "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["records"] == 40 and min(info["layers"]) >= 0 and 0 <= info["false_match_rate"] <= 0.05
    assert -1.0 <= info["threshold"] <= 1.0 and "auc" in info and info["text_dim"] == sentence.DIM
    code, out, err = run_moecli(["batch-edit", "--data", str(world / "edit.jsonl"), "--batch-size", "4", "--out",
                                 str(world / "run"), "--no-generate", "--json", "--set", "query_feature=learned",
                                 "--set", f"question_encoder={world / 'q.safetensors'}"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["rel"] == 1.0 and summary["routing"]["rel_own"] == 1.0  # each edit prompt reaches its edit
    (world / "q.safetensors").rename(world / "moved.safetensors")  # the adapter needs no file to route
    try:
        code, out, err = run_moecli(["evaluate", "--adapter", str(world / "run"), "--data", str(world / "edit.jsonl"),
                                     "--no-generate", "--json"], capsys)
    finally:
        (world / "moved.safetensors").rename(world / "q.safetensors")
    assert code == 0, err
    again = json.loads(out)
    assert again["rel"] == summary["rel"] and again["routing"]["rel_own"] == 1.0


def test_an_installed_encoder_is_the_default_key_for_its_model_only(world, tmp_path, monkeypatch, capsys):
    """`calibrate --install` puts the encoder where `query_feature: auto` (the default) finds it by the model's
    fingerprint: edits of that model route by it; another model keeps the answer-distribution test."""
    monkeypatch.setenv("MOECLI_CACHE", str(tmp_path / "cache"))
    code, out, err = run_moecli(["calibrate", "--data", str(world / "train.jsonl"), "--out", str(tmp_path / "q"),
                                 "--install", "--json"], capsys)
    assert code == 0, err
    installed = json.loads(out)["installed"]
    assert os.path.isfile(installed) and installed.startswith(str(tmp_path / "cache"))
    code, out, err = run_moecli(["batch-edit", "--data", str(world / "edit.jsonl"), "--batch-size", "4", "--out",
                                 str(tmp_path / "run"), "--no-generate", "--json"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert config["query_feature"] == "learned" and config["question_encoder"] == installed
    assert json.loads(out)["routing"]["rel_own"] == 1.0
    other = load_model(make_tiny_model("llama", tmp_path / "other"))
    from moecli.methods.memoe import MEMoE, MEMoEConfig

    method = MEMoE(other, MEMoEConfig(), seed=0)
    assert method.config.query_feature == "output" and method.question is None


def test_a_new_edit_without_the_encoder_file_is_refused(world, capsys):
    code, _, err = run_moecli(["batch-edit", "--data", str(world / "edit.jsonl"), "--out", str(world / "none"),
                               "--no-generate", "--set", "query_feature=learned"], capsys)
    assert code == 2 and "question_encoder" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_encoder_files_and_options_are_one_line_errors(world, tmp_path, capsys):
    damaged = tmp_path / "bad.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a moecli question encoder"):
        QuestionEncoder.load(damaged)
    with pytest.raises(UserError, match="no such file"):
        QuestionEncoder.load(tmp_path / "missing.safetensors")
    enc = QuestionEncoder((0, 1), torch.randn(8, 4), torch.zeros(32), 0.5, {"model": "x"}, torch.randn(4, 32),
                          torch.randn(4))
    enc.save(tmp_path / "narrow.safetensors")
    with pytest.raises(UserError, match="width 16"):
        QuestionEncoder.load(tmp_path / "narrow.safetensors", d_model=32)
    back = QuestionEncoder.load(tmp_path / "narrow.safetensors")
    assert torch.equal(back.weight, enc.weight) and torch.equal(back.w1, enc.w1) and back.layers == (0, 1)
    assert back.info == {"model": "x"} and back.layer == 1
    h = torch.randn(3, 32)
    assert torch.allclose(back.encode(h), enc.encode(h))
    code, _, err = run_moecli(["calibrate", "--data", str(world / "train.jsonl"), "--out", str(tmp_path / "o"),
                               "--records", "1:2:3"], capsys)
    assert code == 2 and "--records" in err and "Traceback" not in err


@pytest.mark.parametrize("hidden", [0, 32])
def test_training_separates_the_pairs_it_is_given(hidden):
    """Synthetic features: same-question pairs share a direction, other questions do not; held-out AUC ≈ 1
    (linear map and one hidden layer)."""
    g = torch.Generator().manual_seed(0)
    relations = torch.randn(6, 32, generator=g)
    feats, pairs = [], []
    for r in range(60):
        rel, other = r % 6, (r + 1 + r % 5) % 6
        subject = torch.randn(32, generator=g)
        base = len(feats)
        feats += [relations[rel] + subject, relations[rel] + subject + 0.1 * torch.randn(32, generator=g),
                  relations[other] + subject]
        pairs += [(base, base + 1, "rephrase"), (base, base + 2, "other")]
    held = {3 * i for i in range(0, 60, 5)}
    _, metrics = train_encoder(torch.stack(feats), pairs, held, dim=8, hidden=hidden, steps=200)
    assert metrics["auc"] > 0.95 and metrics["recall_at_threshold"] > 0.5
    # a stricter rate sets a higher threshold, and the reported curve loses rephrasings with it
    _, lenient = train_encoder(torch.stack(feats), pairs, held, dim=8, hidden=hidden, steps=200,
                               false_match_rate=0.3)
    assert lenient["threshold"] < metrics["threshold"] and lenient["false_match_rate"] > metrics["false_match_rate"]
    curve = [metrics["recall_at_rate"][k] for k in sorted(metrics["recall_at_rate"], key=float)]
    assert curve == sorted(curve) and lenient["recall_at_rate"] == metrics["recall_at_rate"]


def test_calibration_pairs_label_rephrasings_neighbours_and_other_questions():
    rec = EditRecord(prompt="The mother tongue of Ann is", target="Dutch", subject="Ann",
                     rephrases=["Ann speaks"], locality=[LocalityPair("Bo speaks", "French", "neighborhood"),
                                                          LocalityPair("Ann works for", "", "same_subject"),
                                                          LocalityPair("nq question: who?", "x", "nq")])
    prompts, pairs, subjects = calibration_pairs([rec])
    assert prompts == ["The mother tongue of Ann is", "Ann speaks", "Bo speaks", "Ann works for"]
    assert [p[2] for p in pairs] == ["rephrase", "neighbour", "other"]
    assert subjects == ["Ann", "Ann", None, "Ann"]  # a neighbour names another subject, not known here


def test_replayed_layers_still_run_their_hooks_with_their_own_output(tmp_path):
    loaded = load_model(make_tiny_model("llama", tmp_path / "m"))
    layers = decoder_layers(loaded.model)
    seen = []
    handle = layers[1].register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple)
                                                                            else out).clone()))
    param = next(layers[3].parameters())
    ids = torch.tensor([[1, 5, 7, 9]])
    try:
        with FrozenPrefix(loaded.model, [param]) as prefix:
            for _ in range(2):
                with prefix.batch(0), torch.no_grad():
                    loaded.model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


NEEDS_MINILM = pytest.mark.skipif(not sentence.available(), reason="needs the MiniLM package (make install has it)")


def test_routing_reads_the_same_skeleton_text_that_calibration_embeds(tmp_path):
    """The text part of the key: at routing time the prompt is decoded around the entity span the router
    found; calibration blanks the subject in the string. Both must give MiniLM the same text (whitespace
    aside: its tokenizer splits on it), or the calibrated threshold would not hold at inference."""
    from moecli.data.probes import BLANK, skeleton
    from moecli.routing.anchors import AnchorTrie
    from moecli.routing.context import AnchorContext

    loaded = load_model(make_tiny_model("llama", tmp_path / "m"))
    tok = loaded.tokenizer
    subject = "Danielle Darrieux"
    trie = AnchorTrie()
    trie.add(tok(" " + subject, add_special_tokens=False)["input_ids"])
    ctx = AnchorContext(trie=trie, skip_token_ids={t for t in (tok.bos_token_id, tok.pad_token_id) if t is not None},
                        decode=tok.decode)
    prompts = ["Shayna goes home. The mother tongue of Danielle Darrieux is", "Where is Danielle Darrieux from?",
               "Nothing named here at all"]
    enc = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, enc))
    ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    ctx.compute(loaded.model.get_input_embeddings(), ids, mask)
    got = ctx.skeletons()
    want = [skeleton(p, subject) or p for p in prompts]
    assert [question_text(g) for g in got] == [question_text(w) for w in want]
    assert question_text(got[0]) == "The mother tongue of is" and question_text(got[2]) == prompts[2]
    assert BLANK in got[0] and BLANK not in got[2]


def test_an_encoder_that_reads_text_keeps_its_width_and_is_passed_over_without_minilm(tmp_path, monkeypatch):
    """`text_dim` travels with the tensors (the adapter's copy), `d_model` excludes it, and `find_encoder`
    takes a text encoder only when MiniLM can run, else the model's layers-only one."""
    enc = QuestionEncoder((0, 1), torch.randn(8, 32 + 384), torch.zeros(32 + 384), 0.5, {}, text_dim=384)
    back = QuestionEncoder.from_tensors(enc.tensors("question."), "question.")
    assert back.text_dim == 384 and back.d_model == 16
    h = torch.randn(3, 32 + 384)
    assert torch.allclose(back.encode(h), enc.encode(h))
    assert not torch.allclose(enc.encode(h), enc.encode(torch.cat([h[:, :32], torch.randn(3, 384)], 1)))
    loaded = load_model(make_tiny_model("llama", tmp_path / "m"))
    monkeypatch.setenv("MOECLI_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "questions"
    folder.mkdir(parents=True)
    from moecli.model.loading import fingerprint

    info = {"fingerprint": fingerprint(loaded.model)}
    QuestionEncoder((0,), torch.randn(8, 32), torch.zeros(32), 0.5, info).save(folder / "b-layers.safetensors")
    QuestionEncoder((0,), torch.randn(8, 32 + 384), torch.zeros(32 + 384), 0.5, info | {"text_dim": 384},
                    text_dim=384).save(folder / "a-text.safetensors")
    monkeypatch.setattr(sentence, "available", lambda: True)
    assert find_encoder(loaded.model).name == "a-text.safetensors"
    monkeypatch.setattr(sentence, "available", lambda: False)
    assert find_encoder(loaded.model).name == "b-layers.safetensors"


@NEEDS_MINILM
def test_the_text_part_is_computed_only_when_a_router_reads_it(tmp_path):
    """Capture with `text`: a forward leaves the MiniLM part pending (inputs that name no edited entity never
    pay for it); reading `question_hidden` gives the layers then the 384 text features."""
    from moecli.routing.context import AnchorContext
    from moecli.routing.question import Capture

    loaded = load_model(make_tiny_model("llama", tmp_path / "m"))
    tok = loaded.tokenizer
    ctx = AnchorContext(decode=tok.decode, skip_token_ids={t for t in (tok.bos_token_id, tok.pad_token_id)
                                                           if t is not None})
    cap = Capture(loaded.model, (0, 1), ctx, text=True)
    ids = torch.tensor([tok("Where is Paris?")["input_ids"]])
    try:
        ctx.compute(loaded.model.get_input_embeddings(), ids, torch.ones_like(ids))
        loaded.model(input_ids=ids)
    finally:
        cap.remove()
    assert ctx.pending_question is not None
    d = loaded.model.get_input_embeddings().weight.shape[1]
    hidden = ctx.question_hidden
    assert hidden.shape == (1, 2 * d + sentence.DIM) and ctx.pending_question is None
    from moecli.routing.sentence import embed_texts

    assert torch.allclose(hidden[:, 2 * d:], embed_texts(["Where is Paris?"]), atol=1e-5)


def test_calibrate_with_text_needs_minilm_and_says_so(world, monkeypatch, capsys):
    monkeypatch.setattr(sentence, "available", lambda: False)
    code, _, err = run_moecli(["calibrate", "--data", str(world / "train.jsonl"), "--out", str(world / "t"),
                               "--json"], capsys)
    assert code == 2 and "--no-text" in err and "Traceback" not in err and not (world / "t").exists()
