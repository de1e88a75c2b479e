"""The ``diffalign`` command line. Each command validates all of its input before any model loads.

Commands live next to the code they drive: a module adds a command with ``add_parser(subparsers)``
that sets ``func`` on its parser, and is listed in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

#: Modules that contribute subcommands (each has ``add_parser(subparsers)``).
COMMAND_MODULES: list[str] = [
    "diffalign.gallery.cli",
    "diffalign.toy.cli",
    "diffalign.train",
    "diffalign.pairs",
]

log = logging.getLogger("diffalign")


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove it is writable, or raise a UsageError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"output folder {path} is not writable: {err.strerror or err}") from None
    return path


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


MODEL_SPEC_HELP = ("a model spec: a built-in id (tiny-sdxl, toy-sdxl, ...), a hub id org/name, a local pipeline "
                   "folder, or FOLDER:lora (a LoRA run on top of the base model its config.yaml records)")
PROMPTS_HELP = ("a prompt file (.txt one per line, .jsonl field 'prompt', .json, .tsv) or a set: smoke, toy, "
                "toy-train, toy-heldout, parti, ddpo-animals, hpdv2, drawbench, pickapic")


def _worth_showing(default) -> bool:
    return not (default is None or default is False or default == [] or default is argparse.SUPPRESS)


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default, when it has one worth showing (not None/False/[])."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.option_strings and _worth_showing(action.default) and "default" not in help_text.lower():
            help_text += (" " if help_text else "") + "(default: %(default)s)"
        return help_text


class CommandParser(argparse.ArgumentParser):
    """Every command's parser: ``--help`` shows each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.help is None and action.option_strings and _worth_showing(action.default):
            action.help = "(default: %(default)s)"  # argparse shows nothing for an option without help text
        return action


# ----------------------------------------------------------------------------------------------------
TINY_KINDS = ("sd", "sdxl", "animatediff", "wan")  # pipelines; diffalign.tiny builds them


def _add_tiny(sub):
    p = sub.add_parser("tiny", help="write a tiny random-weight diffusers pipeline or scorer model (offline)")
    # Scorer kinds (pickscore, clipscore, hpsv2, aesthetic) write a folder for --scorer KIND:model=FOLDER.
    p.add_argument("kind", choices=[*TINY_KINDS, "pickscore", "clipscore", "hpsv2", "aesthetic"])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_tiny)


def _run_tiny(args):
    from diffalign.tiny import save_tiny

    ensure_writable_dir(Path(args.out_dir).parent if Path(args.out_dir).parent != Path("") else ".")
    if args.kind not in TINY_KINDS:
        from diffalign.scorers.tiny_models import save_tiny_scorer

        path = save_tiny_scorer(args.kind, args.out_dir, seed=args.seed)
        print(f"wrote tiny {args.kind} scorer model (seed {args.seed}) to {path}; use --scorer {args.kind}:model={path}")
        return
    path = save_tiny(args.kind, args.out_dir, seed=args.seed)
    print(f"wrote tiny {args.kind} pipeline (seed {args.seed}) to {path}")


# ----------------------------------------------------------------------------------------------------
def _add_sample(sub):
    p = sub.add_parser("sample", help="sample images (and trajectories) from a pipeline")
    p.add_argument("--model", required=True, help=MODEL_SPEC_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts", help=PROMPTS_HELP)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--eta", type=float, default=1.0, help="DDIM noise: 0 deterministic, 1 DDPM ancestral")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="image i gets seed SEED + i")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None, help="video pipelines: frames per video")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--variant", default=None)
    p.add_argument("--vae", default=None, help="override VAE (hub id or local folder)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--save-trajectories", action="store_true")
    p.add_argument("--scorer", action="append", default=[], help="score each image (repeatable)")
    p.set_defaults(func=_run_sample)


def _run_sample(args):
    import torch
    from tqdm.auto import tqdm

    from diffalign.gallery.prompt_sets import load_prompts
    from diffalign.images import to_pil
    from diffalign.models import check_num_frames, load_pipeline, parse_dtype, resolve_model
    from diffalign.sampler import Trajectory, sample
    from diffalign.scorers import check_scorer_names, make_scorer
    from diffalign.video import save_video

    prompts = args.prompt if args.prompt else load_prompts(args.prompts)
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise UsageError("no prompts given")
    for name, value, low in (("--steps", args.steps, 1), ("--num-images", args.num_images, 1),
                             ("--batch-size", args.batch_size, 1), ("--num-frames", args.num_frames or 1, 1)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    if args.eta < 0:
        raise UsageError(f"--eta must be >= 0, got {args.eta}")
    source = resolve_model(args.model)
    check_num_frames(source, args.num_frames)
    if args.vae is not None:
        resolve_model(args.vae, component=True)
    parse_dtype(args.dtype)
    check_scorer_names(args.scorer, prompts)
    out = ensure_writable_dir(args.out)

    jobs = [(p, args.seed + i) for i, p in enumerate(q for q in prompts for _ in range(args.num_images))]
    pipe = load_pipeline(source, dtype=args.dtype, variant=args.variant, vae=args.vae,
                         device=args.device or default_device())
    pipe.set_progress_bar_config(disable=True)
    scorers = [make_scorer(name) for name in args.scorer]
    video_kwargs = {"num_frames": args.num_frames} if args.num_frames else {}
    trajectories, rows = [], []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="sampling", unit="batch"):
        batch = jobs[start : start + args.batch_size]
        result = sample(pipe, [p for p, _ in batch], seeds=[s for _, s in batch], num_steps=args.steps,
                        guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale, eta=args.eta,
                        negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                        model_name=args.model, **video_kwargs)
        scores = {s.name: s.score(result.images, [p for p, _ in batch]).tolist() for s in scorers}
        for j, (prompt, seed) in enumerate(batch):
            index = start + j
            if result.images.ndim == 5:  # a video [F, 3, H, W]
                file = save_video(result.images[j], out / f"{index:05d}")[0].name
            else:
                file = f"{index:05d}.png"
                to_pil(result.images[j : j + 1])[0].save(out / file)
            rows.append({"index": index, "prompt": prompt, "seed": seed, "file": file,
                         "scores": {name: values[j] for name, values in scores.items()}})
        if args.save_trajectories:
            trajectories.append(result.trajectory)
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    if trajectories:
        Trajectory.cat(trajectories).save(out / "trajectories.safetensors")
    for name in args.scorer:
        values = torch.tensor([r["scores"][name] for r in rows])
        print(f"{name}: mean {values.mean():.4f} over {len(values)} images")
    print(f"wrote {len(rows)} images to {out}")


# ----------------------------------------------------------------------------------------------------
def _add_score(sub):
    p = sub.add_parser("score", help="score a folder of images")
    p.add_argument("--scorer", action="append", required=True,
                   help="scorer name or spec (repeatable): NAME[:KEY=VALUE,...], e.g. pickscore:model=FOLDER, "
                        "hpsv2:version=v2.1, or a weighted sum 10*pickscore+2*hpsv2")
    p.add_argument("--images", required=True, help="folder of images (PNG/JPEG/WebP)")
    p.add_argument("--prompts", default=None,
                   help="prompt file with one prompt per image in file-name order (default: the folder's samples.jsonl)")
    p.add_argument("--out", default=None, help="output JSONL (default IMAGES/scores.jsonl)")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=_run_score)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _run_score(args):
    from PIL import Image
    from tqdm.auto import tqdm

    from diffalign.gallery.prompt_sets import load_prompts
    from diffalign.scorers import check_scorer_names, make_scorer

    check_scorer_names(args.scorer)
    folder = Path(args.images)
    if not folder.is_dir():
        raise UsageError(f"image folder {folder} does not exist")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    prompts = None
    if args.prompts:
        prompts = load_prompts(args.prompts)
    elif (folder / "samples.jsonl").exists():
        by_file = {r["file"]: r["prompt"] for r in map(json.loads, (folder / "samples.jsonl").read_text().splitlines())}
        prompts = [by_file.get(f.name) for f in files]
        if None in prompts:
            prompts = None
    if prompts is not None and len(prompts) != len(files):
        raise UsageError(f"{len(files)} images in {folder} but {len(prompts)} prompts")
    check_scorer_names(args.scorer, prompts)
    out_path = Path(args.out) if args.out else folder / "scores.jsonl"
    ensure_writable_dir(out_path.parent)

    results = {f.name: {} for f in files}
    for name in args.scorer:
        scorer = make_scorer(name)
        for start in tqdm(range(0, len(files), args.batch_size), desc=name, unit="batch"):
            chunk = files[start : start + args.batch_size]
            images = [Image.open(f) for f in chunk]
            values = scorer.score(images, None if prompts is None else prompts[start : start + args.batch_size])
            for f, v in zip(chunk, values.tolist(), strict=True):
                results[f.name][name] = v
    with open(out_path, "w", encoding="utf-8") as f:
        for i, file in enumerate(files):
            row = {"file": file.name, "prompt": None if prompts is None else prompts[i], "scores": results[file.name]}
            f.write(json.dumps(row) + "\n")
    width = max(len(f.name) for f in files)
    print("file".ljust(width) + "".join(f"  {n:>22}" for n in args.scorer))
    for file in files:
        print(file.name.ljust(width) + "".join(f"  {results[file.name][n]:>22.4f}" for n in args.scorer))
    for name in args.scorer:
        values = [results[f.name][name] for f in files]
        print(f"{name}: mean {sum(values) / len(values):.4f} over {len(values)} images")
    print(f"wrote {out_path}")


# ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description="Align diffusion models with human preference.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    _add_tiny(sub)
    _add_sample(sub)
    _add_score(sub)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own INFO lines only: third-party INFO (open_clip logs on the root logger) shows with --verbose.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffalign").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffalign.checkpoints import CheckpointError
    from diffalign.train import NonFiniteError, TrainingInterrupted

    try:
        args.func(args)
    except (UsageError, ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"diffalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError) as err:
        print(f"diffalign {args.command}: error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:  # preempted: the conventional status of a SIGTERM'd process
        print(f"diffalign {args.command}: stopped: {err}", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
