"""``diffalign gallery``: several models, the same prompts and noise, scored and browsable."""

from __future__ import annotations

import sys

import diffusers
import transformers

from diffalign.gallery.run import parse_model_arg, run_gallery, validate_models
from diffalign.models import parse_dtype
from diffalign.prompt_sets import check_prompt_spec, load_prompts, select_prompts
from diffalign.sampling import sampling_from_flags
from diffalign.scorers import check_scorer_names
from diffalign.usage import UsageError, ensure_writable_dir


def add_parser(sub):
    p = sub.add_parser(
        "gallery",
        help="generate with several models on the same prompts and seeds, score, compare, write a page",
        description="Every model gets the same initial noise per (prompt, image). Rerun the same command "
                    "to resume an interrupted gallery.",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=SPEC",
        help="a model to compare (repeatable; the first is the baseline). SPEC is a model spec: an id, "
        "a pipeline folder, or FOLDER:lora (a LoRA on top of --lora-base, else the base its run "
        "recorded, else the first non-LoRA model)",
    )
    p.add_argument("--lora-base", default=None, help="base model for the LoRA models (default: each run's "
                                                     "recorded base, else the first non-LoRA --model)")
    p.add_argument(
        "--prompts",
        required=True,
        help="a prompt file (.txt, .jsonl, .json, .tsv) or a set: smoke, toy, toy-train, toy-heldout, "
        "parti, ddpo-animals, hpdv2, hpdv2-<style>, drawbench, pickapic",
    )
    p.add_argument(
        "--max-prompts", type=int, default=None, help="use at most this many prompts, evenly spaced"
    )
    p.add_argument("--scorer", action="append", default=[], help="scorer name (repeatable)")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="image k of prompt p gets seed SEED + p * K + k")
    p.add_argument(
        "--steps", type=int, default=None, help="default: the baseline model's own (toy-sdxl: 20), else 30"
    )
    p.add_argument(
        "--guidance", type=float, default=None, help="default: the baseline model's own (toy-sdxl: 3), else 5"
    )
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--eta", type=float, default=1.0, help="DDIM noise: 0 deterministic, 1 DDPM ancestral")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument(
        "--num-frames", type=int, default=None, help="video models: frames per clip (default: the pipeline's)"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--out", required=True, help="output folder (index.html, scores.csv, summary.json, media/)"
    )
    p.set_defaults(func=run)


def run(args):
    # every check before any model loads
    sampling = sampling_from_flags(args)
    if args.images_per_prompt < 1:
        raise UsageError(f"images_per_prompt must be >= 1, got {args.images_per_prompt}")
    sampling.check()
    specs = validate_models(
        [parse_model_arg(m) for m in args.model], args.lora_base, num_frames=args.num_frames
    )
    check_scorer_names(args.scorer)
    check_prompt_spec(args.prompts)
    parse_dtype(args.dtype)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        prompts = select_prompts(load_prompts(args.prompts), args.max_prompts)
    except RuntimeError as err:  # a hub set offline
        raise UsageError(str(err)) from None
    check_scorer_names(args.scorer, prompts)  # e.g. toy_faithfulness scores toy captions only
    out = ensure_writable_dir(args.out)
    diffusers.utils.logging.disable_progress_bar()  # the gallery shows one progress bar for all models
    transformers.utils.logging.disable_progress_bar()
    print(f"gallery: {len(specs)} models x {len(prompts)} prompts x {args.images_per_prompt} images -> {out}")
    try:
        summary = run_gallery(specs, prompts, args.scorer, out, images_per_prompt=args.images_per_prompt,
                              seed=args.seed, sampling=sampling, batch_size=args.batch_size, dtype=args.dtype,
                              device=args.device, lora_base=args.lora_base)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished images are kept in {out}; rerun the same command to resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    print(summary["table"])
    failed = {m: v["error"] for m, v in summary["models"].items() if v["status"] == "failed"}
    for model, error in failed.items():
        print(f"model {model!r} FAILED: {error}", file=sys.stderr)
    print(f"wrote {out / 'index.html'}, {out / 'scores.csv'}, {out / 'summary.json'}")
    if failed:
        raise SystemExit(1)
