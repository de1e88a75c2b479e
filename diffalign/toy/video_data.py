"""The toy video world: one coloured shape gliding across a plain background in a captioned direction.

A clip is ``NUM_FRAMES`` frames of the toy image world (:mod:`diffalign.toy.data`: same palette, shapes,
sizes, backgrounds and renderer) in which a single object moves in a straight line. Its caption names
five attributes, e.g. ``"a small red circle moving left on a white background"``. Directions are the
image axes (``left``/``right``/``up``/``down``); the object travels about a third of the frame, starting
and ending well inside it, with jittered start, path offset and speed.

The held-out split reuses the image world's fixed rule: captions whose (colour, shape, background)
triple is held out there are held out here, so held-out prompts test composition, not memory.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffalign.toy import data

NUM_FRAMES = 8
DIRECTIONS = ("left", "right", "up", "down")
#: Unit displacement (dx, dy) per direction, in image coordinates (y grows downwards).
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
#: How far the object travels over a clip, as a fraction of the image side (jittered by +-10 %).
TRAVEL = 0.36
#: Object centres stay within this band of the image side (so large shapes stay whole).
_LOW, _HIGH = 0.26, 0.74

#: The attribute vocabularies of a clip caption.
VOCAB: dict[str, tuple] = {
    "size": data.SIZES,
    "color": tuple(data.COLORS),
    "shape": data.SHAPES,
    "direction": DIRECTIONS,
    "background": tuple(data.BACKGROUNDS),
}


@dataclass(frozen=True)
class Clip:
    """One video caption's attributes: a single object of ``size``/``color``/``shape`` moving
    ``direction``."""

    size: str
    color: str
    shape: str
    direction: str
    background: str

    def caption(self) -> str:
        return (
            f"a {self.size} {self.color} {self.shape} moving {self.direction} on a {self.background} "
            "background"
        )

    def frame_scene(self) -> data.Scene:
        """The image-world scene each frame shows (position: None, it changes over the clip)."""
        return data.Scene(1, self.size, self.color, self.shape, None, self.background)


def is_heldout(clip: Clip) -> bool:
    """The image world's held-out rule on (colour, shape, background): 9 of the 54 triples."""
    return data.is_heldout(clip.frame_scene())


def all_clips() -> list[Clip]:
    """Every clip caption once (432), in a fixed order."""
    return [Clip(size, color, shape, direction, background)
            for size in data.SIZES for color in data.COLORS for shape in data.SHAPES
            for background in data.BACKGROUNDS for direction in DIRECTIONS]


def clips_of(split: str) -> list[Clip]:
    if split not in data.SPLITS:
        raise ValueError(f"unknown toy split {split!r}; expected one of {', '.join(data.SPLITS)}")
    return [c for c in all_clips() if is_heldout(c) == (split == "heldout")]


def video_prompts(split: str = "train", n: int | None = None, seed: int = 0) -> list[str]:
    """Captions of a split: all of them in a fixed order (``n`` None), or ``n`` drawn for ``seed``
    (distinct up to the split's size, then repeated round by round)."""
    return data.draw_captions([c.caption() for c in clips_of(split)], n, seed)


_CAPTION = re.compile(r"^a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) moving (?P<direction>\w+) "
                      r"on a (?P<background>\w+) background$")


def parse_video_caption(caption: str) -> Clip:
    """The clip a toy video caption names; raises ValueError (naming the caption) if it is not one."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None:
        raise ValueError(f"not a toy video caption: {caption!r} "
                         "(expected e.g. 'a small red circle moving left on a white background')")
    clip = Clip(**match.groupdict())
    for name, vocab in VOCAB.items():
        if getattr(clip, name) not in vocab:
            raise ValueError(f"toy video caption {caption!r}: unknown {name} {getattr(clip, name)!r}; "
                             f"expected one of {vocab}")
    return clip


def is_video_caption(caption: str) -> bool:
    try:
        parse_video_caption(caption)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------
def path_of(clip: Clip, rng: random.Random, num_frames: int = NUM_FRAMES) -> list[tuple[float, float]]:
    """Object centres (x, y) in pixels, one per frame: a straight line in ``clip.direction``."""
    dx, dy = DIRECTION_VECTORS[clip.direction]
    travel = TRAVEL * rng.uniform(0.9, 1.1)
    # Along the motion axis the path must fit in the band; across it, anywhere in the band.
    along = rng.uniform(_LOW, _HIGH - travel)
    across = rng.uniform(_LOW + 0.04, _HIGH - 0.04)
    if dx + dy < 0:  # left / up: start at the high end
        along = 1.0 - along
    centres = []
    for i in range(num_frames):
        a = along + (dx + dy) * travel * i / max(1, num_frames - 1)
        fx, fy = (a, across) if dx else (across, a)
        centres.append((fx * data.IMAGE_SIZE, fy * data.IMAGE_SIZE))
    return centres


def render_clip(clip: Clip, rng: random.Random, num_frames: int = NUM_FRAMES) -> list[Image.Image]:
    """Draw ``clip`` as ``num_frames`` 32x32 RGB frames (``rng`` jitters size, path and speed)."""
    s = data._SUPERSAMPLE
    radius = data.SIZE_RADIUS[clip.size] * rng.uniform(0.9, 1.1)
    frames = []
    for cx, cy in path_of(clip, rng, num_frames):
        big = Image.new("RGB", (data.IMAGE_SIZE * s, data.IMAGE_SIZE * s), data.BACKGROUNDS[clip.background])
        data._draw_shape(ImageDraw.Draw(big), clip.shape, cx * s, cy * s, radius * s, data.COLORS[clip.color])
        frames.append(big.resize((data.IMAGE_SIZE, data.IMAGE_SIZE), Image.Resampling.BOX))
    return frames


def sample_clip(rng: random.Random, split: str = "train") -> Clip:
    """A uniformly random clip caption of ``split``."""
    clips = clips_of(split)
    return clips[rng.randrange(len(clips))]


def make_video_dataset(n: int, seed: int = 0, split: str = "train",
                       num_frames: int = NUM_FRAMES) -> tuple[torch.Tensor, list[str]]:
    """``n`` rendered clips of ``split``: uint8 [n, F, 3, 32, 32] and their captions, fixed by ``seed``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if num_frames < 2:
        raise ValueError(f"a clip needs at least 2 frames to move, got num_frames={num_frames}")
    rng = random.Random(f"diffalign-toy-video-{split}-{seed}")
    clips = np.empty((n, num_frames, data.IMAGE_SIZE, data.IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        clip = sample_clip(rng, split)
        clips[i] = np.stack([np.asarray(f) for f in render_clip(clip, rng, num_frames)])
        captions.append(clip.caption())
    return torch.from_numpy(clips).permute(0, 1, 4, 2, 3).contiguous(), captions
