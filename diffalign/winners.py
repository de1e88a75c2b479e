"""SePPO's data: winning images with their prompts, from a preference set or from images with prompts.

:func:`open_winners` opens ``data.source`` (checking its schema before any model loads);
:class:`WinnersDataset` preprocesses each winner as the pair dataset does (:mod:`diffalign.data`).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch
from PIL import Image

from diffalign.data import (
    UNREADABLE,
    DataError,
    Decoded,
    PairSource,
    Preprocessing,
    media_file,
    open_image_file,
    open_pairs,
    preprocess_clips,
    preprocess_images,
    read_video_frames,
)
from diffalign.jsonl import iter_jsonl


# ----------------------------------------------------------------------------------------------------
# Winners: from a preference set, or images with prompts
# ----------------------------------------------------------------------------------------------------
class ImagePrompts:
    """Images with their prompts: a JSONL file (``prompt`` and ``image`` path per line, relative to the
    file) or a folder with ``samples.jsonl`` (``prompt`` and ``file``, as ``diffalign sample`` writes)."""

    def __init__(self, path: Path, image_key: str):
        self.description = str(path)
        root = path.parent
        self.rows: list[tuple[str, Path]] = []
        for where, row in iter_jsonl(path, DataError):
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("prompt"), str)
                or not isinstance(row.get(image_key), str)
                or not row[image_key]
            ):
                raise DataError(
                    f"{where}: expected an object with a string 'prompt' and an image path {image_key!r}"
                )
            self.rows.append((row["prompt"], media_file(root, row[image_key], where, "image")))
        if not self.rows:
            raise DataError(f"{path}: no images")

    def __len__(self):
        return len(self.rows)

    def caption(self, i: int) -> str:
        return self.rows[i][0]

    def winner(self, i: int, draft_size: int | None = None) -> Decoded:
        return open_image_file(self.rows[i][1], draft_size)

    def winner_video(self, i: int) -> list[Image.Image]:
        return read_video_frames(self.rows[i][1])


class PairWinners:
    """The winning image of each pair of a preference set (ties already dropped)."""

    def __init__(self, pairs: PairSource):
        self.pairs, self.description = pairs, f"winners of {pairs.description}"

    def __len__(self):
        return len(self.pairs)

    def caption(self, i: int) -> str:
        return self.pairs.caption(i)

    def winner(self, i: int, draft_size: int | None = None) -> Decoded:
        return self.pairs.images(i, draft_size)[0]

    def winner_video(self, i: int) -> list[Image.Image]:
        return self.pairs.videos(i)[0]


def _first_row(path: Path) -> dict:
    for _, row in iter_jsonl(path, DataError):
        return row if isinstance(row, dict) else {}
    raise DataError(f"{path}: empty file")


def open_winners(data_cfg):
    """The winners of ``data.source``; the schema is checked here, before any model loads."""
    path = Path(os.path.expanduser(data_cfg.source))
    if path.is_dir() and (path / "samples.jsonl").is_file() and not (path / "pairs.jsonl").is_file():
        return ImagePrompts(path / "samples.jsonl", "file")
    if path.is_file() and path.suffix == ".jsonl" and "chosen" not in _first_row(path):
        return ImagePrompts(path, "image")
    return PairWinners(open_pairs(data_cfg.source, data_cfg.format, data_cfg.split, data_cfg.max_pairs))


class WinnersDataset(torch.utils.data.Dataset):
    """Winners resized/cropped/flipped to ``resolution`` in [-1, 1], with SDXL micro-conditioning (the pair
    dataset's preprocessing, one image per item; the flip is drawn from ``(seed, index)``).

    With ``num_frames`` (video models) a winner is a clip ``pixels`` [F, 3, R, R], fitted to ``num_frames``
    by ``frame_policy`` (see :func:`diffalign.data.fit_frames`).
    """

    def __init__(self, source, resolution: int, random_flip: bool, seed: int, num_frames: int | None = None,
                 frame_policy: str = "resample"):
        self.source, self.resolution, self.random_flip, self.seed = source, resolution, random_flip, seed
        self.num_frames, self.frame_policy = num_frames, frame_policy
        self.prep = Preprocessing(resolution, False, random_flip, 0.0, seed, num_frames, frame_policy)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(f"{self.seed}/{index}")
        flip = self.random_flip and rng.random() < 0.5
        try:
            if self.num_frames is not None:
                pixels, time_ids = preprocess_clips(
                    [("winner", self.source.winner_video(index))], self.prep, None, flip
                )
            else:
                winner = self.source.winner(index, draft_size=2 * self.resolution)
                pixels, time_ids = preprocess_images([winner], self.resolution, None, flip)
        except UNREADABLE as err:
            return {
                "bad": f"{self.source.description} item {index}: {type(err).__name__}: {err}",
                "index": index,
            }
        return {
            "index": index,
            "caption": self.source.caption(index),
            "pixels": pixels[0],
            "time_ids": time_ids[0],
        }
