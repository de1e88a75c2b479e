"""The toy GenEval of a model, and of its change against a base model on the same noise.

For each split and seed, ``num_prompts`` captions of the split are drawn for that seed (all of them, in an
order of the seed, when ``num_prompts`` is at least the split's size); image ``i`` of seed ``s`` gets the
noise seed ``s * SEED_STRIDE + i`` for *every* model, so the model and the base are compared image by image.
Each image is read by the ``toy_geneval`` reward (:class:`diffalign.scorers.toy.ToyGenEval`, the reader of
``diffalign toy eval``): per named attribute 1/0 (for clips: the fraction of frames, and the motion 1/0),
and ``all`` (GenEval's score: every named attribute right).

Intervals are 95 % percentile bootstraps that resample *captions* (all seeds of a caption together), since
images of one caption are not independent draws; the change against the base resamples the paired
per-image differences the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from diffalign.models import load_pipeline
from diffalign.sampler import sample
from diffalign.scorers.toy import ToyGenEval
from diffalign.toy import data, video_data
from diffalign.toy.evaluate import ATTRIBUTES, chance_levels
from diffalign.toy.video_evaluate import VIDEO_ATTRIBUTES, video_chance_levels

#: Noise seed of image ``i`` for evaluation seed ``s``: ``s * SEED_STRIDE + i`` (seed 0 is
#: ``caption_accuracy``'s).
SEED_STRIDE = 100_000
BOOTSTRAP_DRAWS = 2000


@dataclass
class GenEvalSettings:
    """What decides the images (the same for the model and the base)."""

    splits: list[str] = field(default_factory=lambda: ["heldout"])
    seeds: list[int] = field(default_factory=lambda: [0])
    num_prompts: int | None = None  # None: every caption of the split
    num_steps: int = 20
    guidance_scale: float = 3.0
    eta: float = 1.0
    batch_size: int = 32

    def __post_init__(self):
        for split in self.splits:
            if split not in data.SPLITS:
                raise ValueError(f"unknown toy split {split!r}; expected one of {', '.join(data.SPLITS)}")
        if not self.splits or not self.seeds:
            raise ValueError("the toy GenEval needs at least one split and one seed")
        if len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct and >= 0, got {self.seeds}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.num_steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"num_steps and batch_size must be >= 1, got {self.num_steps} and {self.batch_size}"
            )


def is_video_pipeline(pipe) -> bool:
    return type(pipe).__name__ == "AnimateDiffPipeline"


def split_captions(split: str, num_prompts: int | None, seed: int, video: bool) -> list[str]:
    """The captions of ``split`` evaluated for ``seed`` (image or clip captions)."""
    captions = video_data.video_prompts(split) if video else data.toy_prompts(split)
    return data.draw_captions(captions, num_prompts or len(captions), seed)


def sample_hits(pipe, captions: Sequence[str], noise_seeds: Sequence[int], settings: GenEvalSettings,
                progress=None, scorers: Mapping[str, object] | None = None) -> tuple[list[dict], dict]:
    """Sample one image (clip) per caption with its noise seed and read its attributes.

    Returns the per-image hits and ``{name: [score per image]}`` of the same images by ``scorers``
    (``{name: Scorer}``, none by default) (e.g. ``toy_saturation``, to see whether a reward is being hacked).
    """
    reader = ToyGenEval()
    rows: list[dict[str, float]] = []
    scores: dict[str, list[float]] = {name: [] for name in scorers or {}}
    for start in range(0, len(captions), settings.batch_size):
        chunk = list(captions[start : start + settings.batch_size])
        images = sample(
            pipe,
            chunk,
            seeds=list(noise_seeds[start : start + len(chunk)]),
            num_steps=settings.num_steps,
            guidance_scale=settings.guidance_scale,
            eta=settings.eta,
        ).images
        rows += reader.hits(images, chunk)
        for name, scorer in (scorers or {}).items():
            scores[name] += scorer(images, chunk).tolist()
        if progress is not None:
            progress.update(len(chunk))
    return rows, scores


def with_all(row: Mapping[str, float]) -> dict[str, float]:
    return {**row, "all": float(all(v == 1.0 for v in row.values()))}


def bootstrap_mean(values: np.ndarray, clusters: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
                   seed: int = 0) -> dict[str, float]:
    """Mean of ``values`` and its 95 % interval, resampling whole ``clusters`` (caption ids) with
    replacement."""
    ids, inverse = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    pick = np.random.default_rng(seed).integers(0, len(ids), size=(draws, len(ids)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high)}


def summarize_rows(rows: Sequence[Mapping[str, float]], captions: Sequence[str], names: Sequence[str],
                   base_rows: Sequence[Mapping[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """Per attribute (and ``all``): mean with its interval over the images naming it; with ``base_rows``
    (the same captions and noise), the mean paired change instead."""
    out = {}
    for name in (*names, "all"):
        keep = [i for i, row in enumerate(rows) if name in row]
        if not keep:
            continue
        values = np.array([rows[i][name] for i in keep], dtype=np.float64)
        if base_rows is not None:
            values = values - np.array([base_rows[i][name] for i in keep], dtype=np.float64)
        out[name] = bootstrap_mean(values, np.array([captions[i] for i in keep]))
    return out


def toy_geneval(models: Mapping[str, object], settings: GenEvalSettings, base: str | None = None,
                progress: bool | None = None, scorers: Mapping[str, object] | None = None) -> dict:
    """Evaluate ``models`` (``{label: pipeline}``, all image or all video pipelines) on the same captions and
    noise.

    Returns ``{"settings", "video", "splits": {split: {"n", "captions", "accuracy": {label: {attribute:
    {mean, low, high}}}, "change": {label: {...}} (against ``base``, one of the labels), "chance"}}, "images":
    [{split, seed, caption, noise_seed, label: hits, ...}]}``; with ``scorers`` (``{name: Scorer}``) also
    ``"scores": {label: {name: mean}}`` per split, over the same images. ``progress`` None: a bar on a
    terminal only.
    """
    video = {is_video_pipeline(pipe) for pipe in models.values()}
    if len(video) != 1:
        raise ValueError(
            "the toy GenEval compares image models with image models and video with video: got both"
        )
    video = video.pop()
    if base is not None and base not in models:
        raise ValueError(f"base {base!r} is not one of the models {list(models)}")
    names = VIDEO_ATTRIBUTES if video else ATTRIBUTES
    jobs = {(split, seed): split_captions(split, settings.num_prompts, seed, video)
            for split in settings.splits for seed in settings.seeds}
    images = []
    bar = tqdm(total=len(models) * sum(map(len, jobs.values())), desc="toy geneval", unit="image",
               disable=None if progress is None else not progress)
    with bar:
        for (split, seed), captions in jobs.items():
            noise = [seed * SEED_STRIDE + i for i in range(len(captions))]
            hits, scores = {}, {}
            for label, pipe in models.items():
                bar.set_postfix_str(f"{label} {split} seed {seed}")
                hits[label], scores[label] = sample_hits(pipe, captions, noise, settings, progress=bar,
                                                         scorers=scorers)
            images += [
                {
                    "split": split,
                    "seed": seed,
                    "caption": c,
                    "noise_seed": n,
                    **{label: with_all(hits[label][i]) for label in models},
                    **(
                        {"scores": {label: {k: v[i] for k, v in scores[label].items()} for label in models}}
                        if scorers
                        else {}
                    ),
                }
                for i, (c, n) in enumerate(zip(captions, noise, strict=True))
            ]
    chance = video_chance_levels() if video else chance_levels()
    report = {"settings": asdict(settings), "video": video, "base": base, "splits": {}, "images": images}
    for split in settings.splits:
        rows = [r for r in images if r["split"] == split]
        captions = [r["caption"] for r in rows]
        entry = {
            "n": len(rows),
            "captions": len(set(captions)),
            "chance": chance,
            "accuracy": {
                label: summarize_rows([r[label] for r in rows], captions, names) for label in models
            },
        }
        if base is not None:
            entry["change"] = {label: summarize_rows([r[label] for r in rows], captions, names,
                                                     base_rows=[r[base] for r in rows])
                               for label in models if label != base}
        if scorers:
            entry["scores"] = {label: {name: float(np.mean([r["scores"][label][name] for r in rows]))
                                       for name in scorers} for label in models}
        report["splits"][split] = entry
    return report


def format_report(report: dict, labels: Mapping[str, str]) -> str:
    """The report as text tables: one per split, a row per attribute (``labels``: label -> model spec)."""
    lines = []
    s = report["settings"]
    base = report["base"]
    for split, entry in report["splits"].items():
        lines.append(f"toy GenEval, {split} split: {entry['n']} {'clips' if report['video'] else 'images'} "
                     f"({entry['captions']} captions x seeds {s['seeds']}; {s['num_steps']} steps, guidance "
                     f"{s['guidance_scale']:g}, eta {s['eta']:g}); mean [95 % interval]")
        for label, spec in labels.items():
            lines.append(f"  {label}: {spec}")
        header = f"  {'attribute':<11} {'chance':>6}" + "".join(f"  {label:>22}" for label in labels)
        changes = [label for label in labels if label != base] if base is not None else []
        header += "".join(f"  {'change ' + label:>24}" for label in changes)
        lines.append(header)
        for name in entry["accuracy"][next(iter(labels))]:
            row = f"  {name:<11} {entry['chance'][name]:6.3f}"
            row += "".join(f"  {_interval(entry['accuracy'][label][name]):>22}" for label in labels)
            row += "".join(
                f"  {_interval(entry['change'][label][name], signed=True):>24}" for label in changes
            )
            lines.append(row)
    return "\n".join(lines)


def _interval(stat: Mapping[str, float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(stat['mean'])} [{f.format(stat['low'])}, {f.format(stat['high'])}]"


def load_models(specs: Mapping[str, str], device=None) -> dict:
    """``{label: spec}`` -> ``{label: pipeline}`` (model specs: an id, a folder, or ``RUN:lora``)."""
    pipes = {}
    for label, spec in specs.items():
        pipe = load_pipeline(spec, device=device)
        pipe.set_progress_bar_config(disable=True)
        pipes[label] = pipe
    return pipes


__all__ = ["GenEvalSettings", "SEED_STRIDE", "bootstrap_mean", "format_report", "load_models", "sample_hits",
           "split_captions", "summarize_rows", "toy_geneval"]
