"""Figures of an evaluation you can read at a glance: a labelled before/after grid and a curve over steps.

- :func:`before_after_grid`: one cell per (prompt, seed), the models' images (same noise) one above the
  other, enlarged without smoothing; over each image "all right" or "N wrong", under it its named checks as
  ticks and crosses (a scorer's ``hits``, e.g. ``toy_geneval``'s colour / shape / count ...) and its
  scores, and the caption under the cell.
- :func:`score_curve`: each scorer's held-out mean over training steps (matplotlib), with its named
  checks as thinner lines.

Both only draw what they are given; the trainer's evaluation (:mod:`diffalign.evaluation`) computes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from diffalign.images import to_pil

#: Short names of named checks, so three fit on a line under an image.
SHORT_NAMES = {"background": "bg", "position": "pos", "direction": "motion"}
RIGHT, WRONG, INK, PAPER = (0, 140, 60), (200, 30, 30), (20, 20, 20), (255, 255, 255)


def _font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped with matplotlib: it has the tick and cross glyphs PIL's own font lacks)."""
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def _mark_lines(checks: Mapping[str, float], font, width: int) -> list[list[tuple[str, tuple]]]:
    """``{name: 1/0 (or a fraction)}`` -> lines of (text, colour) pieces: "✓colour", "✗count" ..."""
    lines: list[list[tuple[str, tuple]]] = [[]]
    used = 0.0
    for name, value in checks.items():
        piece = ("✓" if value >= 1.0 else "✗") + SHORT_NAMES.get(name, name) + " "
        size = font.getlength(piece)
        if lines[-1] and used + size > width:
            lines.append([])
            used = 0.0
        lines[-1].append((piece, RIGHT if value >= 1.0 else WRONG))
        used += size
    return lines


def before_after_grid(images: Mapping[str, torch.Tensor], captions: Sequence[str], path: str | Path, *,
                      checks: Mapping[str, Sequence[Mapping[str, float]]] | None = None,
                      scores: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                      tile: int = 160, columns: int = 8, font_size: int = 11) -> Path:
    """Save a grid of ``images`` (``{model: [N, 3, H, W]}``, the same N captions and noise for every
    model): cell ``i`` holds every model's image ``i`` top to bottom, each with its label, its ``checks``
    (``{model: [{name: 1/0} per image]}``, drawn as ticks / crosses), its ``scores`` (``{model: {scorer:
    [value per image]}}``), and ``captions[i]`` under the cell."""
    labels = list(images)
    n = len(captions)
    if any(len(images[label]) != n for label in labels):
        raise ValueError(f"before_after_grid: every model needs {n} images, one per caption")
    font, bold = _font(font_size), _font(font_size + 1)
    line = font_size + 4
    pad = 6
    text_width = tile - 2
    pils = {label: [im.resize((tile, tile), Image.NEAREST) for im in to_pil(images[label])]
            for label in labels}

    def notes(label: str, i: int) -> list[list[tuple[str, tuple]]]:
        marks = _mark_lines(checks[label][i], font, text_width) if checks and label in checks else []
        values = (scores or {}).get(label, {})
        return marks + [[(f"{name} {vals[i]:.4g}", INK)] for name, vals in values.items()]

    blocks = [[notes(label, i) for label in labels] for i in range(n)]
    caption_lines = [_wrap(c, font, text_width) for c in captions]
    # every cell of a grid row is as tall as its tallest
    note_height = max((len(b) for cell in blocks for b in cell), default=0) * line
    caption_height = max(map(len, caption_lines), default=1) * line
    cell_height = len(labels) * (line + tile + note_height + 4) + caption_height
    rows = -(-n // columns)
    width = min(n, columns) * (tile + pad) + pad
    canvas = Image.new("RGB", (width, rows * (cell_height + 2 * pad) + pad), PAPER)
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x = pad + (i % columns) * (tile + pad)
        y = pad + (i // columns) * (cell_height + 2 * pad)
        for label, block in zip(labels, blocks[i], strict=True):
            draw.text((x, y), label, font=bold, fill=INK)
            if checks and label in checks:  # the GenEval verdict: every named check right, or how many not
                wrong = sum(v < 1.0 for v in checks[label][i].values())
                draw.text((x + bold.getlength(label + "  "), y), f"{wrong} wrong" if wrong else "all right",
                          font=bold, fill=WRONG if wrong else RIGHT)
            y += line
            canvas.paste(pils[label][i], (x, y))
            y += tile + 2
            for pieces in block:
                cursor = x
                for text, colour in pieces:
                    draw.text((cursor, y), text, font=font, fill=colour)
                    cursor += font.getlength(text)
                y += line
            y += note_height - len(block) * line + 2  # a gap before the next model's label
        for text in caption_lines[i]:
            draw.text((x, y), text, font=font, fill=INK)
            y += line
    path = Path(path)
    canvas.save(path)
    return path


def score_curve(points: Sequence[Mapping], path: str | Path, title: str = "") -> Path:
    """Plot ``points`` (``[{"step", "scores": {scorer: mean}, "checks": {scorer: {name: mean}}}]``, in step
    order): one panel per scorer, its mean bold and its named checks (if any) as thinner lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorers = list(points[0]["scores"]) if points else []
    if not scorers:
        raise ValueError("score_curve: no scores to plot")
    steps = [p["step"] for p in points]
    fig, axes = plt.subplots(1, len(scorers), figsize=(5.2 * len(scorers), 3.8), dpi=110, squeeze=False)
    for ax, scorer in zip(axes[0], scorers, strict=True):
        names = list(points[0].get("checks", {}).get(scorer, {}))
        for name in names:
            ax.plot(steps, [p["checks"][scorer][name] for p in points], lw=1, alpha=0.7, marker=".",
                    label=name)
        ax.plot(steps, [p["scores"][scorer] for p in points], lw=2.4, color="black", marker="o", label=scorer)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{scorer} (held-out mean)")
        ax.grid(alpha=0.3)
        if names:
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.suptitle(title or "held-out evaluation over training", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
