"""Edit records kept as tables: Parquet and CSV files, `datasets.save_to_disk` directories, and
`hf:NAME[:SPLIT]` datasets already in the local Hugging Face cache, read through `datasets`.

Why `datasets`: it is what KnowEdit and most editing benchmarks are published with, and it reads all of
these (Arrow, Parquet, CSV, the hub cache) with one API. Each row becomes the same dict a JSON record
is, so the readers of `moecli.data.records` (format detection included) map it to an `EditRecord`. Nothing
is ever downloaded: `hf:` works offline only, and says so when the dataset is not cached.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moecli.errors import UserError

TABLE_SUFFIXES = (".parquet", ".csv")


def is_table_source(text: str) -> bool:
    """Whether `--data` names something read through `datasets` (not a JSON file)."""
    path = Path(text)
    return (text.startswith("hf:") or path.suffix.lower() in TABLE_SUFFIXES
            or (path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())))


def _offline_datasets():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before the first import: datasets reads it then
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # and if it was imported before
        if hasattr(datasets.config, flag):
            setattr(datasets.config, flag, True)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors come back as one UserError line
    return datasets


def _one_split(data, name: str):
    """A DatasetDict's "train" split, or its only one; a Dataset as it is."""
    if hasattr(data, "keys") and not hasattr(data, "column_names"):
        splits = list(data.keys())
        if "train" in splits:
            return data["train"]
        if len(splits) == 1:
            return data[splits[0]]
        raise UserError(f"{name}: holds the splits {', '.join(splits)}; name one (hf:NAME:SPLIT, or save one split)")
    return data


def load_table(text: str):
    """The `datasets.Dataset` that `--data TEXT` names, with each failure one UserError line."""
    datasets = _offline_datasets()
    path = Path(text)
    try:
        if text.startswith("hf:"):
            parts = text[3:].split(":", 1)
            if not parts[0]:
                raise UserError(f"{text}: expected hf:NAME or hf:NAME:SPLIT")
            try:
                data = datasets.load_dataset(parts[0], split=parts[1] if len(parts) > 1 else None)
            except UserError:
                raise
            except Exception as exc:  # offline and not cached, or no such dataset: many exception types
                raise UserError(f"{text}: not in the local Hugging Face cache (moecli never downloads; "
                                f"load it once with datasets where the hub is reachable): {_short(exc)}") from None
            return _one_split(data, text)
        if not path.exists():
            raise UserError(f"{text}: no such file")
        if path.is_dir():
            return _one_split(datasets.load_from_disk(str(path)), text)
        if path.suffix.lower() == ".parquet":
            return datasets.Dataset.from_parquet(str(path))
        return datasets.Dataset.from_csv(str(path), keep_default_na=False)
    except UserError:
        raise
    except Exception as exc:  # a damaged Parquet, a CSV that is not one, a foreign directory
        raise UserError(f"{text}: cannot read it as a table: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return (message[:200] + "…") if len(message) > 200 else message or type(exc).__name__


def _cell(value: Any) -> Any:
    """CSV keeps lists and objects as text: a cell holding JSON list or object text becomes that value;
    an empty CSV cell is a missing field."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in "[{":
            try:
                return json.loads(stripped)
            except ValueError:
                return value
        if stripped == "":
            return None
    return value


def iter_table(text: str) -> Iterator[tuple[int, dict]]:
    """(record number, raw record dict) for every row of the table `text` names."""
    table = load_table(text)
    if table.num_rows == 0:
        raise UserError(f"{text}: contains no records")
    is_csv = Path(text).suffix.lower() == ".csv"
    for n, row in enumerate(table, 1):
        yield n, ({k: _cell(v) for k, v in row.items() if _cell(v) is not None} if is_csv
                  else {k: v for k, v in row.items() if v is not None})
