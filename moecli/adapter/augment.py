"""Text the unedited model writes itself, for training: random prefixes put before an edit prompt (ROME's
context templates) and short unrelated texts.

Why: an edit trained on its prompt alone learns to turn that one context into the new answer. Behind a
prefix the same question reaches the edited layer with another residual stream, as a rephrasing does; trained
on both, the edit holds in contexts it was not trained on. The texts come from the model being edited, sampled
from its top-5 next tokens (ROME's `generate_fast`), seeded, so a run is reproducible and no data is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from moecli.model.batching import collate, forward, pad_id_of, prompt_only
from moecli.model.loading import LoadedModel

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")  # [ROME/EasyEdit context templates]
PREFIX_LENGTHS = (5, 10)  # tokens; one prefix per start and length [ROME: length_params [[5, 5], [10, 5]]]
TOP_K_SAMPLING = 5  # [ROME generate_fast] sample the next token from the 5 most likely
MAX_PREFIXES = len(PREFIX_STARTS) * len(PREFIX_LENGTHS)


def sample_text(loaded: LoadedModel, start: str, tokens: int, generator: torch.Generator,
                unedited: Callable[[], AbstractContextManager]) -> str:
    """`start` continued by `tokens` tokens sampled from the unedited model's top 5 (inside `unedited()`)."""
    tok, model = loaded.tokenizer, loaded.model
    item = prompt_only(tok, start)
    n0 = len(item.ids)
    with unedited():
        for _ in range(tokens):
            batch = collate([item], pad_id_of(tok)).to(loaded.device)
            logits = forward(model, batch)[0, -1].float().cpu()
            top = torch.topk(logits, TOP_K_SAMPLING)
            pick = torch.multinomial(top.values.softmax(-1), 1, generator=generator)
            item.ids.append(int(top.indices[pick]))
    return start + tok.decode(item.ids[n0:], skip_special_tokens=True)


def context_prefixes(loaded: LoadedModel, n: int, generator: torch.Generator,
                     unedited: Callable[[], AbstractContextManager]) -> list[str]:
    """`n` (at most `MAX_PREFIXES`) prefixes, each ending in ". " so that the prompt after it starts a sentence
    ([ROME] "{prefix}. {prompt}", braces taken out of the generated text)."""
    texts = [sample_text(loaded, s, k, generator, unedited) for k in PREFIX_LENGTHS for s in PREFIX_STARTS]
    return [t.replace("{", " ").replace("}", " ").strip() + ". " for t in texts][:n]
