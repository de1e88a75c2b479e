"""Prompt sources: a text file (one prompt per line) or JSONL (a ``prompt`` field per line)."""

from __future__ import annotations

from pathlib import Path

from diffalign.jsonl import iter_jsonl


def read_prompts(path: str | Path, key: str = "prompt") -> list[str]:
    """Read prompts; blank lines are skipped. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix == ".jsonl":
        prompts = []
        for where, row in iter_jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise ValueError(f"{where}: expected an object with a string {key!r} field")
            prompts.append(row[key])
    else:
        try:
            with path.open(encoding="utf-8") as f:
                prompts = [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as err:
            raise ValueError(
                f"prompt file {path}: not UTF-8 text ({err.reason} in "
                f"{err.object[err.start : err.start + 4]!r})"
            ) from None
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts
