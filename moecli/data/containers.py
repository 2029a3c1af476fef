"""The containers records sit in: a JSON list, `{"data": [...]}`, one JSON object, JSON lines, any of them
gzip-compressed. Bytes become (record number, raw JSON value or `BadRecord`) pairs; what a record *means*
is the readers' business (`moecli.data.readers`), so any schema can sit in any container.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moecli.data.records import json_type
from moecli.errors import UserError


class BadRecord(Exception):
    """A problem with one record; the message lacks the `file:record N:` prefix (added by the caller)."""


def read_text(path: Path, name: str) -> str:
    """The file's text, with each way of it being unreadable turned into one clear UserError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a directory, not a file") from None
    except OSError as e:
        raise UserError(f"{name}: cannot read: {e.strerror or e}") from None
    if path.suffix.lower() == ".gz":  # a gzip-compressed JSON or JSONL file (moecli ships its calibration data so)
        import gzip
        import zlib

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{name}: not a valid gzip file ({e})") from None
    try:
        text = data.decode("utf-8-sig")  # -sig: tolerate a BOM some editors write
    except UnicodeDecodeError as e:
        raise UserError(
            f"{name}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); re-save the file as UTF-8"
        ) from None
    if not text.strip():
        raise UserError(f"{name}: empty file")
    return text


def json_error(e: ValueError | RecursionError, line_offset: int = 0) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON (line {e.lineno + line_offset}, column {e.colno}: {e.msg})"
    if isinstance(e, RecursionError):
        return "not valid JSON (nested too deeply)"
    return f"not valid JSON ({e})"


def loads_file(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{name}: {json_error(e)}") from None


def iter_rows(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    """Parse the container eagerly (so file-level errors raise at once) and yield its records."""
    text = read_text(path, name)
    first = text.lstrip()[0]
    if first == "{":
        jsonl = path.name.lower().removesuffix(".gz").endswith(".jsonl")
        if not jsonl:
            try:
                whole = json.loads(text)
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":  # anything else is a broken single object
                    raise UserError(f"{name}: {json_error(e)}") from None
                jsonl = True  # several objects: JSON lines without the .jsonl suffix
            except (ValueError, RecursionError) as e:
                raise UserError(f"{name}: {json_error(e)}") from None
        if jsonl:
            return iter_jsonl(text, name)
        if type(whole.get("data")) is list:  # {"data": [...]} as some HF dumps have it
            items = whole["data"]
        else:
            items = [whole]  # a single record
    else:
        items = loads_file(text, name)
        if type(items) is not list:
            raise UserError(f"{name}: expected a JSON list of records or JSON lines, got a JSON {json_type(items)}")
    if not items:
        raise UserError(f"{name}: contains no records")
    return enumerate(items, 1)


def iter_jsonl(text: str, name: str) -> Iterator[tuple[int, Any]]:
    """Records of a JSON-lines text; a bad line is a bad *record* (skippable), not a bad file.

    Splits on "\\n" only: str.splitlines would also split on U+2028 and friends, which
    json.dumps(ensure_ascii=False) leaves unescaped inside strings.
    """
    n = 0
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        n += 1
        try:
            yield n, json.loads(line)
        except (ValueError, RecursionError) as e:
            yield n, BadRecord(json_error(e, line_offset=lineno - 1))
