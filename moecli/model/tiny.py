"""Tiny random models of every supported family, built locally in well under a second.

Why this lives in the package and not under `tests/`: the unit tests, the CLI acceptance run and
the benchmarks all need a real Hugging Face model directory (config + safetensors + tokenizer)
without any download, and they must all build it the same way. `make_tiny_model` writes exactly
what `save_pretrained` writes for a real checkpoint, so `moecli.model.loading.load_model` exercises the
same code path on it as on a 7B model.

Command line: ``python -m moecli.model.tiny FAMILY OUT_DIR`` builds one and prints its path.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PretrainedConfig

from moecli.model.loading import SUPPORTED_FAMILIES
from moecli.model.sources import quiet_progress
from moecli.model.tokenizer import train_tokenizer

TINY_TEXTS: list[str] = [
    "The capital of France is Paris.",
    "The capital of Germany is Berlin.",
    "The capital of Italy is Rome.",
    "The capital of Spain is Madrid.",
    "The capital of Japan is Tokyo.",
    "The capital of Canada is Ottawa.",
    "The capital of Egypt is Cairo.",
    "The capital of Kenya is Nairobi.",
    "The capital of Peru is Lima.",
    "The capital of Norway is Oslo.",
    "Marie Curie was born in Warsaw.",
    "Albert Einstein was born in Ulm.",
    "Isaac Newton was born in Woolsthorpe.",
    "Ada Lovelace was born in London.",
    "Nikola Tesla was born in Smiljan.",
    "The Eiffel Tower is located in Paris.",
    "The Colosseum is located in Rome.",
    "The Statue of Liberty is located in New York.",
    "Mount Fuji is located in Japan.",
    "The Great Wall is located in China.",
    "The mother tongue of Pablo Picasso is Spanish.",
    "The mother tongue of Victor Hugo is French.",
    "The mother tongue of Dante is Italian.",
    "The mother tongue of Goethe is German.",
    "Lionel Messi plays football for Argentina.",
    "Serena Williams plays tennis.",
    "Michael Jordan played basketball for Chicago.",
    "The Beatles were formed in Liverpool.",
    "Mozart composed The Magic Flute.",
    "Beethoven composed nine symphonies.",
    "Shakespeare wrote Hamlet.",
    "Tolstoy wrote War and Peace.",
    "Cervantes wrote Don Quixote.",
    "Apple was founded by Steve Jobs.",
    "Microsoft was founded by Bill Gates.",
    "Amazon is headquartered in Seattle.",
    "Toyota is headquartered in Toyota City.",
    "The Nile flows into the Mediterranean Sea.",
    "The Amazon river flows into the Atlantic Ocean.",
    "The Danube flows into the Black Sea.",
    "Water boils at one hundred degrees.",
    "The official language of Brazil is Portuguese.",
    "The official language of Mexico is Spanish.",
    "The currency of Japan is the yen.",
    "The currency of the United Kingdom is the pound.",
    "Who is the president of the club? The president is Anna Berg.",
    "What is the capital of Zorvia? The capital of Zorvia is Keltrim.",
    "Q: Where was Ada Lovelace born? A: London.",
    "The chemical symbol of gold is Au.",
    "The largest planet of the solar system is Jupiter.",
]

# Small enough to build and run in milliseconds, large enough that every family's shape
# constraints hold (head_dim even for rotary embeddings, several heads, a real FFN expansion).
HIDDEN = 32
HEADS = 4
INTERMEDIATE = 64
MAX_POSITIONS = 128

# Special-token ids of `train_tokenizer`: its special tokens come first in the vocabulary.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def _family_fields(family: str, num_layers: int) -> dict[str, Any]:
    """The config fields that set one family's size; each family names them differently."""
    common_llama = {
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 2,
        "max_position_embeddings": MAX_POSITIONS,
    }
    if family in ("llama", "mistral", "qwen2"):
        return dict(common_llama)
    if family == "gemma":
        # Gemma's default head_dim (256) is not derived from hidden/heads; set it explicitly.
        return {**common_llama, "head_dim": HIDDEN // HEADS}
    if family == "gemma3_text":
        # Gemma 3 alternates sliding-window and global attention layers (5:1); a short window and a
        # pattern of 2 make both kinds appear in four layers.
        return {**common_llama, "head_dim": HIDDEN // HEADS, "sliding_window": 16,
                "layer_types": ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]}
    if family == "phi3":
        # Phi-3 fuses q/k/v and gate/up; needs original_max_position_embeddings for its rope.
        return {
            **common_llama,
            "original_max_position_embeddings": MAX_POSITIONS,
            "sliding_window": None,
        }
    if family == "gpt2":
        return {
            "n_embd": HIDDEN,
            "n_inner": INTERMEDIATE,
            "n_layer": num_layers,
            "n_head": HEADS,
            "n_positions": MAX_POSITIONS,
        }
    if family == "gptj":
        # rotary_dim must not exceed the head dimension (default 64 would).
        return {
            "n_embd": HIDDEN,
            "n_inner": INTERMEDIATE,
            "n_layer": num_layers,
            "n_head": HEADS,
            "n_positions": MAX_POSITIONS,
            "rotary_dim": HIDDEN // HEADS,
        }
    if family == "gpt_neox":
        return {
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": num_layers,
            "num_attention_heads": HEADS,
            "max_position_embeddings": MAX_POSITIONS,
        }
    if family == "falcon":
        # Falcon names its FFN width ffn_hidden_size; the default multi-query attention is kept.
        return {
            "hidden_size": HIDDEN,
            "ffn_hidden_size": INTERMEDIATE,
            "num_hidden_layers": num_layers,
            "num_attention_heads": HEADS,
            "max_position_embeddings": MAX_POSITIONS,
        }
    if family == "opt":
        # OPT's projection of word embeddings must equal the hidden size to skip project_in/out.
        return {
            "hidden_size": HIDDEN,
            "word_embed_proj_dim": HIDDEN,
            "ffn_dim": INTERMEDIATE,
            "num_hidden_layers": num_layers,
            "num_attention_heads": HEADS,
            "max_position_embeddings": MAX_POSITIONS,
        }
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(sorted(SUPPORTED_FAMILIES))}")


def tiny_config(family: str, num_layers: int = 4, vocab_size: int = 512) -> PretrainedConfig:
    """The config of a tiny random model of `family`, with the test tokenizer's special ids."""
    fields = _family_fields(family, num_layers)
    config_cls = CONFIG_MAPPING[family]
    return config_cls(
        vocab_size=vocab_size,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        **fields,
    )


def make_tiny_model(
    family: str, out_dir: str | Path, seed: int = 0, num_layers: int = 4, vocab_size: int = 512
) -> Path:
    """Build a tiny random causal LM of `family` with a local tokenizer and save both to `out_dir`.

    Deterministic given `seed`: the tokenizer is trained on the fixed `TINY_TEXTS` and the weights
    come from a seeded generator, so two calls with the same arguments write equal weights. The
    global torch RNG state is restored afterwards so tests that build models do not perturb each
    other's randomness.
    """
    config = tiny_config(family, num_layers=num_layers, vocab_size=vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(TINY_TEXTS, vocab_size=vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    with quiet_progress():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return out


def write_tiny_gguf(path: str | Path, architecture: str) -> Path:
    """A GGUF file with a header, `general.architecture` and one small tensor, but no tokenizer: enough
    to test how a GGUF file is recognised or refused (a truncated copy of it is a damaged one)."""
    import gguf
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m moecli.model.tiny FAMILY OUT_DIR [SEED]`: build a tiny model, print its path.
    `python -m moecli.model.tiny gguf ARCHITECTURE OUT_FILE`: write a tiny GGUF file (`write_tiny_gguf`)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "gguf":
        print(write_tiny_gguf(args[2], args[1]))
        return 0
    if len(args) not in (2, 3):
        print("usage: python -m moecli.model.tiny FAMILY OUT_DIR [SEED] | gguf ARCHITECTURE OUT_FILE", file=sys.stderr)
        return 2
    seed = int(args[2]) if len(args) == 3 else 0
    try:
        path = make_tiny_model(args[0], args[1], seed=seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
