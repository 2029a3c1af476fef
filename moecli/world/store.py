"""Where the built models live: the committed fact-world model, the cache, the benchmark models.

Why a store: every command defaults to the fact-world model, and benchmark scripts want "the
ZsRE knowledge model for N records" without retraining it each time. Models are found or built
here, keyed by everything that changes them (data bytes, N, trainer config, trainer and generator
versions), so a stale model is never reused and a fresh one is never rebuilt needlessly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from moecli.data.records import EditRecord
from moecli.errors import UserError
from moecli.model.sources import quiet_progress
from moecli.paths import ASSETS, cache_root
from moecli.world.generator import GENERATOR_VERSION, World, build_world
from moecli.world.trainer import (
    TRAINER_VERSION,
    EpochStats,
    KnowledgeModelConfig,
    Progress,
    TrainResult,
    group_mean,
    train_knowledge_model,
)

DEFAULT_SEED = 0
ASSET_DIR = ASSETS / "fact_world"
WORLD_INFO = "world.json"
KNOWLEDGE_INFO = "knowledge.json"
REBUILD_COMMAND = "moecli world build --rebuild"

# The fact world: stop at a mean accuracy of 0.99 with every template at 0.97 (90 epochs at most).
# 1.64 M parameters, so the committed float32 model stays under 8 MB. A wide MLP over few layers
# memorises these facts fastest per epoch (docs/design.md).
FACT_WORLD_CONFIG = KnowledgeModelConfig(
    hidden_size=128,
    num_layers=3,
    num_heads=4,
    intermediate_size=1024,
    vocab_size=1024,
    lr=3e-3,
    batch_size=64,
    max_epochs=90,
    target_accuracy=0.99,
    group_target=0.97,
)
# Benchmark knowledge models: real-text facts with multi-token answers and a larger vocabulary
# (tied embeddings keep the vocabulary cheap). ZsRE N=1000 reaches >= 0.95 in ~35 epochs.
BENCHMARK_CONFIG = KnowledgeModelConfig(
    hidden_size=128,
    num_layers=3,
    num_heads=4,
    intermediate_size=1024,
    vocab_size=8192,
    tie_embeddings=True,
    lr=3e-3,
    batch_size=64,
    max_epochs=80,
    target_accuracy=0.95,
    group_target=0.9,
)



def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- the fact world
def fact_world_training_set(world: World) -> tuple[list[tuple[str, str]], list[str]]:
    """Every fact of the world under every template, with its template id as group."""
    facts: list[tuple[str, str]] = []
    groups: list[str] = []
    for template, pairs in world.facts_by_template().items():
        facts += pairs
        groups += [template] * len(pairs)
    return facts, groups


def fact_world_repeats(world: World, groups: Sequence[str]) -> list[int]:
    """One-hop facts have one template where relations have several: train them as often."""
    per_relation = max(len(r.templates) for r in world.relations)
    return [per_relation if g.startswith("hop/") else 1 for g in groups]


def _fact_world_identity(seed: int, config: KnowledgeModelConfig) -> dict:
    return {
        "kind": "fact_world",
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "trainer_version": TRAINER_VERSION,
        "config": config.identity(),
    }


def committed_model_dir(seed: int = DEFAULT_SEED) -> Path | None:
    """The model shipped in `moecli/assets/fact_world`, if present and built for this generator."""
    if not _is_model_dir(ASSET_DIR):
        return None
    info = _read_json(ASSET_DIR / WORLD_INFO)
    if info.get("seed") != seed or info.get("generator_version") != GENERATOR_VERSION:
        return None
    return ASSET_DIR


def fact_world_cache_dir(seed: int = DEFAULT_SEED, config: KnowledgeModelConfig = FACT_WORLD_CONFIG) -> Path:
    key = _key(_fact_world_identity(seed, config))[:12]
    return cache_root() / f"fact_world-s{seed}-{key}"


def build_fact_world(
    out_dir: str | Path,
    seed: int = DEFAULT_SEED,
    config: KnowledgeModelConfig = FACT_WORLD_CONFIG,
    progress: Progress | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Generate the world for `seed`, train its model into `out_dir` and write `world.json`."""
    world = build_world(seed)
    facts, groups = fact_world_training_set(world)
    repeats = fact_world_repeats(world, groups)
    meta = {
        **_fact_world_identity(seed, config),
        "n_entities": sum(len(v) for v in world.entities.values()),
        "n_relations": len(world.relations),
        "n_one_hops": len(world.one_hops),
        "max_edits": world.max_edits(),
        "built_by": REBUILD_COMMAND if seed == DEFAULT_SEED else f"moecli world build --seed {seed}",
    }
    return train_knowledge_model(
        facts,
        out_dir,
        config,
        progress,
        groups=groups,
        repeats=repeats,
        on_epoch=on_epoch,
        metadata=meta,
        info_name=WORLD_INFO,
    )


def fact_world_model_dir(
    seed: int = DEFAULT_SEED,
    progress: Progress | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> Path:
    """The fact-world model for `seed`: the committed one, else the cached one, else built now."""
    committed = committed_model_dir(seed)
    if committed is not None:
        return committed
    out = fact_world_cache_dir(seed)
    if not _is_model_dir(out):
        build_fact_world(out, seed, FACT_WORLD_CONFIG, progress, on_epoch)
    return out


def default_model_dir(progress: Progress | None = None) -> Path:
    """The default `--model` of every command: the fact-world model (built on first use if needed)."""
    return fact_world_model_dir(DEFAULT_SEED, progress)


def load_model(model_dir: str | Path):
    """Load a model directory as (model, tokenizer), the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model.eval()
    return model, tokenizer


def measure_model(
    model_dir: str | Path, facts: Sequence[tuple[str, str]], groups: Sequence[str], batch_size: int = 128
) -> tuple[float, dict[str, float]]:
    """Answer-token accuracy of the model in `model_dir` on `facts`, overall and per group."""
    from moecli.engine.evaluation import answer_token_accuracy

    model, tokenizer = load_model(model_dir)
    accs = answer_token_accuracy(model, tokenizer, list(facts), batch_size=batch_size)
    return sum(accs) / max(len(accs), 1), group_mean(accs, groups)


def verify_fact_world(model_dir: str | Path, seed: int = DEFAULT_SEED) -> tuple[float, dict[str, float]]:
    """Recompute the fact-world model's accuracy on every fact, per template."""
    facts, groups = fact_world_training_set(build_world(seed))
    return measure_model(model_dir, facts, groups)


# ---------------------------------------------------------------- benchmark knowledge models
def benchmark_facts(
    records: Sequence[EditRecord],
) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """The original facts of `records`: (facts, groups, extra tokenizer texts).

    prompt -> ground_truth ("prompt"), each rephrase -> ground_truth ("rephrase"), each locality
    prompt -> its answer ("locality"). A prompt seen twice keeps its first answer (a model cannot
    learn two answers to one prompt). The extra texts carry the new targets, so they tokenize well.
    """
    facts: list[tuple[str, str]] = []
    groups: list[str] = []
    seen: set[str] = set()

    def add(prompt: str, answer: str | None, group: str) -> None:
        if not prompt or not answer or not answer.strip() or prompt in seen:
            return
        seen.add(prompt)
        facts.append((prompt, answer.strip()))
        groups.append(group)

    for r in records:
        if r.ground_truth:
            add(r.prompt, r.ground_truth, "prompt")
            for rp in r.rephrases:
                add(rp, r.ground_truth, "rephrase")
        for lp in r.locality:
            add(lp.prompt, lp.answer, "locality")
    extra = [f"{r.prompt} {r.target.strip()}" for r in records]
    return facts, groups, extra


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def benchmark_cache_dir(path: str | Path, n: int, config: KnowledgeModelConfig = BENCHMARK_CONFIG) -> Path:
    path = Path(path)
    identity = {
        "kind": "benchmark",
        "file_sha256": _file_sha256(path),
        "n": n,
        "trainer_version": TRAINER_VERSION,
        "config": config.identity(),
    }
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)[:40]
    return cache_root() / f"{stem}-n{n}-{_key(identity)[:12]}"


def benchmark_model_dir(
    path: str | Path,
    n: int = 1000,
    progress: Progress | None = None,
    *,
    rebuild: bool = False,
    config: KnowledgeModelConfig = BENCHMARK_CONFIG,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> Path:
    """The knowledge model of the first `n` records of `path`: cached, or trained now.

    The cache key covers the file's bytes, `n`, the trainer config and the trainer version.
    """
    from moecli.data.readers import read_records

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    out = benchmark_cache_dir(path, n, config)
    if _is_model_dir(out) and not rebuild:
        return out
    result = read_records(path, limit=n)
    if not result.records:
        raise UserError(f"{path}: no records to build a knowledge model from")
    facts, groups, extra = benchmark_facts(result.records)
    if not facts:
        raise UserError(f"{path}: the records carry no original facts (no ground_truth or locality answers)")
    meta = {
        "kind": "benchmark",
        "source": str(path),
        "file_sha256": _file_sha256(path),
        "n": n,
        "n_records": len(result.records),
        "format": result.format,
        "group_counts": {g: groups.count(g) for g in dict.fromkeys(groups)},
    }
    train_knowledge_model(
        facts,
        out,
        config,
        progress,
        groups=groups,
        extra_texts=extra,
        on_epoch=on_epoch,
        metadata=meta,
        info_name=KNOWLEDGE_INFO,
    )
    return out
