"""What the caller of a forward pass knows about its input and the model cannot see: the one side channel.

A wrapped model is called through transformers (`model(...)`, `generate`), so the bypass cannot be handed
arguments of its own. Most forwards need none: the input is a batch of prompts, and the bypass's routing
context (`moecli.routing.context.AnchorContext`) derives everything from the tokens. Two callers feed
something else, and say so with `feeding(...)` around the call; the bypass's pre-forward hook reads
`current_feed()`:

- teacher-forced scoring and training feed `prompt + answer` at once: `prompt_lengths` says how many tokens
  of each row are the prompt, so that routing looks at the prompt only, as generation does;
- the training loop's prompt cache feeds each row from its own offset, the earlier columns sitting in a KV
  cache: `whole` is (the whole batch's input ids, its attention mask, offsets [B]), so anchors, routes and
  signature are those of the whole input.

Unset (the default), the whole unpadded input of the first forward is the prompt, as in generation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Feed:
    prompt_lengths: list[int] | None = None
    whole: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


_NOTHING = Feed()
_FEED: ContextVar[Feed] = ContextVar("moecli_feed", default=_NOTHING)  # noqa: B039 (frozen: never mutated)


def current_feed() -> Feed:
    return _FEED.get()


@contextmanager
def feeding(prompt_lengths: list[int] | None = None,
            whole: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> Iterator[None]:
    """Declare what the forwards run inside the block feed; a field left None keeps an enclosing block's."""
    now = _FEED.get()
    token = _FEED.set(replace(now, prompt_lengths=prompt_lengths if prompt_lengths is not None else now.prompt_lengths,
                              whole=whole if whole is not None else now.whole))
    try:
        yield
    finally:
        _FEED.reset(token)
