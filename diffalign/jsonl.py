"""Reading JSONL files with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def iter_jsonl(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[str, object]]:
    """Yield ``("FILE:LINE", parsed value)`` for each non-blank line; bad JSON raises ``error`` naming the
    line."""
    path = Path(path)
    with path.open("rb") as f:  # bytes, decoded line by line, so that bad UTF-8 is reported with its line
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise error(
                    f"{where}: not UTF-8 text (byte {err.start}: {raw[err.start : err.start + 4]!r})"
                ) from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise error(f"{where}: JSON nested too deeply") from None
