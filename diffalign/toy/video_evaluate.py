"""Caption accuracy of toy videos: does each frame show the named object, and does it move the named way?

Per frame, the image world's fixed reader (:func:`diffalign.toy.evaluate.read_attributes`) reads colour,
shape, size, background and count (a clip shows one object). Motion is read from the foreground centroid
of every frame: the least-squares velocity over the frames, nearest of the four directions, or ``None``
when the object moves less than ``MIN_TRAVEL`` pixels over the clip (or is missing in most frames).
The same reader scores the dataset's own clips near 100 %; chance is one over each vocabulary's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffalign.sampling import SamplingSettings, sample_batches
from diffalign.toy import data, video_data
from diffalign.toy.evaluate import FOREGROUND_DISTANCE, read_attributes

FRAME_ATTRIBUTES = ("color", "shape", "background", "size", "count")
VIDEO_ATTRIBUTES = (*FRAME_ATTRIBUTES, "direction")
#: Less centroid travel than this (pixels over the whole clip) reads as no motion.
MIN_TRAVEL = 3.0


def foreground_centroid(frame: torch.Tensor) -> tuple[float, float] | None:
    """The (x, y) pixel centroid of the pixels far from the border colour in one frame [3, H, W] in [0, 1]."""
    x = frame.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    border = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    mask = np.sqrt(((x - np.median(border, axis=0)) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def read_direction(video: torch.Tensor) -> str | None:
    """The direction the foreground moves over a clip [F, 3, H, W], or None if it does not clearly move."""
    points = [(i, c) for i, c in enumerate(foreground_centroid(f) for f in video) if c is not None]
    if len(points) < max(2, len(video) // 2):
        return None
    t = np.array([i for i, _ in points], dtype=np.float64)
    xy = np.array([c for _, c in points])
    velocity = np.polyfit(t, xy, 1)[0]  # pixels per frame, (vx, vy)
    if np.linalg.norm(velocity) * (len(video) - 1) < MIN_TRAVEL * video.shape[-1] / 32:
        return None
    return max(
        video_data.DIRECTION_VECTORS, key=lambda d: float(np.dot(video_data.DIRECTION_VECTORS[d], velocity))
    )


def clip_hits(videos: torch.Tensor, prompts: Sequence[str]) -> list[dict[str, float]]:
    """Per clip: the fraction of frames showing each named frame attribute, and whether the motion is
    right."""
    rows = []
    for video, prompt in zip(videos, prompts, strict=True):
        clip = video_data.parse_video_caption(prompt)
        found = [read_attributes(frame) for frame in video]
        row = {
            name: float(np.mean([f[name] == (1 if name == "count" else getattr(clip, name)) for f in found]))
            for name in FRAME_ATTRIBUTES
        }
        row["direction"] = float(read_direction(video) == clip.direction)
        rows.append(row)
    return rows


def video_chance_levels() -> dict[str, float]:
    levels = {name: 1.0 / len(video_data.VOCAB[name]) for name in ("color", "shape", "background", "size",
                                                                  "direction")}
    levels["count"] = 1.0 / len(data.COUNTS)
    levels["all"] = float(np.prod(list(levels.values())))
    return levels


def summarize_clips(rows: list[dict[str, float]]) -> dict[str, float]:
    accuracy = {name: float(np.mean([r[name] for r in rows])) for name in VIDEO_ATTRIBUTES}
    # A clip counts as right when every frame shows every attribute and the motion is right.
    accuracy["all"] = float(np.mean([all(v == 1.0 for v in r.values()) for r in rows]))
    return accuracy


@torch.no_grad()
def video_caption_accuracy(
    pipe,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    num_frames: int = video_data.NUM_FRAMES,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 1.0,
    batch_size: int = 16,
) -> dict:
    """Sample one clip per prompt (clip i gets seed ``seed + i``) and measure per-frame caption accuracy
    and motion-direction accuracy.

    Returns ``{"accuracy": {attribute: fraction}, "chance": {...}, "n": len(prompts)}``: frame attributes
    are averaged over frames and clips; ``"all"`` is the fraction of clips right in every frame and motion.
    """
    prompts = list(prompts)
    for p in prompts:
        video_data.parse_video_caption(p)  # reject non-toy prompts before sampling
    settings = SamplingSettings(
        num_steps=num_steps, guidance_scale=guidance_scale, eta=eta, num_frames=num_frames
    )
    rows = []
    for start, out in sample_batches(pipe, prompts, [seed + i for i in range(len(prompts))], settings,
                                     batch_size=batch_size):
        rows += clip_hits(out.images, prompts[start : start + batch_size])
    return {"accuracy": summarize_clips(rows), "chance": video_chance_levels(), "n": len(prompts)}


def video_dataset_accuracy(n: int = 128, seed: int = 0, split: str = "train") -> dict[str, float]:
    """The reader's accuracy on the dataset's own clips (the ceiling a perfect model would reach)."""
    clips, captions = video_data.make_video_dataset(n, seed=seed, split=split)
    return summarize_clips(clip_hits(clips.float() / 255.0, captions))
