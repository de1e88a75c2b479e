"""A gallery run: same prompts, same seeds, several models; every image scored, saved once, resumable.

Image ``k`` of prompt ``p`` gets seed ``seed + p * images_per_prompt + k`` for *every* model, and
:func:`diffalign.sampler.sample` draws each image's initial noise (and its per-step noise) from its own
generator, so models are compared on the same noise whatever the batch.

Layout of ``out_dir``::

    manifest.json           settings, prompts, models and finished items (rewritten atomically per batch)
    media/<model>/<p>_<k>.png    one file per (model, prompt, image), written once (videos: animated .webp)
    scores.csv  summary.json  plots/*.png  index.html

An interrupted run resumes from the manifest: finished images are neither regenerated nor rescored.

From a training loop (the models may be pipeline objects, e.g. the policy with its LoRA adapters)::

    summary = run_gallery({"base": "tiny-sdxl", "step_500": pipe}, ["a cat", "a dog"], ["brightness"],
                          out_dir=run_dir / "gallery" / "step_500", images_per_prompt=2,
                          sampling=SamplingSettings(num_steps=20))
    log(summary["stats"]["means"]["step_500"]["brightness"]["mean"])

A pipeline object is used as it is (its device, dtype, adapters and train/eval mode are the caller's)
and is identified only by its name, so give each validation step a fresh ``out_dir``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageSequence
from tqdm.auto import tqdm

from diffalign.families import family_of
from diffalign.files import apply_umask
from diffalign.gallery.page import write_page as write_html
from diffalign.gallery.plots import write_plots
from diffalign.gallery.stats import compute_stats, format_tables
from diffalign.images import to_pil, to_tensor
from diffalign.models import check_num_frames, load_pipeline, parse_dtype, recorded_base, resolve_model
from diffalign.sampling import SamplingSettings, sample_batches
from diffalign.scorers import Scorer, check_scorer_names, make_scorer
from diffalign.usage import default_device

log = logging.getLogger("diffalign.gallery")

MANIFEST_FORMAT = "diffalign.gallery/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One model of a gallery. A LoRA (``lora=True``) is the folder ``source`` loaded on top of ``base``."""

    name: str
    source: str
    lora: bool = False
    base: str | None = None


def parse_model_arg(text: str) -> ModelSpec:
    """``NAME=SOURCE`` or ``NAME=LORA_FOLDER:lora`` (the ``--model`` syntax)."""
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise ValueError(f"--model {text!r}: expected NAME=ID_OR_PATH or NAME=LORA_FOLDER:lora")
    lora = source.endswith(":lora")
    return ModelSpec(name.strip(), source.removesuffix(":lora") if lora else source, lora)


def validate_models(specs: Sequence[ModelSpec], lora_base: str | None = None,
                    preloaded: set[str] = frozenset(), num_frames: int | None = None) -> list[ModelSpec]:
    """Check names and sources without loading anything; give each LoRA its base model.

    A LoRA's base is ``lora_base`` when given, else the base its diffalign run recorded, else the source of
    the first non-LoRA model. Models named
    in ``preloaded`` are pipeline objects: only their names are checked. ``num_frames`` is refused for an
    image model here, before anything loads.
    """
    if not specs:
        raise ValueError("no models given: pass at least one --model NAME=ID_OR_PATH")
    seen = set()
    for spec in specs:
        if not _NAME.match(spec.name):
            raise ValueError(
                f"model name {spec.name!r}: use letters, digits, '_', '.', '-' (it names a folder)"
            )
        if spec.name in seen:
            raise ValueError(f"model name {spec.name!r} is given twice")
        seen.add(spec.name)
    first_model = next((s.source for s in specs if not s.lora and s.name not in preloaded), None)
    if lora_base is not None:
        resolve_model(lora_base)
    out = []
    for spec in specs:
        if spec.name in preloaded:
            out.append(spec)
            continue
        if not spec.lora:
            check_num_frames(resolve_model(spec.source), num_frames, f"num_frames (model {spec.name!r})")
            out.append(spec)
            continue
        folder = Path(spec.source).expanduser()
        explicit = spec.base or lora_base
        if explicit is None and recorded_base(folder) is None:
            explicit = first_model  # a LoRA folder that records no base: the first plain model
        try:
            source = resolve_model(f"{folder}:lora", lora_base=explicit)
        except ValueError as err:
            raise type(err)(f"model {spec.name!r}: {err}") from None
        check_num_frames(source, num_frames, f"num_frames (model {spec.name!r})")
        out.append(ModelSpec(spec.name, str(folder), True, source.name))
    return out


def load_model(spec: ModelSpec, *, dtype="float32", device=None):
    if not spec.lora:
        return load_pipeline(spec.source, dtype=dtype, device=device)
    recorded = recorded_base(Path(spec.source))
    from_record = recorded is not None and resolve_model(recorded[0]).name == spec.base
    return load_pipeline(f"{spec.source}:lora", lora_base=None if from_record else spec.base, dtype=dtype,
                         device=device)


# ----------------------------------------------------------------------------------------------------
# Settings and manifest
# ----------------------------------------------------------------------------------------------------
#: A gallery's steps and guidance when neither the call nor the baseline model says.
GALLERY_NUM_STEPS = 30
GALLERY_GUIDANCE = 5.0


@dataclass
class GallerySettings:
    """Everything that decides the images (a resumed run must use the same)."""

    images_per_prompt: int = 2
    seed: int = 0
    sampling: SamplingSettings = field(default_factory=SamplingSettings)

    def seed_for(self, prompt_index: int, image_index: int) -> int:
        return self.seed + prompt_index * self.images_per_prompt + image_index

    def check(self) -> None:
        if self.images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be >= 1, got {self.images_per_prompt}")
        self.sampling.check()


@dataclass
class Manifest:
    settings: dict
    prompts: list[str]
    models: dict[str, dict] = field(default_factory=dict)  # name -> {source, lora, base, status, error}
    items: dict[str, dict[str, dict]] = field(default_factory=dict)  # name -> "p_k" -> {file, seed, scores}
    scorers: dict[str, dict] = field(default_factory=dict)  # name -> {higher_is_better}

    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves the previous manifest, never half of one."""
        fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": MANIFEST_FORMAT, **asdict(self)}, f, indent=1)
        apply_umask(tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON ({err.msg}); remove it to start the gallery afresh"
            ) from None
        if data.pop("format", None) != MANIFEST_FORMAT:
            raise ValueError(f"{path} is not a diffalign gallery manifest")
        return cls(**data)


def item_key(prompt_index: int, image_index: int) -> str:
    return f"{prompt_index:05d}_{image_index:02d}"


def _open_manifest(out_dir: Path, settings: GallerySettings, prompts: list[str]) -> Manifest:
    path = out_dir / "manifest.json"
    if not path.exists():
        return Manifest(settings=asdict(settings), prompts=list(prompts))
    manifest = Manifest.load(path)
    changed = [k for k, v in asdict(settings).items() if manifest.settings.get(k) != v]
    if changed:
        detail = ", ".join(f"{k}: {manifest.settings.get(k)!r} -> {getattr(settings, k)!r}" for k in changed)
        raise ValueError(f"{out_dir} holds a gallery made with other settings ({detail}); "
                         "use another output folder or the same settings to resume")
    if manifest.prompts != list(prompts):
        raise ValueError(f"{out_dir} holds a gallery of other prompts ({len(manifest.prompts)} there, "
                         f"{len(prompts)} now); use another output folder")
    return manifest


# ----------------------------------------------------------------------------------------------------
# Media
# ----------------------------------------------------------------------------------------------------
def save_media(sample: torch.Tensor, path_stem: Path, fps: int = 8) -> Path:
    """One image [3, H, W] as PNG or one video [F, 3, H, W] as animated WebP (plays inline in a browser).

    Written to a temporary name and renamed, so a file that exists is complete.
    """
    if sample.ndim == 3:
        path, frames = path_stem.with_suffix(".png"), to_pil(sample.unsqueeze(0))
    elif sample.ndim == 4:
        path, frames = path_stem.with_suffix(".anim.webp"), to_pil(sample)
    else:
        raise ValueError(f"expected an image [3, H, W] or a video [F, 3, H, W], got {tuple(sample.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if len(frames) == 1 and sample.ndim == 3:
        frames[0].save(tmp, format="PNG")
    else:
        frames[0].save(tmp, format="WEBP", save_all=True, append_images=frames[1:], duration=int(1000 / fps),
                       loop=0, lossless=True)
    os.replace(tmp, path)
    return path


def load_media(path: Path) -> torch.Tensor:
    """[3, H, W] for an image, [F, 3, H, W] for an animation, floats in [0, 1]."""
    with Image.open(path) as im:
        frames = [to_tensor(f.convert("RGB"))[0] for f in ImageSequence.Iterator(im)]
    return torch.stack(frames) if path.name.endswith(".anim.webp") else frames[0]


def score_media(scorer: Scorer, media: Sequence[torch.Tensor], prompts: Sequence[str]) -> list[float]:
    """Scores of images [3, H, W], or of videos [F, 3, H, W] (the scorer averages over frames)."""
    return scorer.score(torch.stack(list(media)), list(prompts)).tolist()


def quantized(samples: torch.Tensor) -> list[torch.Tensor]:
    """What the saved 8-bit files hold: scores are computed on exactly the pixels written to disk."""
    return [(s.float().clamp(0, 1) * 255).round() / 255 for s in samples]


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------
def run_gallery(
    models: Mapping[str, object] | Sequence[ModelSpec],
    prompts: Sequence[str],
    scorers: Sequence[str | Scorer],
    out_dir: str | Path,
    *,
    images_per_prompt: int = 2,
    seed: int = 0,
    sampling: SamplingSettings | None = None,
    batch_size: int = 4,
    dtype: str = "float32",
    device: str | None = None,
    lora_base: str | None = None,
    progress: bool = True,
    write_page: bool = True,
    on_batch: Callable[[str, list[str]], None] | None = None,
) -> dict:
    """Generate, score, compare; write ``scores.csv``, ``summary.json``, plots and ``index.html``.

    ``models``: ``{name: pipeline | "ID_OR_PATH" | "LORA_FOLDER:lora"}`` or a list of :class:`ModelSpec`.
    ``scorers``: names (see ``diffalign.scorers.available_scorers()``) or Scorer objects.
    A model that fails to load or sample is recorded as failed (shown on the page); the rest still run.
    ``sampling``: unset fields take the baseline model's own defaults (a built-in model's, e.g.
    ``toy-sdxl``'s 20 steps and guidance 3), else 30 steps and guidance 5; unset sizes the pipeline's.
    ``on_batch(model, keys)`` is called after each batch is saved. Returns the summary dict.
    """
    sampling = sampling or SamplingSettings()
    sampling.check()
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parse_dtype(dtype)
    pipes: dict[str, object] = {}  # models given as pipeline objects (used as they are)
    if isinstance(models, Mapping):
        specs = []
        for name, value in models.items():
            if isinstance(value, str):
                specs.append(parse_model_arg(f"{name}={value}"))
            else:
                pipes[name] = value
                specs.append(ModelSpec(name, f"<{type(value).__name__} object>"))
    else:
        specs = list(models)
    specs = validate_models(specs, lora_base, preloaded=set(pipes), num_frames=sampling.num_frames)
    baseline = next((s.base if s.lora else s.source for s in specs if s.name not in pipes), "")
    settings = GallerySettings(images_per_prompt, seed, sampling.for_model_name(
        baseline, num_steps=GALLERY_NUM_STEPS, guidance_scale=GALLERY_GUIDANCE))
    check_scorer_names([s for s in scorers if isinstance(s, str)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _open_manifest(out, settings, prompts)
    for spec in specs:
        old = manifest.models.get(spec.name)
        if old and old["source"] != spec.source and spec.name not in pipes:
            raise ValueError(f"{out} has model {spec.name!r} from {old['source']!r}, not {spec.source!r}; "
                             "use another name or output folder")
        manifest.models[spec.name] = {"source": spec.source, "lora": spec.lora, "base": spec.base,
                                      "status": (old or {}).get("status", "pending"), "error": None}
        manifest.items.setdefault(spec.name, {})
    scorer_objects = [make_scorer(s) if isinstance(s, str) else s for s in scorers]
    for s in scorer_objects:
        manifest.scorers[s.name] = {"higher_is_better": bool(s.higher_is_better)}
    manifest_path = out / "manifest.json"
    manifest.save(manifest_path)

    keys = [(p, k) for p in range(len(prompts)) for k in range(images_per_prompt)]
    _adopt_finished_files(out, manifest, specs, keys, settings)
    todo = {s.name: [pk for pk in keys if item_key(*pk) not in manifest.items[s.name]] for s in specs}
    generated = {s.name: 0 for s in specs}
    bar = tqdm(total=sum(map(len, todo.values())), desc="gallery", unit="img", disable=not progress)
    try:
        for spec in specs:
            if not todo[spec.name]:
                manifest.models[spec.name]["status"] = "done"
                continue
            bar.set_postfix_str(spec.name)
            try:
                generated[spec.name] = _generate_model(spec, pipes.get(spec.name), todo[spec.name], prompts,
                                                       settings, scorer_objects, out, manifest, batch_size,
                                                       dtype, device, bar, on_batch)
                manifest.models[spec.name]["status"] = "done"
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:  # one broken model must not sink the gallery
                log.error("model %r failed: %s", spec.name, err)
                log.debug("%s", traceback.format_exc())
                manifest.models[spec.name].update(status="failed", error=f"{type(err).__name__}: {err}")
            manifest.save(manifest_path)
    finally:
        bar.close()
    _score_missing(out, manifest, specs, prompts, scorer_objects)
    manifest.save(manifest_path)
    return write_results(out, manifest, [s.name for s in specs], [s.name for s in scorer_objects], generated,
                         write_page=write_page)


def _adopt_finished_files(out: Path, manifest: Manifest, specs, keys, settings: GallerySettings) -> None:
    """Images written just before an interruption (files are complete: renamed into place) count as done."""
    for spec in specs:
        folder = out / "media" / spec.name
        if not folder.is_dir():
            continue
        items = manifest.items[spec.name]
        for p, k in keys:
            key = item_key(p, k)
            if key in items:
                continue
            for suffix in (".png", ".anim.webp"):
                file = folder / f"{key}{suffix}"
                if file.exists():
                    items[key] = {"file": file.relative_to(out).as_posix(), "seed": settings.seed_for(p, k),
                                  "scores": {}}


def _generate_model(spec, pipe, todo, prompts, settings, scorers, out, manifest, batch_size, dtype, device,
                    bar, on_batch) -> int:
    manifest.models[spec.name]["status"] = "running"
    owned = pipe is None
    if owned:
        pipe = load_model(spec, dtype=dtype, device=device or default_device())
    frames = settings.sampling.num_frames
    if frames is not None and not family_of(pipe).video:
        raise ValueError(
            f"num_frames={frames} is for video pipelines; {spec.name} is a {type(pipe).__name__}"
        )
    progress_config = dict(getattr(pipe, "_progress_bar_config", {}))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # one gallery bar instead of one per batch
    folder = out / "media" / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        batches = sample_batches(
            pipe,
            [prompts[p] for p, _ in todo],
            [settings.seed_for(p, k) for p, k in todo],
            settings.sampling,
            batch_size=batch_size,
            model_name=spec.name,
        )
        for start, result in batches:
            batch = todo[start : start + batch_size]
            batch_prompts = [prompts[p] for p, _ in batch]
            media = quantized(result.images)
            files = [save_media(m, folder / item_key(p, k)) for m, (p, k) in zip(media, batch, strict=True)]
            scores = {s.name: score_media(s, media, batch_prompts) for s in scorers}
            for j, ((p, k), file) in enumerate(zip(batch, files, strict=True)):
                manifest.items[spec.name][item_key(p, k)] = {
                    "file": file.relative_to(out).as_posix(), "seed": settings.seed_for(p, k),
                    "scores": {name: values[j] for name, values in scores.items()}}
            manifest.save(out / "manifest.json")
            count += len(batch)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(spec.name, [item_key(p, k) for p, k in batch])
    finally:
        if owned:
            del pipe
        else:
            pipe._progress_bar_config = progress_config  # the caller's pipeline is left as it was given
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return count


def _score_missing(out: Path, manifest: Manifest, specs, prompts, scorers) -> None:
    """Score saved files that lack a score (a scorer added on resume, files adopted after an interruption)."""
    for scorer in scorers:
        for spec in specs:
            missing = [
                (key, item)
                for key, item in manifest.items[spec.name].items()
                if scorer.name not in item["scores"]
            ]
            for start in range(0, len(missing), 16):
                chunk = missing[start : start + 16]
                media = [load_media(out / item["file"]) for _, item in chunk]
                values = score_media(scorer, media, [prompts[int(key.split("_")[0])] for key, _ in chunk])
                for (_, item), value in zip(chunk, values, strict=True):
                    item["scores"][scorer.name] = value


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------
def score_rows(manifest: Manifest, models: Sequence[str]) -> list[dict]:
    rows = []
    for model in models:
        for key, item in sorted(manifest.items.get(model, {}).items()):
            p, k = (int(x) for x in key.split("_"))
            rows.append({"model": model, "prompt_index": p, "image_index": k, "seed": item["seed"],
                         "prompt": manifest.prompts[p], "file": item["file"], "scores": item["scores"]})
    return rows


def write_results(out: Path, manifest: Manifest, models: Sequence[str], scorers: Sequence[str],
                  generated: dict[str, int] | None = None, *, write_page: bool = True) -> dict:
    rows = score_rows(manifest, models)
    with open(out / "scores.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "prompt_index", "image_index", "seed", "prompt", "file", *scorers])
        for r in rows:
            writer.writerow(
                [
                    r["model"],
                    r["prompt_index"],
                    r["image_index"],
                    r["seed"],
                    r["prompt"],
                    r["file"],
                    *(r["scores"].get(s, "") for s in scorers),
                ]
            )
    ok = [m for m in models if any(r["model"] == m for r in rows)]
    # the later model is compared against the earlier ones: the first --model is the baseline
    stats = compute_stats(
        rows, list(reversed(ok)), {s: manifest.scorers[s]["higher_is_better"] for s in scorers}
    )
    stats["means"] = {m: stats["means"][m] for m in ok}
    summary = {
        "settings": manifest.settings,
        "n_prompts": len(manifest.prompts),
        "models": {
            m: {**manifest.models[m], "images": sum(1 for r in rows if r["model"] == m)} for m in models
        },
        "scorers": {s: manifest.scorers[s] for s in scorers},
        "stats": stats,
        "generated": generated or {},
        "files": {
            "scores": "scores.csv",
            "manifest": "manifest.json",
            "page": "index.html" if write_page else None,
        },
    }
    plots = []
    if write_page:
        plots = write_plots(out, rows, stats, ok, scorers)
        summary["files"]["plots"] = plots
        write_html(out, manifest, rows, summary, models, scorers, plots)
    with open(out / "summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    summary["table"] = format_tables(stats)
    return summary
