"""The toy world's procedural captioned dataset: simple coloured shapes on plain backgrounds.

Every scene is described by six attributes (count, size, colour, shape, position, background) and its
caption names all of them, e.g. ``"a small red circle on the left on a white background"`` or
``"three large blue squares on a black background"`` (several objects are scattered, so their caption
names no position). Scenes are drawn with PIL at 4x resolution and downsampled, so edges are smooth and
everything is deterministic for a seed.

The prompt split is fixed (it is part of the world, not of a run): captions whose (colour, shape,
background) triple is one of nine held-out triples never appear in training, so the held-out prompts
test whether a model composes attributes it has only seen apart.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
_SUPERSAMPLE = 4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 20),
    "purple": (150, 40, 200),
    "orange": (250, 130, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
COUNTS = (1, 2, 3)
POSITIONS = ("left", "right", "top", "bottom", "center")

COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
#: Object half-extent in pixels (at IMAGE_SIZE) for each size word.
SIZE_RADIUS = {"small": 4.0, "large": 7.5}
#: Object centre (x, y) as a fraction of the image side for each position word.
POSITION_CENTERS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
                    "center": (0.5, 0.5)}

#: The attribute vocabularies, by attribute name (what scorers and the evaluation read).
VOCAB: dict[str, tuple] = {
    "count": COUNTS,
    "size": SIZES,
    "color": tuple(COLORS),
    "shape": SHAPES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}


@dataclass(frozen=True)
class Scene:
    """One caption's attributes. ``position`` is None when ``count`` > 1 (objects are scattered)."""

    count: int
    size: str
    color: str
    shape: str
    position: str | None
    background: str

    def caption(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        where = f" {POSITION_PHRASES[self.position]}" if self.position else ""
        return (
            f"{COUNT_WORDS[self.count]} {self.size} {self.color} {noun}{where} on a {self.background} "
            "background"
        )


def is_heldout(scene: Scene) -> bool:
    """The fixed held-out rule: one colour per (shape, background) pair, 9 of the 54 triples."""
    c, s, b = (
        tuple(COLORS).index(scene.color),
        SHAPES.index(scene.shape),
        tuple(BACKGROUNDS).index(scene.background),
    )
    return (c + 2 * s + b) % len(COLORS) == 0


def all_scenes() -> list[Scene]:
    """Every caption of the world once (756 scenes), in a fixed order."""
    scenes = []
    for count in COUNTS:
        for size in SIZES:
            for color in COLORS:
                for shape in SHAPES:
                    for background in BACKGROUNDS:
                        for position in POSITIONS if count == 1 else (None,):
                            scenes.append(Scene(count, size, color, shape, position, background))
    return scenes


SPLITS = ("train", "heldout")


def scenes_of(split: str) -> list[Scene]:
    if split not in SPLITS:
        raise ValueError(f"unknown toy split {split!r}; expected one of {', '.join(SPLITS)}")
    return [s for s in all_scenes() if is_heldout(s) == (split == "heldout")]


def toy_prompts(split: str = "train", n: int | None = None, seed: int = 0) -> list[str]:
    """Captions of a split: all of them in a fixed order (``n`` None), or ``n`` drawn for ``seed``.

    ``n`` up to the split's size gives distinct captions; a larger ``n`` repeats them (each caption
    used once per round), so any ``n`` works for a prompt set.
    """
    return draw_captions([s.caption() for s in scenes_of(split)], n, seed)


def draw_captions(captions: list[str], n: int | None, seed: int) -> list[str]:
    """All ``captions`` (``n`` None), or ``n`` drawn for ``seed``: distinct up to ``len(captions)``, then
    repeated round by round."""
    if n is None:
        return captions
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        out += rng.sample(captions, len(captions))
    return out[:n]


_CAPTION = re.compile(
    r"^(?P<count>a|two|three) (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+?)s?"
    r"(?: (?:on the|at the|in the) (?P<position>\w+))? on a (?P<background>\w+) background$"
)


def parse_caption(caption: str) -> Scene:
    """The scene a toy caption names; raises ValueError (naming the caption) if it is not one."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None:
        raise ValueError(
            f"not a toy caption: {caption!r} (expected e.g. 'a small red circle on the left on a white "
            "background')"
        )
    g = match.groupdict()
    count = {v: k for k, v in COUNT_WORDS.items()}[g["count"]]
    scene = Scene(count, g["size"], g["color"], g["shape"], g["position"], g["background"])
    for name in ("size", "color", "shape", "background"):
        if getattr(scene, name) not in VOCAB[name]:
            raise ValueError(
                f"toy caption {caption!r}: unknown {name} {getattr(scene, name)!r}; expected one of "
                f"{VOCAB[name]}"
            )
    if (scene.position is None) != (count > 1) or (scene.position and scene.position not in POSITIONS):
        raise ValueError(f"toy caption {caption!r}: a single object needs one of the positions {POSITIONS}; "
                         "several objects take none")
    if scene.caption() != caption.strip().lower():
        raise ValueError(f"not a toy caption: {caption!r} (did you mean {scene.caption()!r}?)")
    return scene


def try_parse_caption(caption: str) -> Scene | None:
    try:
        return parse_caption(caption)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------
def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.9  # equal area to the eye: a square of half-side r looks bigger than a circle of radius r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        h = r * 1.15
        draw.polygon([(cx, cy - h), (cx - h, cy + h * 0.8), (cx + h, cy + h * 0.8)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw ``scene`` (a 32x32 RGB image); ``rng`` jitters sizes and positions."""
    s = _SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    radius = SIZE_RADIUS[scene.size] * rng.uniform(0.9, 1.1)
    if scene.count > 1:  # several large objects must still fit side by side
        radius = min(radius, 5.5 * rng.uniform(0.95, 1.05))
    if scene.position is not None:
        fx, fy = POSITION_CENTERS[scene.position]
        centers = [(fx * IMAGE_SIZE + rng.uniform(-1.5, 1.5), fy * IMAGE_SIZE + rng.uniform(-1.5, 1.5))]
    else:
        # Several objects go to distinct quadrants, jittered as far as keeps a gap between their boxes.
        extent = 1.15 * radius  # the largest half-extent of any shape (the triangle's)
        jitter = max(0.0, (IMAGE_SIZE / 2 - 2 * extent - 1.5) / 2)
        quadrants = rng.sample([(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)], scene.count)
        centers = [
            (fx * IMAGE_SIZE + rng.uniform(-jitter, jitter), fy * IMAGE_SIZE + rng.uniform(-jitter, jitter))
            for fx, fy in quadrants
        ]
    for cx, cy in centers:
        _draw_shape(draw, scene.shape, cx * s, cy * s, radius * s, COLORS[scene.color])
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def sample_scene(rng: random.Random, split: str = "train") -> Scene:
    """A random scene of ``split``: 1, 2 or 3 objects with probabilities 1/2, 1/4, 1/4, the rest uniform."""
    if split not in SPLITS:
        raise ValueError(f"unknown toy split {split!r}; expected one of {', '.join(SPLITS)}")
    while True:
        count = rng.choices(COUNTS, weights=(2, 1, 1))[0]
        scene = Scene(count, rng.choice(SIZES), rng.choice(tuple(COLORS)), rng.choice(SHAPES),
                      rng.choice(POSITIONS) if count == 1 else None, rng.choice(tuple(BACKGROUNDS)))
        if is_heldout(scene) == (split == "heldout"):
            return scene


def make_dataset(n: int, seed: int = 0, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    """``n`` rendered scenes of ``split``: images uint8 [n, 3, 32, 32] and their captions, fixed by
    ``seed``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"diffalign-toy-{split}-{seed}")
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        scene = sample_scene(rng, split)
        images[i] = np.asarray(render(scene, rng))
        captions.append(scene.caption())
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def palette(kind: str = "all") -> tuple[list[str], torch.Tensor]:
    """Names and RGB values in [0, 1] ([K, 3]) of the object colours, the backgrounds, or both."""
    table = {"objects": COLORS, "backgrounds": BACKGROUNDS, "all": COLORS | BACKGROUNDS}[kind]
    return list(table), torch.tensor(list(table.values()), dtype=torch.float32) / 255.0
