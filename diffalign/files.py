"""What the package writes keeps the user's umask.

safetensors (0.8) writes every file owner-only (0600) whatever the umask, and ``tempfile.mkstemp`` /
``mkdtemp`` make 0600 files and 0700 folders on purpose. Folders and files we hand over (LoRA files,
pipelines, scorer models, checkpoints, trajectories, caches, manifests) are set to the modes a plain
``open()`` / ``mkdir()`` would have given them, so teammates on a shared cluster can read a run.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` is a swap)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> Path:
    """Give ``path`` (and, for a folder, everything below it) the modes the umask gives new files
    (0666 & ~umask) and folders (0777 & ~umask). Executable files keep their execute bits."""
    path = Path(path)
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask

    def fix(p: Path) -> None:
        if p.is_symlink():
            return
        if p.is_dir():
            os.chmod(p, dir_mode)
        else:
            executable = os.stat(p).st_mode & 0o111
            os.chmod(p, file_mode | (executable & ~mask))

    fix(path)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                fix(Path(root) / name)
    return path


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file``, with the umask's file mode."""
    save_file(tensors, str(path), metadata=metadata)
    return apply_umask(path)
