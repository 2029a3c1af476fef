"""Prompt/answer encoding and padding, shared by training and evaluation.

Why one place: the edit loss (training) and every metric (evaluation) must agree on which tokens
are "the answer". The convention: the text is `prompt + " " + answer`; the answer
tokens are the tokens of that text beyond the tokens of `prompt` alone. We pad on the right
ourselves, whatever the tokenizer's padding side, so positions are the natural ones for every model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moecli.errors import UserError
from moecli.model.feed import feeding


@dataclass
class EncodedPair:
    """Token ids of `prompt + " " + answer` and the index of the first answer token."""

    ids: list[int]
    answer_start: int

    @property
    def answer_ids(self) -> list[int]:
        return self.ids[self.answer_start :]


def _strip_trailing_eos(ids: list[int], eos_id: int | None, bos_id: int | None) -> list[int]:
    # Some tokenizers append EOS to every encoding; an answer must not end with a stray EOS.
    if eos_id is not None and eos_id != bos_id and len(ids) > 1 and ids[-1] == eos_id:
        return ids[:-1]
    return ids


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as the user turn of the model's chat template, ready for the assistant's answer.

    A template that starts with the BOS token the tokenizer adds by itself loses that text copy, so the
    sequence holds one BOS, not two.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat: this model's tokenizer has no chat template; drop --chat")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def chat_records(records: list, tokenizer) -> list:
    """Records with every prompt (edit, rephrases, locality, portability) in the chat template; the
    subject is still a substring of the prompt, so anchors are found as before."""
    import dataclasses

    def wrap(pairs):
        return [dataclasses.replace(p, prompt=chat_prompt(tokenizer, p.prompt)) for p in pairs]

    return [dataclasses.replace(r, prompt=chat_prompt(tokenizer, r.prompt),
                                rephrases=[chat_prompt(tokenizer, q) for q in r.rephrases],
                                locality=wrap(r.locality), portability=wrap(r.portability)) for r in records]


def encode_pair(tokenizer, prompt: str, answer: str, end: bool = False) -> EncodedPair:
    """Encode one (prompt, answer) pair with the answer-token convention above.

    When the tokenizer merges across the prompt/answer boundary, the answer starts at the first
    token where the two encodings differ (never at position 0, which has no prediction). A prompt
    that already ends in white space (a chat template's "assistant\n") gets no extra space.
    `end`: the answer is followed by the token that ends it (`answer_end_id`: the end-of-turn token
    after a chat prompt, else the end-of-sequence token), so that a model trained on the pair answers
    and stops; a tokenizer with neither adds nothing. The metrics never set it (their answer tokens
    are the answer's own).
    """
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    p_ids = _strip_trailing_eos(tokenizer(prompt)["input_ids"], eos, bos)
    sep = "" if prompt[-1:].isspace() else " "  # a prompt that ends in white space (a chat turn) has its separator
    full = _strip_trailing_eos(tokenizer(prompt + sep + answer.strip())["input_ids"], eos, bos)
    start = 0
    limit = min(len(p_ids), len(full))
    while start < limit and p_ids[start] == full[start]:
        start += 1
    start = max(start, 1)
    if start >= len(full):  # degenerate (empty answer): score the last token
        start = len(full) - 1
    stop = answer_end_id(tokenizer, prompt) if end else None
    if stop is not None:
        full = [*full, stop]
    return EncodedPair(ids=full, answer_start=start)


def _template_parts(tokenizer) -> tuple[str, int | None] | None:
    """(the text a chat prompt ends with, the id of the token that closes an assistant turn), read off the
    tokenizer's chat template once; None without a template (or one that cannot render a short exchange)."""
    cache = tokenizer.__dict__.setdefault("_moecli_template_parts", {})
    if "parts" in cache:
        return cache["parts"]
    parts = None
    if getattr(tokenizer, "chat_template", None):
        mark = "moecli7q"
        try:
            asked = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                                  add_generation_prompt=True)
            answered = tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}], tokenize=False)
        except Exception:  # a template that insists on other roles: no end-of-turn known
            asked = answered = ""
        if mark in asked and mark in answered:
            after = answered[answered.rindex(mark) + len(mark):]
            ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
            eot = ids[0] if ids and ids[0] in special else None
            parts = (asked[asked.rindex(mark) + len(mark):], eot)
    cache["parts"] = parts
    return parts


def end_of_turn_id(tokenizer) -> int | None:
    """The token that closes an assistant turn in the tokenizer's chat template (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`), None without a chat template."""
    parts = _template_parts(tokenizer)
    return parts[1] if parts else None


def is_chat_prompt(tokenizer, prompt: str) -> bool:
    """Whether `prompt` is a user turn in the chat template, ready for the answer (as `chat_prompt` makes)."""
    parts = _template_parts(tokenizer)
    return bool(parts and parts[0] and prompt.endswith(parts[0]))


def answer_end_id(tokenizer, prompt: str) -> int | None:
    """The token an answer to `prompt` ends with: the template's end-of-turn token after a chat prompt, else
    the tokenizer's end-of-sequence token; None when the tokenizer has neither."""
    if is_chat_prompt(tokenizer, prompt):
        eot = end_of_turn_id(tokenizer)
        if eot is not None:
            return eot
    eos = tokenizer.eos_token_id
    return int(eos) if eos is not None else None


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every token that ends a free answer: the tokenizer's end of sequence, the model's generation config's
    (an int or a list: Llama 3 stops at three), and the chat template's end of turn."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    config_eos = getattr(config, "eos_token_id", None)
    for tid in (tokenizer.eos_token_id, *(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]),
                end_of_turn_id(tokenizer)):
        if tid is not None and int(tid) not in ids:
            ids.append(int(tid))
    return ids


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt alone (for generation), without a trailing EOS."""
    return _strip_trailing_eos(
        tokenizer(prompt)["input_ids"], tokenizer.eos_token_id, tokenizer.bos_token_id
    )


def prompt_only(tokenizer, prompt: str) -> EncodedPair:
    """A prompt with no answer (every position is a prompt position), for retain sets and probes."""
    ids = encode_prompt(tokenizer, prompt)
    return EncodedPair(ids=ids, answer_start=len(ids))


@dataclass
class Batch:
    """A right-padded batch; `labels` hold answer token ids and -100 everywhere else."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_lengths: list[int]

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.prompt_lengths)


def forward(model, batch: Batch, **model_kwargs):
    """Run `model` on a batch, telling prompt-aware routers (SCEN) where each prompt ends.

    No KV cache is built unless `model_kwargs` ask for one: nothing here decodes further, and a cache
    would hold every layer's keys and values alive for nothing. `model_kwargs` override the batch's
    inputs (`training.PromptCache` feeds the later columns only, with the earlier ones cached)."""
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False,
              **model_kwargs}
    with feeding(prompt_lengths=batch.prompt_lengths):
        return model(**kwargs).logits


@contextmanager
def logits_at(model, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[None]:
    """Inside the block, `model`'s output projection runs only at positions (rows[i], cols[i]) and its
    logits come back packed, [1, N, vocab].

    Why: the vocabulary projection is the largest matrix of a small model (SmolLM2: 49,152 × 576, more
    than five of its decoder layers together) and the edit loss and every metric read it at a few
    answer positions only. A pre-hook on the projection module picks the rows of its input, so whatever
    the model does to its logits afterwards (Gemma's soft-capping) still happens, element-wise.
    """
    head = model.get_output_embeddings()
    if head is None:  # pragma: no cover - every supported family has one
        raise ValueError(f"{type(model).__name__} has no output embeddings to restrict")
    # Blocks nest (a forward may run the model again inside, as the base-output signature pass does):
    # the innermost block's selection applies, kept on the module itself.
    stack = head.__dict__.setdefault("_moecli_selections", [])
    selection = (rows, cols)
    stack.append(selection)

    def pick(_module, args):
        if stack[-1] is not selection:
            return None
        return (args[0][rows, cols].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()
        del stack[next(i for i, entry in enumerate(stack) if entry is selection)]


def answer_logits(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, vocab], answer tokens [N], row of each [N]) at the N positions that predict an answer
    token (the logits at t predict token t + 1), computed only there (`logits_at`)."""
    rows, cols = torch.nonzero(batch.labels[:, 1:] != -100, as_tuple=True)
    answers = batch.labels[rows, cols + 1]
    if getattr(model, "get_output_embeddings", lambda: None)() is None:  # no projection to restrict
        return forward(model, batch)[rows, cols], answers, rows
    with logits_at(model, rows, cols):
        logits = forward(model, batch)
    return logits.reshape(-1, logits.shape[-1]), answers, rows


def length_groups(items: list[EncodedPair], size: int) -> list[list[int]]:
    """Indices of `items`, shortest first, in chunks of `size`: a chunk padded to its longest wastes little
    (probing 1,600 prompts padded to the longest of them spent a third of the work on padding)."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    return [order[at : at + size] for at in range(0, len(order), size)]


def collate(items: list[EncodedPair], pad_id: int) -> Batch:
    """Right-pad encoded pairs into tensors (labels already aligned to the token positions)."""
    width = max(len(it.ids) for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.ids)
        input_ids[row, :n] = torch.tensor(it.ids, dtype=torch.long)
        attention[row, :n] = 1
        labels[row, it.answer_start : n] = torch.tensor(it.answer_ids, dtype=torch.long)
    return Batch(input_ids, attention, labels, [it.answer_start for it in items])


def pad_id_of(tokenizer) -> int:
    """The id used for padding: the pad token, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
