"""Writing sampled videos: animated WebP and GIF through Pillow, MP4 when imageio-ffmpeg is installed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from diffalign.images import to_pil

log = logging.getLogger(__name__)
_warned_mp4 = False


def save_video(
    frames: torch.Tensor, stem: str | Path, fps: int = 8, formats: tuple[str, ...] = ("webp", "gif", "mp4")
) -> list[Path]:
    """Write ``frames`` [F, 3, H, W] in [0, 1] as ``stem.webp`` / ``stem.gif`` / ``stem.mp4``; return the
    paths.

    MP4 needs the optional ``imageio[ffmpeg]``; without it that format is skipped (said once).
    """
    global _warned_mp4
    images = to_pil(frames)
    stem, written = Path(stem), []
    duration_ms = int(1000 / fps)
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        if fmt in ("webp", "gif"):
            images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0,
                           **({"lossless": True} if fmt == "webp" else {}))
        elif fmt == "mp4":
            try:
                import imageio.v3 as iio

                iio.imwrite(path, np.stack([np.asarray(im) for im in images]), fps=fps, codec="libx264",
                            plugin="pyav" if _has_pyav() else None)
            except Exception as err:  # no encoder installed: the animated formats still stand
                if not _warned_mp4:
                    log.warning(
                        "MP4 not written (%s); install imageio[ffmpeg] for MP4 output", err.__class__.__name__
                    )
                    _warned_mp4 = True
                continue
        else:
            raise ValueError(f"unknown video format {fmt!r}; expected webp, gif or mp4")
        written.append(path)
    return written


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True
