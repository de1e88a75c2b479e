"""The trainer's held-out evaluation (same prompts, same seeds, base vs tuned) and its validation samples.

Sampling settings come from the config's ``eval`` section as one
:class:`~diffalign.sampling.SamplingSettings`; every (prompt, seed) is drawn with its own seed, so the
base and the tuned model see the same noise (``eval.noise_per_prompt``: each prompt its own too). What it
writes under ``eval/``:

- ``base/``, ``tuned/`` (samples + ``samples.jsonl``), ``scores.json``, ``base_vs_tuned.png`` (the raw
  strip) and, for images, ``before_after.png``: each held-out caption under its base and tuned image,
  enlarged, with the named checks of scorers that have them (``toy_geneval``: ticks and crosses per
  attribute) or the scores;
- with ``eval.every_n_steps``, ``curve.json`` / ``curve.png``: the held-out means (and named checks) at
  step 0, every N steps and after training (:class:`HeldOutCurve`);
- with ``eval.gallery``, ``gallery/index.html``: the gallery page of base vs tuned on the held-out prompts
  (:func:`gallery_of_base` before training, :func:`gallery_base_vs_tuned` after).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from diffalign.config import Config, EvalConfig
from diffalign.families import family_of
from diffalign.figures import before_after_grid, score_curve
from diffalign.gallery import run_gallery
from diffalign.images import to_pil
from diffalign.prompts import read_prompts
from diffalign.sampling import SamplingSettings, sample_many
from diffalign.video import save_video

log = logging.getLogger("diffalign.train")

#: With ``eval.noise_per_prompt``, prompt ``i`` of seed ``s`` draws the noise seed ``s * NOISE_STRIDE + i``
#: (the toy GenEval's, :data:`diffalign.toy.geneval.SEED_STRIDE`): every caption its own noise.
NOISE_STRIDE = 100_000
#: (prompt, seed) cells of the labelled before/after grid (the first ones of the evaluation).
GRID_CELLS = 32


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
    score them (image scorers average over a video's frames); ``checks``: per image, the named checks of
    the scorers that have them (:meth:`~diffalign.scorers.Scorer.hits`)."""
    jobs = [(p, s * NOISE_STRIDE + i if ev.noise_per_prompt else s)
            for i, p in enumerate(prompts) for s in seeds]
    images = sample_many(pipe, [p for p, _ in jobs], [s for _, s in jobs], eval_sampling(pipe, ev),
                         batch_size=ev.batch_size).images
    captions = [p for p, _ in jobs]
    scores = {s.name: s.score(images, captions).tolist() for s in scorers}
    checks = {s.name: rows for s in scorers if (rows := s.hits(images, captions)) is not None}
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
    return {"jobs": jobs, "images": images, "scores": scores, "checks": checks}


def mean_checks(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each named check's mean over the images that have it (position: single objects only)."""
    names = dict.fromkeys(name for row in rows for name in row)
    return {name: sum(r[name] for r in rows if name in r) / sum(name in r for r in rows) for name in names}


def summary_of(result: dict) -> dict:
    """The means of one evaluation: ``{"scores": {scorer: mean}, "checks": {scorer: {name: mean}}}``."""
    return {"scores": {name: sum(v) / len(v) for name, v in result["scores"].items()},
            "checks": {name: mean_checks(rows) for name, rows in result["checks"].items()}}


def compare_before_after(out: Path, prompts: list[str], seeds: list[int], before: dict, after: dict,
                         train_pairs: dict) -> dict:
    """Write ``eval/scores.json`` and ``eval/base_vs_tuned.png``; log and return the comparison."""
    evaluation = {"prompts": prompts, "seeds": seeds, "scorers": {}, "train_pairs": train_pairs}
    for name in before["scores"]:
        b, a = before["scores"][name], after["scores"][name]
        evaluation["scorers"][name] = {"base_mean": sum(b) / len(b), "tuned_mean": sum(a) / len(a),
                                       "delta": (sum(a) - sum(b)) / len(a), "base": b, "tuned": a}
    for name in before["checks"]:
        evaluation["scorers"][name]["checks"] = {"base": mean_checks(before["checks"][name]),
                                                 "tuned": mean_checks(after["checks"][name])}
    (out / "eval" / "scores.json").write_text(json.dumps(evaluation, indent=1))
    image_grid([before["images"], after["images"]], out / "eval" / "base_vs_tuned.png")
    if before["images"].ndim == 4:  # images (a clip's frames do not fit a cell)
        labelled_grid({"base": before, "tuned": after}, out / "eval" / "before_after.png")
    for name, row in evaluation["scorers"].items():
        log.info("held-out %s: base %.5g -> tuned %.5g (%+.5g)", name, row["base_mean"], row["tuned_mean"],
                 row["delta"])
    return evaluation


def labelled_grid(results: dict[str, dict], path: Path, cells: int = GRID_CELLS) -> Path:
    """The first ``cells`` (prompt, seed) images of each result (same jobs) with their captions, the
    named checks of the first scorer that has them as ticks and crosses, and the other scorers' values."""
    first = next(iter(results.values()))
    named = next(iter(first["checks"]), None)
    return before_after_grid(
        {label: r["images"][:cells] for label, r in results.items()},
        [p for p, _ in first["jobs"][:cells]],
        path,
        checks={label: r["checks"][named][:cells] for label, r in results.items()} if named else None,
        scores={label: {k: v[:cells] for k, v in r["scores"].items() if k != named}
                for label, r in results.items()},
    )


class HeldOutCurve:
    """The held-out evaluation over training (``eval.every_n_steps``): step 0 is the base model's, then
    every N steps the current model's, and last the exported model's; each point is logged to
    ``metrics.jsonl`` as ``heldout/<scorer>`` and the whole curve rewritten to ``eval/curve.json`` and
    ``eval/curve.png``. A resumed run keeps the points its earlier part wrote up to where it resumes."""

    def __init__(self, folder: Path, base: dict, resumed_at: int = 0):
        self.path = folder / "curve.json"
        earlier = json.loads(self.path.read_text())["points"] if resumed_at and self.path.is_file() else []
        self.points = [{"step": 0, **summary_of(base)}]
        self.points += [p for p in earlier if 0 < p["step"] <= resumed_at]
        self.write()

    def add(self, step: int, result: dict) -> dict[str, float]:
        """Record the evaluation of ``step``; returns what to log (``heldout/<scorer>`` and per check)."""
        point = {"step": step, **summary_of(result)}
        self.points = [p for p in self.points if p["step"] != step] + [point]
        self.write()
        logged = {f"heldout/{name}": v for name, v in point["scores"].items()}
        for checks in point["checks"].values():
            logged |= {f"heldout/{name}": v for name, v in checks.items()}
        return logged

    def write(self) -> None:
        self.path.write_text(json.dumps({"points": self.points}, indent=1))
        score_curve(self.points, self.path.with_suffix(".png"), "held-out evaluation over training")


def gallery_settings(pipe, ev: EvalConfig) -> dict:
    return {"images_per_prompt": len(ev.seeds), "seed": ev.seeds[0], "sampling": eval_sampling(pipe, ev),
            "batch_size": ev.batch_size, "progress": False}


def gallery_of_base(pipe, prompts: list[str], scorers, ev: EvalConfig, folder: Path) -> None:
    """The base model's half of the gallery (``eval.gallery``), sampled before any update."""
    run_gallery({"base": pipe}, prompts, scorers, folder, write_page=False, **gallery_settings(pipe, ev))


def gallery_base_vs_tuned(pipe, prompts: list[str], scorers, ev: EvalConfig, folder: Path) -> dict:
    """The tuned model's half and the page of both. The gallery resumes from its manifest, where every
    base image is already finished, so ``base`` is not sampled again (the pipeline is the tuned one now)."""
    summary = run_gallery({"base": pipe, "tuned": pipe}, prompts, scorers, folder,
                          **gallery_settings(pipe, ev))
    if summary["generated"].get("base"):
        raise RuntimeError(f"{folder}: the gallery's base images were not all made before training")
    return summary


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
