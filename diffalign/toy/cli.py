"""``diffalign toy pretrain`` and ``diffalign toy eval``."""

from __future__ import annotations

import json
from dataclasses import fields

import torch

from diffalign.models import load_pipeline, resolve_model
from diffalign.toy.data import toy_prompts
from diffalign.toy.evaluate import caption_accuracy
from diffalign.toy.model import DEFAULT_GUIDANCE, DEFAULT_NUM_STEPS
from diffalign.toy.pretrain import PretrainConfig, export_checkpoint, pretrain
from diffalign.toy.video_data import video_prompts
from diffalign.toy.video_evaluate import video_caption_accuracy
from diffalign.toy.video_pretrain import VideoPretrainConfig, export_video_checkpoint, pretrain_video
from diffalign.usage import UsageError, default_device, ensure_writable_dir


def add_parser(sub) -> None:
    toy = sub.add_parser("toy", help="the toy world: pretrain / evaluate toy-sdxl and toy-animatediff")
    commands = toy.add_subparsers(dest="toy_command", required=True)

    _add_pretrain_commands(commands, "pretrain", "pretrain toy-sdxl from scratch (VAE, then UNet); resumable",
                           PretrainConfig, pretrain, export_checkpoint, "toy pipeline")
    _add_pretrain_commands(commands, "pretrain-video",
                           "pretrain toy-animatediff's motion UNet from scratch; resumable",
                           VideoPretrainConfig, pretrain_video, export_video_checkpoint, "toy video pipeline",
                           export_name="export-video")

    e = commands.add_parser("eval", help="caption-attribute accuracy of a toy model's samples")
    e.add_argument("--model", default="toy-sdxl",
                   help="built-in id or diffusers folder (default toy-sdxl; an AnimateDiff model gets the video eval)")
    e.add_argument("--split", default="heldout", choices=["train", "heldout"])
    e.add_argument("--num-prompts", type=int, default=126)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--steps", type=int, default=DEFAULT_NUM_STEPS)
    e.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    e.add_argument("--eta", type=float, default=1.0)
    e.add_argument("--device", default=None)
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    e.add_argument("--out", default=None, help="write the result as JSON here")
    e.set_defaults(func=_run_eval)


def _add_pretrain_commands(commands, name: str, help: str, config_cls, pretrain, export, what: str,
                           export_name: str = "export") -> None:
    """``NAME`` (every field of ``config_cls`` as an option) and ``EXPORT_NAME`` (its latest checkpoint)."""
    p = commands.add_parser(name, help=help)
    p.add_argument("--out", required=True, help="run folder: checkpoint/, pipeline/, train.log, samples.png")
    defaults = config_cls()
    for f in fields(config_cls):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=f"(default {getattr(defaults, f.name)})")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_run_pretrain, config_cls=config_cls, pretrain=pretrain, what=what)

    x = commands.add_parser(export_name, help=f"write RUN/pipeline from a '{name}' run's latest checkpoint")
    x.add_argument("--out", required=True, help=f"the run folder of 'diffalign toy {name}'")
    x.add_argument("--device", default=None)
    x.set_defaults(func=_run_export, export=export, what=what)


def _run_pretrain(args) -> None:
    config = args.config_cls(**{f.name: getattr(args, f.name) for f in fields(args.config_cls)})
    ensure_writable_dir(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.pretrain(args.out, config, device=args.device or default_device())
    print(f"wrote {args.what} to {path}")


def _run_export(args) -> None:
    path = args.export(args.out, device=args.device or default_device())
    print(f"wrote {args.what} to {path}")


def _run_eval(args) -> None:
    if args.num_prompts < 1:
        raise UsageError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    resolve_model(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device=args.device or default_device())
    pipe.set_progress_bar_config(disable=True)
    if type(pipe).__name__ == "AnimateDiffPipeline":
        return _run_video_eval(args, pipe)
    prompts = toy_prompts(args.split, args.num_prompts, seed=args.seed)
    result = caption_accuracy(pipe, prompts, seed=args.seed, num_steps=args.steps, guidance_scale=args.guidance,
                              eta=args.eta)
    _report(args, result, f"caption-attribute accuracy of {args.model} on {result['n']} {args.split} prompts")


def _run_video_eval(args, pipe) -> None:
    prompts = video_prompts(args.split, args.num_prompts, seed=args.seed)
    result = video_caption_accuracy(pipe, prompts, seed=args.seed, num_steps=args.steps,
                                    guidance_scale=args.guidance, eta=args.eta)
    _report(args, result, f"per-frame caption accuracy and motion accuracy of {args.model} on {result['n']} "
                          f"{args.split} video prompts")


def _report(args, result: dict, headline: str) -> None:
    """Print the accuracies against chance and write them to ``--out`` as JSON."""
    print(f"{headline} ({args.steps} steps, guidance {args.guidance}):")
    for name, value in result["accuracy"].items():
        print(f"  {name:<11} {value:6.3f}   (chance {result['chance'][name]:.3f})")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "split": args.split, **result}, f, indent=2)
