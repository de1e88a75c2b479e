"""The ``diffalign`` command line: the top floor. Each command validates all of its input before any model
loads, and a user's mistake prints one line (exit status 2).

The commands ``tiny``, ``sample``, ``score``, ``train`` and ``pairs`` are here; ``gallery`` and ``toy``
live next to the code they drive (:mod:`diffalign.gallery.cli`, :mod:`diffalign.toy.cli`), each with an
``add_parser(subparsers)`` that sets ``func`` on its parser. Library code never imports this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from diffalign.checkpoints import CheckpointError
from diffalign.config import load_config
from diffalign.gallery import cli as gallery_cli
from diffalign.images import to_pil
from diffalign.models import check_num_frames, load_pipeline, parse_dtype, resolve_model
from diffalign.objectives.online import RewardError
from diffalign.pairs import generate_pairs
from diffalign.parallel import ProcessFailed
from diffalign.prompt_sets import load_prompts
from diffalign.run_state import NonFiniteError, TrainingInterrupted
from diffalign.sampler import Trajectory
from diffalign.sampling import SamplingSettings, sample_batches, sampling_from_flags
from diffalign.scorers import check_scorer_names, make_scorer
from diffalign.scorers.server import ScorerServer
from diffalign.scorers.tiny_models import save_tiny_scorer
from diffalign.scorers.transport import ServiceError
from diffalign.tiny import TINY_KINDS, save_tiny
from diffalign.toy import cli as toy_cli
from diffalign.train import train
from diffalign.usage import UsageError, default_device, ensure_writable_dir
from diffalign.video import save_video

#: Modules that contribute subcommands (each has ``add_parser(subparsers)``).
COMMAND_MODULES = (gallery_cli, toy_cli)

log = logging.getLogger("diffalign")

__all__ = ["UsageError", "build_parser", "default_device", "ensure_writable_dir", "main"]


MODEL_SPEC_HELP = (
    "a model spec: a built-in id (tiny-sdxl, toy-sdxl, ...), a hub id org/name, a local pipeline "
    "folder, or FOLDER:lora (a LoRA run on top of the base model its config.yaml records)"
)
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


def _add_tiny(sub):
    p = sub.add_parser("tiny", help="write a tiny random-weight diffusers pipeline or scorer model (offline)")
    # Scorer kinds (pickscore, clipscore, hpsv2, aesthetic, hpsv3) write a folder for --scorer
    # KIND:model=FOLDER.
    p.add_argument("kind", choices=[*TINY_KINDS, "pickscore", "clipscore", "hpsv2", "aesthetic", "hpsv3"])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_tiny)


def _run_tiny(args):
    ensure_writable_dir(Path(args.out_dir).parent if Path(args.out_dir).parent != Path("") else ".")
    if args.kind not in TINY_KINDS:
        path = save_tiny_scorer(args.kind, args.out_dir, seed=args.seed)
        print(
            f"wrote tiny {args.kind} scorer model (seed {args.seed}) to {path}; use --scorer "
            f"{args.kind}:model={path}"
        )
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
    p.add_argument("--steps", type=int, default=None, help="default: the model's own (toy-sdxl: 20), else 50")
    p.add_argument(
        "--guidance", type=float, default=None, help="default: the model's own (toy-sdxl: 3), else 5"
    )
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--eta", type=float, default=1.0, help="DDIM noise: 0 deterministic, 1 DDPM ancestral")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="image i gets seed SEED + i")
    p.add_argument("--height", type=int, default=None, help="default: the model's own size")
    p.add_argument("--width", type=int, default=None, help="default: the model's own size")
    p.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="video pipelines: frames per video (default: the model's)",
    )
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
    prompts = args.prompt if args.prompt else load_prompts(args.prompts)
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise UsageError("no prompts given")
    for name, value, low in (
        ("--steps", 1 if args.steps is None else args.steps, 1),
        ("--num-images", args.num_images, 1),
        ("--batch-size", args.batch_size, 1),
        ("--num-frames", args.num_frames or 1, 1),
    ):
        if value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    if args.eta < 0:
        raise UsageError(f"--eta must be >= 0, got {args.eta}")
    settings = sampling_from_flags(args)
    for name, value, expected in settings.problems():
        raise UsageError(f"--{name.replace('_', '-')} must be {expected}, got {value}")
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
    settings = settings.for_model(pipe, args.model)  # unset sizes, steps, guidance: the model's own
    scorers = [make_scorer(name) for name in args.scorer]
    trajectories, rows = [], []
    batches = sample_batches(
        pipe,
        [p for p, _ in jobs],
        [s for _, s in jobs],
        settings,
        batch_size=args.batch_size,
        model_name=args.model,
    )
    for start, result in tqdm(batches, total=-(-len(jobs) // args.batch_size), desc="sampling", unit="batch"):
        batch = jobs[start : start + args.batch_size]
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
    p.add_argument(
        "--scorer",
        action="append",
        required=True,
        help="scorer name or spec (repeatable): NAME[:KEY=VALUE,...], e.g. pickscore:model=FOLDER, "
        "hpsv2:version=v2.1, or a weighted sum 10*pickscore+2*hpsv2",
    )
    p.add_argument("--images", required=True, help="folder of images (PNG/JPEG/WebP)")
    p.add_argument(
        "--prompts",
        default=None,
        help="prompt file with one prompt per image in file-name order (default: the folder's samples.jsonl)",
    )
    p.add_argument("--out", default=None, help="output JSONL (default IMAGES/scores.jsonl)")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=_run_score)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _run_score(args):
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
        by_file = {
            r["file"]: r["prompt"]
            for r in map(json.loads, (folder / "samples.jsonl").read_text().splitlines())
        }
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
            values = scorer.score(
                images, None if prompts is None else prompts[start : start + args.batch_size]
            )
            for f, v in zip(chunk, values.tolist(), strict=True):
                results[f.name][name] = v
    with open(out_path, "w", encoding="utf-8") as f:
        for i, file in enumerate(files):
            row = {
                "file": file.name,
                "prompt": None if prompts is None else prompts[i],
                "scores": results[file.name],
            }
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
def _add_serve_scorer(sub):
    p = sub.add_parser("serve-scorer", help="serve a scorer spec over HTTP for `remote:URL` rewards")
    p.add_argument("spec", help="scorer name or spec, e.g. pickscore:model=FOLDER or 10*pickscore+2*hpsv2")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max-request-mb", type=float, default=256.0, help="larger request bodies are refused (413)"
    )
    p.add_argument("--token-env", default=None,
                   help="require the token held in this environment variable (clients set the same one; "
                        "remote:URL reads DIFFALIGN_SCORER_TOKEN unless told token_env=VAR)")
    p.add_argument("--check", action="store_true",
                   help="check the spec, address and token, say what would be served, and exit "
                        "(nothing loads)")
    p.set_defaults(func=_run_serve_scorer)


def _run_serve_scorer(args):
    check_scorer_names([args.spec])
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_request_mb <= 0:
        raise UsageError(f"--max-request-mb must be > 0, got {args.max_request_mb}")
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise UsageError(f"--token-env {args.token_env}: that environment variable is not set or empty")
    if args.check:
        print(f"would serve {args.spec} on http://{args.host}:{args.port} (POST /score, GET /health)"
              + (", token required" if token else ""))
        return
    try:
        server = ScorerServer(make_scorer(args.spec), host=args.host, port=args.port, token=token,
                              max_request_mb=args.max_request_mb)
    except OSError as err:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None
    # One line a launcher can wait for; the port is the real one when --port 0 picked a free one.
    print(f"serving {args.spec} on {server.url} (POST /score, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train with a YAML config (DPO, MaPO, ...)",
                              description="Train with a YAML config; override any key with dotted.key=value.")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument(
        "overrides", nargs="*", help="dotted.key=value, e.g. train.max_steps=10 optim.learning_rate=1e-5"
    )
    p.add_argument(
        "--resume", default=None, help="'latest' or a checkpoint folder (same as train.resume=...)"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_run_train)


def _run_train(args) -> None:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(cfg.to_yaml())
        return
    out = train(cfg)
    if PartialState().is_main_process:  # one line per run, not one per process
        print(f"wrote {out}")


# ----------------------------------------------------------------------------------------------------
def _add_pairs(subparsers) -> None:
    p = subparsers.add_parser("pairs", help="generate AI-feedback preference pairs labelled by a scorer")
    p.add_argument(
        "--model", required=True, help="a model spec: built-in id, hub id, pipeline folder or FOLDER:lora"
    )
    p.add_argument(
        "--motion-adapter",
        default=None,
        help="AnimateDiff: a MotionAdapter id/folder added to an SD 1.x --model",
    )
    p.add_argument("--prompts", required=True, help="a prompt file (.txt, .jsonl, .json, .tsv) or a set name "
                                                    "(smoke, toy, toy-train, parti, ddpo-animals, ...)")
    p.add_argument("--scorer", required=True, help="a registered scorer name")
    p.add_argument("--out", required=True, help="output folder (pairs.jsonl + images/)")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="default: the model's own (toy-sdxl: 20), else 20")
    p.add_argument(
        "--guidance", type=float, default=None, help="default: the model's own (toy-sdxl: 3), else 5"
    )
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument(
        "--num-frames", type=int, default=None, help="video models: frames per clip (default: the pipeline's)"
    )
    p.add_argument(
        "--min-margin", type=float, default=0.0, help="drop prompts whose best-worst score gap is <= this"
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_run_pairs)


def _run_pairs(args) -> None:
    for name, value, low in (
        ("--images-per-prompt", args.images_per_prompt, 2),
        ("--steps", 1 if args.steps is None else args.steps, 1),
        ("--batch-size", args.batch_size, 1),
    ):
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
    sampling = SamplingSettings(
        num_steps=args.steps,
        guidance_scale=args.guidance,
        eta=args.eta,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
    )
    info = generate_pairs(
        pipe,
        prompts,
        scorer,
        out,
        images_per_prompt=args.images_per_prompt,
        sampling=sampling,
        seed=args.seed,
        batch_size=args.batch_size,
        min_margin=args.min_margin,
        model_name=args.model,
    )
    print(
        f"wrote {info['pairs']} pairs ({info['ties']} ties dropped) to {out / 'pairs.jsonl'}; mean "
        f"{args.scorer}: chosen {info['mean_chosen_score']:.4g}, rejected {info['mean_rejected_score']:.4g}"
    )


# ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffalign", description="Align diffusion models with human preference."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    _add_tiny(sub)
    _add_sample(sub)
    _add_score(sub)
    _add_serve_scorer(sub)
    _add_train(sub)
    _add_pairs(sub)
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return parser


def _say(line: str) -> None:
    """One line to stderr in one write: the processes of a launch share the pipe, and print()'s separate
    newline write let two processes' lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own INFO lines only: third-party INFO (open_clip logs on the root logger) shows with --verbose.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffalign").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except (UsageError, ValueError, FileNotFoundError, NotImplementedError) as err:
        _say(f"diffalign {args.command}: error: {err}")
        return 2
    except (CheckpointError, NonFiniteError, RewardError, ServiceError) as err:
        _say(f"diffalign {args.command}: error: {err}")
        return 1
    except ProcessFailed as err:  # one process of several failed: every process says the same line
        _say(f"diffalign {args.command}: error: {err}")
        return err.exit_status
    except TrainingInterrupted as err:  # preempted: the conventional status of a SIGTERM'd process
        _say(f"diffalign {args.command}: stopped: {err}")
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
