"""User-input helpers every floor may use: the one-line usage error, output folders, the default device."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove it is writable, or raise a UsageError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"output folder {path} is not writable: {err.strerror or err}") from None
    return path


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
