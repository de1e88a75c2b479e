"""AI-feedback preference pairs: ``diffalign pairs --model M --prompts FILE --scorer S --out DIR``.

For each prompt the shared sampler (:func:`diffalign.sampler.sample`) draws ``images_per_prompt``
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
from pathlib import Path

import torch

log = logging.getLogger("diffalign.pairs")


def generate_pairs(
    pipe,
    prompts: list[str],
    scorer,
    out: str | Path,
    *,
    images_per_prompt: int = 2,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    min_margin: float = 0.0,
    model_name: str = "",
    progress: bool = True,
    num_frames: int | None = None,
) -> dict:
    """Sample, score and pair; returns the summary written to ``info.json``."""
    from tqdm.auto import tqdm

    from diffalign.images import to_pil
    from diffalign.sampler import sample
    from diffalign.video import save_video

    if images_per_prompt < 2:
        raise ValueError(f"images_per_prompt must be >= 2 to form a pair, got {images_per_prompt}")
    if not prompts:
        raise ValueError("no prompts given")
    out = Path(out)
    frames_kw = {"num_frames": num_frames} if num_frames is not None else {}
    jobs = [(i, j, p, seed + i * images_per_prompt + j) for i, p in enumerate(prompts) for j in range(images_per_prompt)]
    scores = torch.empty(len(prompts), images_per_prompt)
    images: dict[tuple[int, int], object] = {}
    for start in tqdm(range(0, len(jobs), batch_size), desc="sampling pairs", unit="batch", disable=not progress):
        chunk = jobs[start : start + batch_size]
        result = sample(pipe, [p for _, _, p, _ in chunk], seeds=[s for *_, s in chunk], num_steps=num_steps,
                        guidance_scale=guidance_scale, eta=eta, height=height, width=width, model_name=model_name,
                        **frames_kw)
        values = scorer.score(result.images, [p for _, _, p, _ in chunk])
        if not torch.isfinite(values).all():
            bad = [chunk[k][2] for k in torch.nonzero(~torch.isfinite(values)).flatten().tolist()]
            raise ValueError(f"scorer {scorer.name!r} returned non-finite scores for prompts {bad[:3]}")
        sign = 1.0 if scorer.higher_is_better else -1.0
        media = result.images.cpu() if result.images.ndim == 5 else to_pil(result.images)  # videos stay [F, 3, H, W]
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
        rows.append({"prompt": prompt, "chosen": names[0], "rejected": names[1],
                     "chosen_score": sign * float(scores[i, best]), "rejected_score": sign * float(scores[i, worst]),
                     "chosen_seed": seed + i * images_per_prompt + best,
                     "rejected_seed": seed + i * images_per_prompt + worst, "scorer": scorer.name})
    if not rows:
        raise ValueError(f"all {len(prompts)} prompts gave ties under scorer {scorer.name!r} (margin <= {min_margin})")
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    info = {"model": model_name, "scorer": scorer.name, "prompts": len(prompts), "pairs": len(rows), "ties": ties,
            "images_per_prompt": images_per_prompt, "num_steps": num_steps, "guidance_scale": guidance_scale,
            "eta": eta, "seed": seed, "min_margin": min_margin, "height": height, "width": width,
            "num_frames": num_frames,
            "mean_chosen_score": sum(r["chosen_score"] for r in rows) / len(rows),
            "mean_rejected_score": sum(r["rejected_score"] for r in rows) / len(rows)}
    (out / "info.json").write_text(json.dumps(info, indent=1))
    return info


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pairs", help="generate AI-feedback preference pairs labelled by a scorer")
    p.add_argument("--model", required=True, help="a model spec: built-in id, hub id, pipeline folder or FOLDER:lora")
    p.add_argument("--motion-adapter", default=None, help="AnimateDiff: a MotionAdapter id/folder added to an SD 1.x --model")
    p.add_argument("--prompts", required=True, help="a prompt file (.txt, .jsonl, .json, .tsv) or a set name "
                                                    "(smoke, toy, toy-train, parti, ddpo-animals, ...)")
    p.add_argument("--scorer", required=True, help="a registered scorer name")
    p.add_argument("--out", required=True, help="output folder (pairs.jsonl + images/)")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None, help="video models: frames per clip (default: the pipeline's)")
    p.add_argument("--min-margin", type=float, default=0.0, help="drop prompts whose best-worst score gap is <= this")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_run)


def _run(args) -> None:
    from diffalign.cli import UsageError, default_device, ensure_writable_dir
    from diffalign.gallery.prompt_sets import load_prompts
    from diffalign.models import check_num_frames, load_pipeline, parse_dtype, resolve_model
    from diffalign.scorers import check_scorer_names, make_scorer

    for name, value, low in (("--images-per-prompt", args.images_per_prompt, 2), ("--steps", args.steps, 1),
                             ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    if args.num_frames is not None and args.num_frames < 1:
        raise UsageError(f"--num-frames must be >= 1, got {args.num_frames}")
    if args.eta < 0:
        raise UsageError(f"--eta must be >= 0, got {args.eta}")
    try:
        prompts = load_prompts(args.prompts)
    except RuntimeError as err:  # a hub set offline
        raise UsageError(str(err)) from None
    source = resolve_model(args.model)
    if args.motion_adapter is not None:
        resolve_model(args.motion_adapter, component=True)
    check_num_frames(source, args.num_frames, motion_adapter=args.motion_adapter)
    parse_dtype(args.dtype)
    check_scorer_names([args.scorer], prompts)
    out = ensure_writable_dir(args.out)
    scorer = make_scorer(args.scorer)
    pipe = load_pipeline(source, dtype=args.dtype, device=args.device or default_device(),
                         motion_adapter=args.motion_adapter)
    pipe.set_progress_bar_config(disable=True)
    info = generate_pairs(pipe, prompts, scorer, out, images_per_prompt=args.images_per_prompt, num_steps=args.steps,
                          guidance_scale=args.guidance, eta=args.eta, seed=args.seed, batch_size=args.batch_size,
                          height=args.height, width=args.width, min_margin=args.min_margin, model_name=args.model,
                          num_frames=args.num_frames)
    print(f"wrote {info['pairs']} pairs ({info['ties']} ties dropped) to {out / 'pairs.jsonl'}; "
          f"mean {args.scorer}: chosen {info['mean_chosen_score']:.4g}, rejected {info['mean_rejected_score']:.4g}")
