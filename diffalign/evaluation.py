"""The trainer's held-out evaluation (same prompts, same seeds, base vs tuned) and its validation samples.

Sampling settings come from the config's ``eval`` section as one
:class:`~diffalign.sampling.SamplingSettings`; every (prompt, seed) is drawn with its own seed, so the
base and the tuned model see the same noise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from diffalign.config import Config, EvalConfig
from diffalign.families import family_of
from diffalign.gallery import run_gallery
from diffalign.images import to_pil
from diffalign.prompts import read_prompts
from diffalign.sampling import SamplingSettings, sample_many
from diffalign.video import save_video

log = logging.getLogger("diffalign.train")


def eval_prompts(cfg: Config) -> list[str]:
    if cfg.eval.prompts:
        return list(cfg.eval.prompts)
    if cfg.eval.prompts_file:
        return read_prompts(cfg.eval.prompts_file)
    return list(cfg.log.validation_prompts)


def eval_sampling(pipe, ev: EvalConfig) -> SamplingSettings:
    """``eval``'s sampling settings; ``num_frames`` only for a video pipeline (unset: the pipeline's)."""
    settings = ev.sampling()
    if not family_of(pipe).video:
        settings.num_frames = None
    return settings


def generate_and_score(pipe, prompts: list[str], seeds: list[int], scorers, ev: EvalConfig,
                       out_dir: Path | None) -> dict:
    """Sample every (prompt, seed), save PNGs (videos: animated WebPs) to ``out_dir`` when given, and
    score them (image scorers average over a video's frames)."""
    jobs = [(p, s) for p in prompts for s in seeds]
    images = sample_many(pipe, [p for p, _ in jobs], [s for _, s in jobs], eval_sampling(pipe, ev),
                         batch_size=ev.batch_size).images
    scores = {s.name: s.score(images, [p for p, _ in jobs]).tolist() for s in scorers}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        media = images if images.ndim == 5 else to_pil(images)
        for i, ((prompt, seed), item) in enumerate(zip(jobs, media, strict=True)):
            if images.ndim == 5:
                file = save_video(item, out_dir / f"{i:04d}", formats=("webp",))[0].name
            else:
                file = f"{i:04d}.png"
                item.save(out_dir / file)
            rows.append({"file": file, "prompt": prompt, "seed": seed,
                         "scores": {name: values[i] for name, values in scores.items()}})
        (out_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"jobs": jobs, "images": images, "scores": scores}


def compare_before_after(out: Path, prompts: list[str], seeds: list[int], before: dict, after: dict,
                         train_pairs: dict) -> dict:
    """Write ``eval/scores.json`` and ``eval/base_vs_tuned.png``; log and return the comparison."""
    evaluation = {"prompts": prompts, "seeds": seeds, "scorers": {}, "train_pairs": train_pairs}
    for name in before["scores"]:
        b, a = before["scores"][name], after["scores"][name]
        evaluation["scorers"][name] = {"base_mean": sum(b) / len(b), "tuned_mean": sum(a) / len(a),
                                       "delta": (sum(a) - sum(b)) / len(a), "base": b, "tuned": a}
    (out / "eval" / "scores.json").write_text(json.dumps(evaluation, indent=1))
    image_grid([before["images"], after["images"]], out / "eval" / "base_vs_tuned.png")
    for name, row in evaluation["scorers"].items():
        log.info("held-out %s: base %.5g -> tuned %.5g (%+.5g)", name, row["base_mean"], row["tuned_mean"],
                 row["delta"])
    return evaluation


def validate(pipe, cfg: Config, out: Path, step: int) -> dict[str, float]:
    """The validation grid of ``step`` (``validation/step-N.png``) and, with ``log.validation_gallery``, a
    small scored gallery; returns the gallery's mean scores to log ({} without one)."""
    result = generate_and_score(pipe, cfg.log.validation_prompts, cfg.eval.seeds[:1], [], cfg.eval, None)
    (out / "validation").mkdir(exist_ok=True)
    image_grid([result["images"]], out / "validation" / f"step-{step:06d}.png")
    if not cfg.log.validation_gallery:
        return {}
    return validation_gallery(pipe, cfg, out / "validation" / f"gallery-step-{step:06d}", step)


def validation_gallery(pipe, cfg: Config, out_dir: Path, step: int) -> dict[str, float]:
    """A small gallery of the current model (page, scores.csv, summary.json); returns its mean scores."""
    ev, name = cfg.eval, f"step-{step}"
    summary = run_gallery({name: pipe}, cfg.log.validation_prompts, ev.scorers, out_dir,
                          images_per_prompt=len(ev.seeds), seed=ev.seeds[0], sampling=eval_sampling(pipe, ev),
                          batch_size=ev.batch_size, progress=False)
    means = summary["stats"]["means"].get(name, {})
    return {f"validation/{scorer}": value["mean"] for scorer, value in means.items()}


def image_grid(rows: list[torch.Tensor], path: Path) -> None:
    """Save a grid: one row per tensor batch [N, 3, H, W] (videos [N, F, 3, H, W]: a clip's frames side by
    side)."""
    rows = [torch.cat(r.unbind(1), dim=3) if r.ndim == 5 else r for r in rows]
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    to_pil(grid.unsqueeze(0))[0].save(path)
