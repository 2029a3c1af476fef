"""Tests of moecli.model.batching: the answer-token convention, padding and the masked loss.

The convention (EVALUATION.md): the answer tokens are the tokens of `prompt + " " + answer` beyond
the tokens of `prompt` alone. Training and every metric rely on it, so it is checked on a
tokenizer with BOS (the tiny llama's), on GPT-2-like ones without BOS, and on one that appends EOS.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors
from transformers import AutoTokenizer

from moecli.model.batching import (
    Batch,
    EncodedPair,
    collate,
    encode_pair,
    encode_prompt,
    pad_id_of,
)
from moecli.model.tiny import BOS_ID, EOS_ID, PAD_ID, TINY_TEXTS, make_tiny_model
from moecli.model.tokenizer import train_tokenizer

PAIRS = [
    ("The capital of France is", "Paris"),
    ("Marie Curie was born in", "Warsaw"),
    ("The Statue of Liberty is located in", "New York"),
    ("Shakespeare wrote", "Hamlet"),
    ("The currency of Japan is", "the yen"),
    ("What is the capital of Zorvia?", "Keltrim"),
    ("The mother tongue of Dante is", "Zzyzx-Quorble 42"),  # unseen word: many byte tokens
]


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory: pytest.TempPathFactory):
    """The tiny llama's tokenizer as saved and reloaded (LLaMA-style: prepends <s>)."""
    path = make_tiny_model("llama", tmp_path_factory.mktemp("llama"), num_layers=1)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def gpt2_tok(tmp_path_factory: pytest.TempPathFactory):
    """The tiny gpt2's tokenizer as saved and reloaded."""
    path = make_tiny_model("gpt2", tmp_path_factory.mktemp("gpt2"), num_layers=1)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def nobos_tok():
    """A GPT-2-like byte-level tokenizer: no BOS, leading-space word tokens."""
    return train_tokenizer(TINY_TEXTS, vocab_size=512, add_bos=False)


@pytest.fixture(scope="module")
def eos_tok():
    """A tokenizer that appends </s> to every encoding (as some T5/BLOOM-style ones do)."""
    tok = train_tokenizer(TINY_TEXTS, vocab_size=512)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
    )
    assert tok("Paris")["input_ids"][-1] == EOS_ID  # the fixture really appends EOS
    return tok


def _check_convention(tok, prompt: str, answer: str) -> EncodedPair:
    enc = encode_pair(tok, prompt, answer)
    p_ids = tok(prompt)["input_ids"]
    full = tok(prompt + " " + answer)["input_ids"]
    assert enc.ids == full
    assert enc.answer_start == len(p_ids)
    assert enc.ids[: enc.answer_start] == p_ids
    assert enc.answer_ids == full[len(p_ids) :]
    assert len(enc.answer_ids) >= 1
    # Byte-level tokens keep the separating space: the answer decodes to " " + answer.
    assert tok.decode(enc.answer_ids) == " " + answer
    return enc


@pytest.mark.parametrize("prompt,answer", PAIRS)
def test_encode_pair_with_bos(llama_tok, prompt: str, answer: str) -> None:
    assert llama_tok.bos_token_id == BOS_ID
    enc = _check_convention(llama_tok, prompt, answer)
    assert enc.ids[0] == BOS_ID
    assert enc.ids.count(BOS_ID) == 1
    assert EOS_ID not in enc.ids


@pytest.mark.parametrize("prompt,answer", PAIRS)
def test_encode_pair_without_bos(nobos_tok, prompt: str, answer: str) -> None:
    assert BOS_ID not in nobos_tok(prompt)["input_ids"]
    enc = _check_convention(nobos_tok, prompt, answer)
    assert enc.ids[0] != BOS_ID
    # The first answer token carries the leading space, GPT-2 style.
    assert nobos_tok.decode(enc.answer_ids[:1]).startswith(" ")


@pytest.mark.parametrize("prompt,answer", PAIRS[:3])
def test_encode_pair_tiny_gpt2_tokenizer(gpt2_tok, prompt: str, answer: str) -> None:
    _check_convention(gpt2_tok, prompt, answer)


def test_answer_is_stripped_before_joining(llama_tok) -> None:
    assert encode_pair(llama_tok, "Shakespeare wrote", "  Hamlet \n") == encode_pair(
        llama_tok, "Shakespeare wrote", "Hamlet"
    )


def test_single_word_prompt_without_bos_never_starts_at_zero(nobos_tok) -> None:
    # The first position has no prediction, so the answer can never start there.
    for prompt in ("Water", "A", "Q:"):
        enc = encode_pair(nobos_tok, prompt, "London")
        assert enc.answer_start >= 1
        assert enc.answer_ids == nobos_tok(prompt + " London")["input_ids"][enc.answer_start :]


def test_empty_answer_scores_the_last_token(llama_tok) -> None:
    enc = encode_pair(llama_tok, "Shakespeare wrote", "")
    assert enc.answer_start == len(enc.ids) - 1
    assert len(enc.answer_ids) == 1


@pytest.mark.parametrize("prompt,answer", PAIRS)
def test_trailing_eos_is_stripped(eos_tok, llama_tok, prompt: str, answer: str) -> None:
    enc = encode_pair(eos_tok, prompt, answer)
    assert enc.ids[-1] != EOS_ID
    assert EOS_ID not in enc.answer_ids
    # Same ids as the tokenizer that never appended EOS.
    assert enc == encode_pair(llama_tok, prompt, answer)
    assert encode_prompt(eos_tok, prompt) == llama_tok(prompt)["input_ids"]


def test_encode_prompt_matches_prompt_part_of_pair(llama_tok, nobos_tok) -> None:
    for tok in (llama_tok, nobos_tok):
        for prompt, answer in PAIRS:
            enc = encode_pair(tok, prompt, answer)
            assert encode_prompt(tok, prompt) == enc.ids[: enc.answer_start]


def test_collate_right_pads_and_masks_labels() -> None:
    items = [
        EncodedPair(ids=[1, 10, 11, 12, 13], answer_start=3),
        EncodedPair(ids=[1, 20, 21], answer_start=2),
        EncodedPair(ids=[1, 30, 31, 32, 33, 34, 35], answer_start=4),
    ]
    batch = collate(items, pad_id=PAD_ID)
    assert isinstance(batch, Batch)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.labels.shape == (3, 7)
    assert batch.input_ids.dtype == batch.labels.dtype == torch.long
    assert batch.input_ids.tolist() == [
        [1, 10, 11, 12, 13, 0, 0],
        [1, 20, 21, 0, 0, 0, 0],
        [1, 30, 31, 32, 33, 34, 35],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert batch.labels.tolist() == [
        [-100, -100, -100, 12, 13, -100, -100],
        [-100, -100, 21, -100, -100, -100, -100],
        [-100, -100, -100, -100, 33, 34, 35],
    ]


def test_collate_uses_the_given_pad_id_whatever_the_padding_side(llama_tok) -> None:
    encoded = [encode_pair(llama_tok, p, a) for p, a in PAIRS]
    for side in ("left", "right"):
        llama_tok.padding_side = side
        batch = collate(encoded, pad_id=pad_id_of(llama_tok))
        for row, enc in enumerate(encoded):
            n = len(enc.ids)
            assert batch.input_ids[row, :n].tolist() == enc.ids  # always right-padded
            assert (batch.input_ids[row, n:] == PAD_ID).all()
            assert batch.attention_mask[row].sum().item() == n
            answer_mask = batch.labels[row] != -100
            assert batch.labels[row][answer_mask].tolist() == enc.answer_ids
            assert answer_mask.nonzero().min().item() == enc.answer_start
    llama_tok.padding_side = "right"


def test_batch_to_device_keeps_tensors() -> None:
    batch = collate([EncodedPair([1, 2, 3], 2)], pad_id=0).to(torch.device("cpu"))
    assert batch.labels.tolist() == [[-100, -100, 3]]


def test_pad_id_of_falls_back_to_eos_then_zero() -> None:
    class Tok:
        def __init__(self, pad, eos):
            self.pad_token_id, self.eos_token_id = pad, eos

    assert pad_id_of(Tok(5, 7)) == 5
    assert pad_id_of(Tok(None, 7)) == 7
    assert pad_id_of(Tok(None, None)) == 0



def test_end_to_end_labels_match_the_convention(llama_tok, nobos_tok) -> None:
    for tok in (llama_tok, nobos_tok):
        encoded = [encode_pair(tok, p, a) for p, a in PAIRS]
        batch = collate(encoded, pad_id_of(tok))
        for row, (_prompt, answer) in enumerate(PAIRS):
            got = batch.labels[row][batch.labels[row] != -100].tolist()
            assert tok.decode(got) == " " + answer
