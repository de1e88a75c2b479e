"""Caption-attribute accuracy: does a sampled image show what its toy caption names?

Each decoded image is read back with simple, fixed image analysis (no learned classifier):

- background: the colour of the border pixels, nearest of the background palette;
- foreground: pixels far from that background colour;
- colour: the most common nearest object-palette colour over the foreground ("dominant non-background
  colour");
- count: connected foreground blobs (ignoring specks);
- size: mean blob area (small vs large);
- shape: how much of its bounding box the largest blob fills (square ~1, circle ~0.79, triangle ~0.5);
- position (single objects only): the nearest named position to the foreground centroid.

The same reader scores the dataset's own renders near 100 %, so the accuracy of a model measures the
model, not the reader. Chance is one over each vocabulary's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffalign.sampling import SamplingSettings, sample_batches
from diffalign.toy import data

#: Foreground = RGB distance (0..1 units) to the background colour above this.
FOREGROUND_DISTANCE = 0.3
MIN_BLOB_AREA = 4
#: Bounding-box fill ratio thresholds: above SQUARE_FILL a square, below TRIANGLE_FILL a triangle.
SQUARE_FILL = 0.875
TRIANGLE_FILL = 0.69
#: Area of each shape over its radius squared (as drawn by ``data.render``), to read a radius off an area.
SHAPE_AREA_FACTOR = {"circle": 3.14, "square": 3.24, "triangle": 2.38}
#: Radius (pixels at 32x32) between small (about 4) and large (5.2 and up) objects.
SIZE_THRESHOLD_RADIUS = 4.75

ATTRIBUTES = ("color", "shape", "background", "size", "count", "position")


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    values = np.asarray(list(table.values()), dtype=np.float32) / 255.0
    return names[int(np.argmin(((values - rgb) ** 2).sum(-1)))]


def read_attributes(image: torch.Tensor) -> dict:
    """The toy attributes visible in one image [3, H, W] in [0, 1] (H, W = 32 expected)."""
    from scipy import ndimage

    x = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    h, w = x.shape[:2]
    border = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    found: dict = {"background": _nearest(bg_rgb, data.BACKGROUNDS)}
    mask = np.sqrt(((x - bg_rgb) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    labels, n = ndimage.label(mask)
    areas = ndimage.sum(mask, labels, index=range(1, n + 1)) if n else np.zeros(0)
    blobs = [i + 1 for i, a in enumerate(areas) if a >= MIN_BLOB_AREA]
    found["count"] = len(blobs)
    if not blobs:
        return found | {"color": None, "shape": None, "size": None, "position": None}
    pixels = x[mask]
    names, values = data.palette("objects")
    nearest = ((pixels[:, None, :] - values.numpy()[None]) ** 2).sum(-1).argmin(1)
    found["color"] = names[int(np.bincount(nearest, minlength=len(names)).argmax())]
    blob_areas = [areas[b - 1] for b in blobs]
    largest = blobs[int(np.argmax(blob_areas))]
    ys, xs = np.nonzero(labels == largest)
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    found["shape"] = "square" if fill > SQUARE_FILL else "triangle" if fill < TRIANGLE_FILL else "circle"
    scale = data.IMAGE_SIZE**2 / (h * w)
    radius = np.sqrt(float(np.mean(blob_areas)) * scale / SHAPE_AREA_FACTOR[found["shape"]])
    found["size"] = "large" if radius > SIZE_THRESHOLD_RADIUS else "small"
    cy, cx = np.nonzero(mask)
    centre = np.array([cx.mean() / w, cy.mean() / h])
    found["position"] = min(
        data.POSITION_CENTERS, key=lambda p: ((np.array(data.POSITION_CENTERS[p]) - centre) ** 2).sum()
    )
    return found


def attribute_hits(images: torch.Tensor, prompts: Sequence[str]) -> list[dict[str, bool]]:
    """Per image, which attributes of its caption it shows (position only for single objects)."""
    rows = []
    for image, prompt in zip(images, prompts, strict=True):
        scene = data.parse_caption(prompt)
        found = read_attributes(image)
        hits = {name: found[name] == getattr(scene, name) for name in ATTRIBUTES if name != "position"}
        if scene.count == 1:
            hits["position"] = found["position"] == scene.position
        rows.append(hits)
    return rows


def chance_levels() -> dict[str, float]:
    levels = {name: 1.0 / len(data.VOCAB[name]) for name in ATTRIBUTES}
    levels["all"] = float(np.prod([levels[n] for n in ATTRIBUTES if n != "position"])) * 0.5 + float(
        np.prod(list(levels.values()))) * 0.5  # half the prompts name a position (count 1)
    return levels


def summarize(rows: list[dict[str, bool]]) -> dict[str, float]:
    accuracy = {}
    for name in ATTRIBUTES:
        values = [r[name] for r in rows if name in r]
        accuracy[name] = float(np.mean(values)) if values else float("nan")
    accuracy["all"] = float(np.mean([all(r.values()) for r in rows]))
    return accuracy


@torch.no_grad()
def caption_accuracy(
    pipe,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 1.0,
    batch_size: int = 32,
) -> dict:
    """Sample one image per prompt (image i gets seed ``seed + i``) and measure caption-attribute accuracy.

    Returns ``{"accuracy": {attribute: fraction}, "chance": {...}, "n": len(prompts)}``; ``"all"`` is the
    fraction of images showing every named attribute.
    """
    prompts = list(prompts)
    for p in prompts:
        data.parse_caption(p)  # reject non-toy prompts before sampling
    settings = SamplingSettings(num_steps=num_steps, guidance_scale=guidance_scale, eta=eta)
    rows = []
    for start, out in sample_batches(pipe, prompts, [seed + i for i in range(len(prompts))], settings,
                                     batch_size=batch_size):
        rows += attribute_hits(out.images, prompts[start : start + batch_size])
    return {"accuracy": summarize(rows), "chance": chance_levels(), "n": len(prompts)}


def dataset_accuracy(n: int = 512, seed: int = 0, split: str = "train") -> dict[str, float]:
    """The reader's accuracy on the dataset's own renders (the ceiling a perfect model would reach)."""
    images, captions = data.make_dataset(n, seed=seed, split=split)
    return summarize(attribute_hits(images.float() / 255.0, captions))
