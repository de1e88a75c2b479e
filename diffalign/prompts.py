"""Prompt sources: a text file (one prompt per line) or JSONL (a ``prompt`` field per line)."""

from __future__ import annotations

import json
from pathlib import Path


def read_prompts(path: str | Path, key: str = "prompt") -> list[str]:
    """Read prompts; blank lines are skipped. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string {key!r} field")
                line = row[key]
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts
