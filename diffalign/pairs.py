"""AI-feedback preference pairs (``diffalign pairs --model M --prompts FILE --scorer S --out DIR``).

For each prompt the shared sampler (:func:`diffalign.sampling.sample_batches`) draws ``images_per_prompt``
images (image ``j`` of prompt ``i`` gets seed ``seed + i * images_per_prompt + j``); a registered
scorer ranks them, and the best and the worst become a (chosen, rejected) pair. Prompts whose best and
worst scores differ by no more than ``min_margin`` give no pair (a tie). The output folder holds
``images/`` and ``pairs.jsonl`` (``prompt``, ``chosen``, ``rejected`` paths relative to the folder, plus
scores and seeds), the JSONL format :mod:`diffalign.data` reads, and ``info.json`` with the settings.
Video models (AnimateDiff, Wan; ``num_frames``) are scored frame-averaged and write ``videos/*.webp``
(lossless animated WebP) instead of ``images/``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffalign.images import to_pil
from diffalign.sampling import SamplingSettings, sample_batches
from diffalign.video import save_video

log = logging.getLogger("diffalign.pairs")

#: Steps and guidance of ``pairs`` when neither the call nor the model says.
PAIRS_NUM_STEPS = 20
PAIRS_GUIDANCE = 5.0


def generate_pairs(
    pipe,
    prompts: list[str],
    scorer,
    out: str | Path,
    *,
    images_per_prompt: int = 2,
    sampling: SamplingSettings | None = None,
    seed: int = 0,
    batch_size: int = 8,
    min_margin: float = 0.0,
    model_name: str = "",
    progress: bool = True,
) -> dict:
    """Sample, score and pair; returns the summary written to ``info.json``. Unset ``sampling`` fields take
    the model's own defaults (``model_name``'s if it is a built-in model), else 20 steps and guidance 5."""
    if images_per_prompt < 2:
        raise ValueError(f"images_per_prompt must be >= 2 to form a pair, got {images_per_prompt}")
    if not prompts:
        raise ValueError("no prompts given")
    sampling = (sampling or SamplingSettings()).for_model_name(model_name, num_steps=PAIRS_NUM_STEPS,
                                                                guidance_scale=PAIRS_GUIDANCE)
    sampling.check()
    out = Path(out)
    jobs = [
        (i, j, p, seed + i * images_per_prompt + j)
        for i, p in enumerate(prompts)
        for j in range(images_per_prompt)
    ]
    scores = torch.empty(len(prompts), images_per_prompt)
    images: dict[tuple[int, int], object] = {}
    batches = sample_batches(
        pipe,
        [p for _, _, p, _ in jobs],
        [s for *_, s in jobs],
        sampling,
        batch_size=batch_size,
        model_name=model_name,
    )
    for start, result in tqdm(
        batches,
        total=math.ceil(len(jobs) / batch_size),
        desc="sampling pairs",
        unit="batch",
        disable=not progress,
    ):
        chunk = jobs[start : start + batch_size]
        values = scorer.score(result.images, [p for _, _, p, _ in chunk])
        if not torch.isfinite(values).all():
            bad = [chunk[k][2] for k in torch.nonzero(~torch.isfinite(values)).flatten().tolist()]
            raise ValueError(f"scorer {scorer.name!r} returned non-finite scores for prompts {bad[:3]}")
        sign = 1.0 if scorer.higher_is_better else -1.0
        media = (
            result.images if result.images.ndim == 5 else to_pil(result.images)
        )  # videos stay [F, 3, H, W]
        for (i, j, _, _), value, image in zip(chunk, values.tolist(), media, strict=True):
            scores[i, j] = sign * value
            images[(i, j)] = image
    rows, ties = [], 0
    for i, prompt in enumerate(prompts):
        best, worst = int(scores[i].argmax()), int(scores[i].argmin())
        if float(scores[i, best] - scores[i, worst]) <= min_margin:
            ties += 1
            continue
        names = []
        for j in (best, worst):
            if isinstance(images[(i, j)], torch.Tensor):
                (out / "videos").mkdir(parents=True, exist_ok=True)
                name = f"videos/{i:05d}_{j}.webp"
                save_video(images[(i, j)], out / name, formats=("webp",))
            else:
                (out / "images").mkdir(parents=True, exist_ok=True)
                name = f"images/{i:05d}_{j}.png"
                images[(i, j)].save(out / name)
            names.append(name)
        rows.append(
            {
                "prompt": prompt,
                "chosen": names[0],
                "rejected": names[1],
                "chosen_score": sign * float(scores[i, best]),
                "rejected_score": sign * float(scores[i, worst]),
                "chosen_seed": seed + i * images_per_prompt + best,
                "rejected_seed": seed + i * images_per_prompt + worst,
                "scorer": scorer.name,
            }
        )
    if not rows:
        raise ValueError(
            f"all {len(prompts)} prompts gave ties under scorer {scorer.name!r} (margin <= {min_margin})"
        )
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    info = {
        "model": model_name,
        "scorer": scorer.name,
        "prompts": len(prompts),
        "pairs": len(rows),
        "ties": ties,
        "images_per_prompt": images_per_prompt,
        **asdict(sampling),
        "seed": seed,
        "min_margin": min_margin,
        "mean_chosen_score": sum(r["chosen_score"] for r in rows) / len(rows),
        "mean_rejected_score": sum(r["rejected_score"] for r in rows) / len(rows),
    }
    (out / "info.json").write_text(json.dumps(info, indent=1))
    return info
