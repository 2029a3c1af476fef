"""Train a small byte-level BPE tokenizer locally, saved as a standard HF fast tokenizer.

Why byte-level: nothing can be downloaded here, so every model moecli builds (tiny test models,
the fact-world model, benchmark knowledge models) needs a tokenizer trained from its own text.
Byte-level BPE never produces an unknown token, so any edit target a user types is encodable, and
its leading-space tokens behave like GPT-2/LLaMA ones, which exercises the same answer-token
alignment code as real models.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, padding_side: str = "right", add_bos: bool = True
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a `PreTrainedTokenizerFast`.

    The tokenizer prepends `<s>` to every encoded sequence when `add_bos` (LLaMA-style), has a
    pad token, and round-trips through `save_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side=padding_side,
    )
