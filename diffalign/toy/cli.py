"""``diffalign toy pretrain`` (and ``pretrain-video``, ``export``) and ``diffalign toy eval`` (the toy
GenEval)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch

from diffalign.models import resolve_model
from diffalign.toy.flow_pretrain import FlowPretrainConfig, export_flow_checkpoint, pretrain_flow
from diffalign.toy.geneval import GenEvalSettings, format_report, load_models, toy_geneval
from diffalign.toy.model import DEFAULT_GUIDANCE, DEFAULT_NUM_STEPS
from diffalign.toy.pretrain import PretrainConfig, export_checkpoint, pretrain
from diffalign.toy.video_pretrain import VideoPretrainConfig, export_video_checkpoint, pretrain_video
from diffalign.usage import UsageError, default_device, ensure_writable_dir


def add_parser(sub) -> None:
    toy = sub.add_parser("toy",
                         help="the toy world: pretrain / evaluate toy-sdxl, toy-sd3 and toy-animatediff")
    commands = toy.add_subparsers(dest="toy_command", required=True)

    _add_pretrain_commands(commands, "pretrain", "pretrain toy-sdxl from scratch (VAE, then UNet); resumable",
                           PretrainConfig, pretrain, export_checkpoint, "toy pipeline")
    _add_pretrain_commands(commands, "pretrain-video",
                           "pretrain toy-animatediff's motion UNet from scratch; resumable",
                           VideoPretrainConfig, pretrain_video, export_video_checkpoint, "toy video pipeline",
                           export_name="export-video")
    _add_pretrain_commands(commands, "pretrain-flow",
                           "pretrain toy-sd3's MMDiT (flow matching; toy-sdxl's VAE and text encoders); "
                           "resumable",
                           FlowPretrainConfig, pretrain_flow, export_flow_checkpoint, "toy flow pipeline",
                           export_name="export-flow")

    e = commands.add_parser(
        "eval",
        help="toy GenEval: per-attribute caption accuracy of a toy model's samples, "
        "with 95 %% intervals and the change against a base on the same noise",
    )
    e.add_argument(
        "--model",
        default="toy-sdxl",
        help="built-in id, diffusers folder, or RUN:lora (a 'diffalign train' LoRA run, loaded onto the "
        "base its config.yaml records); default toy-sdxl; an AnimateDiff model gets the video eval",
    )
    e.add_argument(
        "--base",
        default=None,
        metavar="SPEC",
        help="also evaluate this model (same forms as --model) on the same captions and noise, and "
        "report the change of --model against it",
    )
    e.add_argument("--split", default="heldout", choices=["train", "heldout", "both"])
    e.add_argument("--num-prompts", type=int, default=126,
                   help="captions per split and seed (default 126: every held-out caption; 0: every caption)")
    e.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                   help="evaluation seeds: each draws its captions and gives image i the noise seed "
                        "SEED*100000+i (default 0)")
    e.add_argument("--steps", type=int, default=DEFAULT_NUM_STEPS)
    e.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    e.add_argument("--eta", type=float, default=1.0)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default=None)
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    e.add_argument("--out", default=None, help="write the report (and every image's hits) as JSON here")
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

    if args.num_prompts < 0:
        raise UsageError(f"--num-prompts must be >= 0 (0: every caption), got {args.num_prompts}")
    if args.eta < 0:
        raise UsageError(f"--eta must be >= 0, got {args.eta}")
    settings = GenEvalSettings(
        splits=["train", "heldout"] if args.split == "both" else [args.split],
        seeds=list(args.seeds),
        num_prompts=args.num_prompts or None,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        eta=args.eta,
        batch_size=args.batch_size,
    )
    specs = {"model": args.model} if args.base is None else {"base": args.base, "model": args.model}
    for spec in specs.values():
        resolve_model(spec)  # a bad --model / --base fails here, before anything loads
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipes = load_models(specs, device=args.device or default_device())
    report = toy_geneval(pipes, settings, base="base" if args.base is not None else None)
    print(format_report(report, specs))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"models": specs, **report}, f, indent=1)
        print(f"wrote {args.out}")
