"""The user's data files, read the same way wherever they come in: text files and the text files
of a folder (training, perplexity), JSON files (configs, adapter configs, lists of runs), and JSONL, one JSON object per line (fine-tuning and evaluation
data, few-shot examples). Every problem is one error that names the file and, in a JSONL file, the
line: a DataError, or the error class of the caller's own domain.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from attendo.errors import AttendoError, DataError


def files_in(folder: Path, suffixes: Iterable[str]) -> list[Path]:
    """The files under `folder` (recursively) whose suffix is one of `suffixes`, sorted by path."""
    wanted = tuple(suffixes)
    return sorted(p for p in folder.rglob("*") if p.suffix in wanted and p.is_file())


def read_text_file(path: Path, error: type[AttendoError] = DataError) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None


def read_json(path: Path, error: type[AttendoError] = DataError) -> Any:
    """A whole JSON file (a config, a list of runs)."""
    try:
        return json.loads(read_text_file(path, error))
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def read_jsonl(
    path: Path, error: type[AttendoError] = DataError, expected: str = "a JSON object"
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an
    error naming the file and line (`expected` says what the line should have been)."""
    records = []
    for number, line in enumerate(read_text_file(path, error).splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(value, dict):
            raise error(f"{path}:{number}: expected {expected}, got {type(value).__name__}")
        records.append((number, value))
    return records
