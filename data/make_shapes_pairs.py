"""Write the small preference set the tiny configs train on (data/shapes-pairs/).

Each pair: a caption like "a red circle on a blue background"; the chosen image draws it, the rejected
image draws the same shape with the colours swapped. Deterministic; PNG, 64x64.
Run: python data/make_shapes_pairs.py
"""

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (235, 210, 40),
          "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, fg, bg, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(image)
    m = size // 5
    if shape == "circle":
        d.ellipse([m, m, size - m, size - m], fill=fg)
    elif shape == "square":
        d.rectangle([m, m, size - m, size - m], fill=fg)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fg)
    return image


def main(out: Path = Path(__file__).parent / "shapes-pairs", n: int = 24) -> None:
    rng = random.Random(0)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        fg, bg = rng.sample(sorted(COLORS), 2)
        caption = f"a {fg} {shape} on a {bg} background"
        chosen, rejected = f"images/{i:03d}_chosen.png", f"images/{i:03d}_rejected.png"
        draw(shape, COLORS[fg], COLORS[bg]).save(out / chosen)
        draw(shape, COLORS[bg], COLORS[fg]).save(out / rejected)
        rows.append({"prompt": caption, "chosen": chosen, "rejected": rejected})
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
