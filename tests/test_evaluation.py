"""Tests of moecli.engine.evaluation: the metrics of EVALUATION.md on models whose outputs the test controls.

A fake model reads the (teacher-forced) input ids and puts its logits where the test wants them:
the oracle predicts the next input token at every position (so every answer is right), the
anti-oracle predicts something else everywhere. Real tiny models are used only where the metric
needs a real forward pass (padding invariance) or `.generate` (generation exact match).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from moecli.data.records import EditRecord, LocalityPair, PortabilityPair
from moecli.engine.evaluation import (
    SUMMARY_KEYS,
    Baseline,
    answer_token_accuracy,
    compute_baseline,
    evaluate_records,
    generate_answers,
    normalize_answer,
    score_pairs,
    summarize,
)
from moecli.model.batching import encode_pair
from moecli.model.loading import load_model
from moecli.model.tiny import TINY_TEXTS, make_tiny_model
from moecli.model.tokenizer import train_tokenizer

CONFIDENCE = 10.0  # the logit the fake models give their chosen token (all others get 0)


class FakeLM(torch.nn.Module):
    """A causal LM stand-in: at position t it predicts `choose(input_ids)[t]`.

    `choose(ids) -> ids'` maps a (B, T) id tensor to the token each position predicts. The oracle
    predicts the next input token (ids[t+1]); teacher forcing feeds the answer, so that is exactly
    the answer token wherever one is scored.
    """

    def __init__(self, vocab: int, choose):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 4)
        self.vocab = vocab
        self.choose = choose
        self.calls: list[tuple[int, int]] = []

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.emb

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool = False):
        assert attention_mask is not None and attention_mask.shape == input_ids.shape
        self.calls.append(tuple(input_ids.shape))
        target = self.choose(input_ids) % self.vocab
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits.scatter_(-1, target.unsqueeze(-1), CONFIDENCE)
        return SimpleNamespace(logits=logits)


def next_token(ids: torch.Tensor) -> torch.Tensor:
    out = ids.clone()
    out[:, :-1] = ids[:, 1:]
    return out


def wrong_token(ids: torch.Tensor) -> torch.Tensor:
    return next_token(ids) + 1


def oracle(vocab: int) -> FakeLM:
    return FakeLM(vocab, next_token)


def anti_oracle(vocab: int) -> FakeLM:
    return FakeLM(vocab, wrong_token)


def rows_containing(marker: int, base, other):
    """Behave like `other` on rows whose ids contain `marker`, like `base` elsewhere."""

    def choose(ids: torch.Tensor) -> torch.Tensor:
        hit = (ids == marker).any(-1, keepdim=True)
        return torch.where(hit, other(ids), base(ids))

    return choose


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TINY_TEXTS, vocab_size=512)


@pytest.fixture(scope="module")
def vocab(tok) -> int:
    return len(tok)


def _records() -> list[EditRecord]:
    return [
        EditRecord(
            prompt="The capital of France is",
            target="Rome",
            subject="France",
            ground_truth="Paris",
            rephrases=["The capital of France is called", "What is the capital of France?"],
            locality=[
                LocalityPair("The capital of Japan is", "Tokyo", "same_relation"),
                LocalityPair("The official language of France is", "French", "same_subject"),
            ],
            portability=[PortabilityPair("The Eiffel Tower is located in", "Rome", "one_hop")],
        ),
        EditRecord(
            prompt="Shakespeare wrote",
            target="War and Peace",
            ground_truth="Hamlet",
            rephrases=["The author Shakespeare wrote"],
            locality=[LocalityPair("Tolstoy wrote", "War and Peace", "same_relation")],
        ),
        EditRecord(prompt="Water boils at", target="ten degrees"),  # no rephrase, locality, truth
    ]


def test_oracle_scores_everything_correct(tok, vocab) -> None:
    recs = _records()
    report = evaluate_records(oracle(vocab), tok, recs, generation=False)
    s = report.summary
    assert s["rel"] == 1.0 and s["gen"] == 1.0 and s["loc"] == 1.0 and s["port"] == 1.0
    assert s["rel_strict"] == 1.0 and s["gen_strict"] == 1.0 and s["loc_strict"] == 1.0
    assert s["port_strict"] == 1.0
    assert s["known"] == 1.0  # the oracle also "knows" every ground truth
    assert s["avg"] == 1.0
    assert s["n_edits"] == 3
    assert s["loc_by_group"] == {"same_relation": 1.0, "same_subject": 1.0}
    assert "rel_em" not in s  # generation=False
    assert "rel_ppl" not in s  # perplexity=False
    for key in SUMMARY_KEYS:
        assert key in s
    ids = [r["id"] for r in report.per_edit]
    assert ids == [r.id for r in recs]
    assert "gen" not in report.per_edit[2] and "loc" not in report.per_edit[2]  # nothing to score
    assert "port" not in report.per_edit[1] and "known" not in report.per_edit[2]


def test_anti_oracle_scores_zero_and_strict_zero(tok, vocab) -> None:
    recs = _records()
    base = compute_baseline(oracle(vocab), tok, recs)
    s = evaluate_records(anti_oracle(vocab), tok, recs, base, generation=False).summary
    assert s["rel"] == 0.0 and s["gen"] == 0.0 and s["port"] == 0.0
    assert s["rel_strict"] == 0.0 and s["gen_strict"] == 0.0
    assert s["loc"] == 0.0 and s["loc_strict"] == 0.0  # every locality argmax changed
    assert s["loc_by_group"] == {"same_relation": 0.0, "same_subject": 0.0}
    assert s["known"] == 1.0  # Known is the *baseline* model's accuracy on the old answer
    assert s["avg"] == 0.0


def test_partial_accuracy_is_token_fraction(tok, vocab) -> None:
    """A model right on exactly one of the answer tokens scores 1/n, strict 0."""
    rec = EditRecord(prompt="The capital of France is", target="New York")
    enc = encode_pair(tok, rec.prompt, rec.target)
    n = len(enc.answer_ids)
    first = enc.answer_ids[0]
    assert n >= 2 and enc.answer_ids.count(first) == 1

    def choose(ids: torch.Tensor) -> torch.Tensor:
        out = next_token(ids)
        return torch.where(out == first, out, out + 1)  # right only on the first answer token

    report = evaluate_records(FakeLM(vocab, choose), tok, [rec], generation=False)
    assert report.per_edit[0]["rel"] == pytest.approx(1 / n)
    assert report.per_edit[0]["rel_strict"] == 0.0
    assert answer_token_accuracy(FakeLM(vocab, choose), tok, [(rec.prompt, rec.target)]) == [pytest.approx(1 / n)]


def test_model_without_baseline_is_its_own_baseline(tok, vocab) -> None:
    s = evaluate_records(anti_oracle(vocab), tok, _records(), generation=False).summary
    assert s["loc"] == 1.0 and s["loc_strict"] == 1.0
    assert s["rel"] == 0.0
    assert s["known"] == 0.0


def test_locality_identical_model_gives_one(tok, vocab) -> None:
    recs = _records()
    for make in (oracle, anti_oracle):
        base = compute_baseline(make(vocab), tok, recs)
        s = evaluate_records(make(vocab), tok, recs, base, generation=False).summary
        assert s["loc"] == 1.0
        assert s["loc_by_group"] == {"same_relation": 1.0, "same_subject": 1.0}


def test_locality_per_group(tok, vocab) -> None:
    """Only rows containing ' language' change: the same_subject group drops, same_relation stays."""
    recs = _records()
    marker = tok(" language", add_special_tokens=False)["input_ids"]
    assert len(marker) == 1
    base = compute_baseline(oracle(vocab), tok, recs)
    edited = FakeLM(vocab, rows_containing(marker[0], next_token, wrong_token))
    s = evaluate_records(edited, tok, recs, base, generation=False).summary
    assert s["loc_by_group"] == {"same_relation": 1.0, "same_subject": 0.0}
    # Per edit: record 0 has one changed pair of two, record 1 none changed.
    per = evaluate_records(edited, tok, recs, base, generation=False).per_edit
    assert per[0]["loc"] == 0.5 and per[0]["loc_strict"] == 0.5
    assert per[0]["loc:same_subject"] == 0.0 and per[0]["loc:same_relation"] == 1.0
    assert per[1]["loc"] == 1.0
    assert s["loc"] == pytest.approx(0.75)  # mean over edits that have locality
    assert s["loc"] < 1.0
    assert s["rel"] == 1.0 and s["gen"] == 1.0


def test_locality_partial_change_within_answer(tok, vocab) -> None:
    """Loc measures the share of answer positions unchanged, not correctness."""
    rec = EditRecord(
        prompt="Shakespeare wrote",
        target="Hamlet",
        locality=[LocalityPair("Tolstoy wrote", "War and Peace", "g")],
    )
    enc = encode_pair(tok, "Tolstoy wrote", "War and Peace")
    n = len(enc.answer_ids)
    assert n >= 3
    last = enc.answer_ids[-1]
    base = compute_baseline(anti_oracle(vocab), tok, [rec])

    def choose(ids: torch.Tensor) -> torch.Tensor:
        # Like the anti-oracle, except that the position predicting the last answer token changes.
        nxt = next_token(ids)
        return torch.where(nxt == last, nxt + 2, nxt + 1)

    s = evaluate_records(FakeLM(vocab, choose), tok, [rec], base, generation=False).summary
    assert s["loc"] == pytest.approx((n - 1) / n)
    assert s["loc_strict"] == 0.0
    assert s["loc_by_group"] == {"g": pytest.approx((n - 1) / n)}


def test_portability_and_known_computed_when_present(tok, vocab) -> None:
    recs = _records()
    report = evaluate_records(oracle(vocab), tok, recs, generation=False)
    assert report.per_edit[0]["port"] == 1.0
    assert "port" not in report.per_edit[1] and "port" not in report.per_edit[2]
    assert report.per_edit[0]["known"] == 1.0 and report.per_edit[1]["known"] == 1.0
    assert "known" not in report.per_edit[2]

    bare = [EditRecord(prompt="Shakespeare wrote", target="Hamlet")]
    s = evaluate_records(oracle(vocab), tok, bare, generation=False).summary
    assert "port" not in s and "known" not in s and "loc_by_group" not in s
    assert s["gen"] is None and s["loc"] is None
    assert s["avg"] == 1.0  # the mean of what is present (Rel only)


def test_known_comes_from_the_baseline(tok, vocab) -> None:
    recs = _records()
    base = compute_baseline(anti_oracle(vocab), tok, recs)
    assert set(base.known) == {recs[0].id, recs[1].id}
    assert all(v == 0.0 for v in base.known.values())
    assert [len(p) for p in base.loc_preds.values()] == [2, 1, 0]
    s = evaluate_records(oracle(vocab), tok, recs, base, generation=False).summary
    assert s["known"] == 0.0 and s["rel"] == 1.0


def test_perplexity_option_gives_rel_ppl(tok, vocab) -> None:
    recs = _records()
    # With the oracle, each answer token has probability e^c / (e^c + V - 1).
    expected = (math.exp(CONFIDENCE) + vocab - 1) / math.exp(CONFIDENCE)
    report = evaluate_records(oracle(vocab), tok, recs, generation=False, perplexity=True)
    for row in report.per_edit:
        assert row["rel_ppl"] == pytest.approx(expected, rel=1e-4)
    assert report.summary["rel_ppl"] == pytest.approx(expected, rel=1e-4)
    assert "rel_nll" not in report.per_edit[0] and "rel_nll" not in report.summary

    worse = evaluate_records(anti_oracle(vocab), tok, recs, generation=False, perplexity=True)
    wrong = (math.exp(CONFIDENCE) + vocab - 1) / 1.0  # probability of the answer token is 1/(e^c+V-1)
    assert worse.summary["rel_ppl"] == pytest.approx(wrong, rel=1e-4)
    assert worse.summary["rel_ppl"] > report.summary["rel_ppl"]


def test_summarize_avg_is_mean_of_rel_gen_loc() -> None:
    per = [
        {
            "id": "a",
            "prompt": "p",
            "target": "t",
            "rel": 1.0,
            "gen": 0.5,
            "loc": 0.0,
            "port": 0.2,
            "loc:nq": 0.0,
            "rel_strict": 1.0,
        },
        {
            "id": "b",
            "prompt": "p",
            "target": "t",
            "rel": 0.0,
            "gen": None,
            "loc": 1.0,
            "loc:nq": 1.0,
            "loc:web": 0.5,
            "rel_strict": 0.0,
        },
    ]
    s = summarize(per)
    assert s["rel"] == 0.5
    assert s["gen"] == 0.5  # the edit without gen is left out of the mean
    assert s["loc"] == 0.5
    assert s["avg"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)
    assert s["port"] == pytest.approx(0.2)  # port is not part of Avg
    assert s["loc_by_group"] == {"nq": 0.5, "web": 0.5}
    assert not any(k.startswith("loc:") for k in s)
    assert s["n_edits"] == 2
    assert "id" not in s and "prompt" not in s and "target" not in s

    s2 = summarize([{"id": "a", "rel": 0.9, "gen": 0.6, "loc": 0.3}])
    assert s2["avg"] == pytest.approx(0.6)
    assert summarize([{"id": "a", "rel": 0.25}]) == {
        "rel": 0.25,
        "avg": 0.25,
        "gen": None,
        "loc": None,
        "n_edits": 1,
    }
    empty = summarize([])
    assert empty["n_edits"] == 0 and empty["avg"] is None and empty["rel"] is None


def test_score_pairs_batches_sorted_and_restores_order(tok, vocab) -> None:
    pairs = [(r.prompt, r.target) for r in _records()] + [("Shakespeare wrote", "Hamlet")]
    model = oracle(vocab)
    seen: list[tuple[str, int, int]] = []
    scored = score_pairs(model, tok, pairs, batch_size=2, progress=lambda *a: seen.append(a), stage="x")
    assert len(model.calls) == 2
    assert [s.answer for s in scored] == [encode_pair(tok, p, a).answer_ids for p, a in pairs]
    assert all(s.preds == s.answer and s.accuracy == 1.0 for s in scored)
    assert seen == [("x", 2, 4), ("x", 4, 4)]


def test_score_pairs_of_nothing(tok, vocab) -> None:
    assert score_pairs(oracle(vocab), tok, []) == []
    base = compute_baseline(oracle(vocab), tok, [])
    assert base == Baseline()


# ---------------------------------------------------------------- real tiny models


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=3, num_layers=2)
    return load_model(path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny_model("gpt2", tmp_path_factory.mktemp("gpt2"), seed=4, num_layers=2)
    return load_model(path, device="cpu", dtype="float32")


PAIRS = [
    ("The capital of France is", "Paris"),
    ("Marie Curie was born in", "Warsaw"),
    ("The Statue of Liberty is located in", "New York"),
    ("Shakespeare wrote", "Hamlet"),
    ("What is the capital of Zorvia?", "The capital of Zorvia is Keltrim"),
    ("Q:", "A"),
]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_padding_invariance(request: pytest.FixtureRequest, which: str, side: str) -> None:
    loaded = request.getfixturevalue(which)
    tok = loaded.tokenizer
    old = tok.padding_side
    tok.padding_side = side
    try:
        together = score_pairs(loaded.model, tok, PAIRS, batch_size=len(PAIRS))
        alone = [score_pairs(loaded.model, tok, [pair], batch_size=1)[0] for pair in PAIRS]
    finally:
        tok.padding_side = old
    for a, b in zip(together, alone):
        assert a.preds == b.preds
        assert a.answer == b.answer
        assert a.nll == pytest.approx(b.nll, rel=1e-4, abs=1e-5)


def test_real_model_metrics_are_in_range(tiny_llama) -> None:
    recs = _records()
    report = evaluate_records(tiny_llama.model, tiny_llama.tokenizer, recs, batch_size=3)
    s = report.summary
    for key in ("rel", "gen", "port", "known", "rel_strict", "rel_em", "gen_em"):
        assert 0.0 <= s[key] <= 1.0, key
    assert s["loc"] == 1.0  # its own baseline
    assert s["n_edits"] == 3


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_generate_answers_matches_greedy_decoding(request: pytest.FixtureRequest, which: str) -> None:
    loaded = request.getfixturevalue(which)
    model, tok = loaded.model, loaded.tokenizer
    texts = generate_answers(model, tok, PAIRS, batch_size=4)
    assert len(texts) == len(PAIRS) and all(isinstance(t, str) for t in texts)
    # One by one, without padding: greedy decode as many tokens as the reference answer has.
    for (prompt, answer), text in zip(PAIRS, texts):
        enc = encode_pair(tok, prompt, answer)
        ids = torch.tensor([enc.ids[: enc.answer_start]])
        for _ in range(len(enc.answer_ids)):
            with torch.no_grad():
                nxt = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        expected = tok.decode(ids[0, enc.answer_start :], skip_special_tokens=True)
        assert text == expected


def test_generation_em_uses_normalized_match(tok, vocab, monkeypatch: pytest.MonkeyPatch) -> None:
    import moecli.engine.evaluation as ev

    recs = [
        EditRecord(prompt="The capital of France is", target="The Paris!", rephrases=["France's capital:"]),
        EditRecord(prompt="Shakespeare wrote", target="Hamlet"),
    ]

    def fake_answers(model, tokenizer, pairs, batch_size=32, progress=None, groups=None):
        bounded = [" paris" if a == "The Paris!" and p == recs[0].prompt else " nope" for p, a in pairs]
        return bounded, ["x"] * len(pairs)

    monkeypatch.setattr(ev, "_answers", fake_answers)
    report = evaluate_records(oracle(vocab), tok, recs)
    assert report.per_edit[0]["rel_em"] == 1.0
    assert report.per_edit[0]["gen_em"] == 0.0
    assert report.per_edit[1]["rel_em"] == 0.0
    assert report.summary["rel_em"] == 0.5


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Paris", "paris"),
        ("  The   Eiffel Tower!  ", "eiffel tower"),
        ("An apple, a pear.", "apple pear"),
        ("the", ""),
        ("Theatre", "theatre"),  # an article inside a word stays
        ("New-York", "newyork"),
        ("", ""),
        ("Ünïcode Straße", "ünïcode straße"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_normalize_answer_makes_em_insensitive_to_case_articles_and_punctuation() -> None:
    assert normalize_answer(" the Paris.") == normalize_answer("Paris")
    assert normalize_answer("Paris") != normalize_answer("Parish")


def test_length_bounded_answers_are_the_free_answers_first_tokens(tmp_path) -> None:
    """One free generation gives both answers: the same as decoding as many tokens as the target has."""
    import moecli.engine.evaluation as ev
    from moecli.model.loading import load_model
    from moecli.model.tiny import make_tiny_model

    loaded = load_model(make_tiny_model("llama", tmp_path / "llama"))
    model, tok = loaded.model, loaded.tokenizer
    pairs = [("Alice Moreau was born in", "Tokyo"), ("Where was Bruno Keller born?", "the city of Lima and more"),
             ("x", "y z w"), ("The capital of France is", "Paris")]
    bounded, free = ev._answers(model, tok, pairs, 2, None)
    assert bounded == ev.generate_answers(model, tok, pairs, 2)
    assert free == ev.free_answers(model, tok, [p for p, _ in pairs], 2)
