"""``diffalign toy pretrain`` and ``diffalign toy eval``."""

from __future__ import annotations

import json
from dataclasses import fields


def add_parser(sub) -> None:
    from diffalign.toy.model import DEFAULT_GUIDANCE, DEFAULT_NUM_STEPS
    from diffalign.toy.pretrain import PretrainConfig
    from diffalign.toy.video_pretrain import VideoPretrainConfig

    toy = sub.add_parser("toy", help="the toy world: pretrain / evaluate toy-sdxl and toy-animatediff")
    commands = toy.add_subparsers(dest="toy_command", required=True)

    p = commands.add_parser("pretrain", help="pretrain toy-sdxl from scratch (VAE, then UNet); resumable")
    p.add_argument("--out", required=True, help="run folder: checkpoint/, pipeline/, train.log, samples.png")
    defaults = PretrainConfig()
    for f in fields(PretrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=f"(default {getattr(defaults, f.name)})")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_run_pretrain)

    v = commands.add_parser("pretrain-video", help="pretrain toy-animatediff's motion UNet from scratch; resumable")
    v.add_argument("--out", required=True, help="run folder: checkpoint/, pipeline/, train.log, samples.png")
    video_defaults = VideoPretrainConfig()
    for f in fields(VideoPretrainConfig):
        v.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(video_defaults, f.name)),
                       default=getattr(video_defaults, f.name), help=f"(default {getattr(video_defaults, f.name)})")
    v.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    v.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    v.set_defaults(func=_run_pretrain_video)

    xv = commands.add_parser("export-video", help="write RUN/pipeline from a 'pretrain-video' run's latest checkpoint")
    xv.add_argument("--out", required=True, help="the run folder of 'diffalign toy pretrain-video'")
    xv.add_argument("--device", default=None)
    xv.set_defaults(func=_run_export_video)

    x = commands.add_parser("export", help="write RUN/pipeline from a pretraining run's latest checkpoint")
    x.add_argument("--out", required=True, help="the run folder of 'diffalign toy pretrain'")
    x.add_argument("--device", default=None)
    x.set_defaults(func=_run_export)

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


def _run_pretrain(args) -> None:
    import torch

    from diffalign.cli import default_device, ensure_writable_dir
    from diffalign.toy.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    ensure_writable_dir(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = pretrain(args.out, config, device=args.device or default_device())
    print(f"wrote toy pipeline to {path}")


def _run_pretrain_video(args) -> None:
    import torch

    from diffalign.cli import default_device, ensure_writable_dir
    from diffalign.toy.video_pretrain import VideoPretrainConfig, pretrain_video

    config = VideoPretrainConfig(**{f.name: getattr(args, f.name) for f in fields(VideoPretrainConfig)})
    ensure_writable_dir(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = pretrain_video(args.out, config, device=args.device or default_device())
    print(f"wrote toy video pipeline to {path}")


def _run_export_video(args) -> None:
    from diffalign.cli import default_device
    from diffalign.toy.video_pretrain import export_video_checkpoint

    path = export_video_checkpoint(args.out, device=args.device or default_device())
    print(f"wrote toy video pipeline to {path}")


def _run_export(args) -> None:
    from diffalign.cli import default_device
    from diffalign.toy.pretrain import export_checkpoint

    path = export_checkpoint(args.out, device=args.device or default_device())
    print(f"wrote toy pipeline to {path}")


def _run_eval(args) -> None:
    from diffalign.cli import UsageError, default_device
    from diffalign.models import load_pipeline, resolve_model
    from diffalign.toy.data import toy_prompts
    from diffalign.toy.evaluate import caption_accuracy

    if args.num_prompts < 1:
        raise UsageError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    resolve_model(args.model)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device=args.device or default_device())
    pipe.set_progress_bar_config(disable=True)
    if type(pipe).__name__ == "AnimateDiffPipeline":
        return _run_video_eval(args, pipe)
    prompts = toy_prompts(args.split, args.num_prompts, seed=args.seed)
    result = caption_accuracy(pipe, prompts, seed=args.seed, num_steps=args.steps, guidance_scale=args.guidance,
                              eta=args.eta)
    print(f"caption-attribute accuracy of {args.model} on {result['n']} {args.split} prompts "
          f"({args.steps} steps, guidance {args.guidance}):")
    for name, value in result["accuracy"].items():
        print(f"  {name:<11} {value:6.3f}   (chance {result['chance'][name]:.3f})")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "split": args.split, **result}, f, indent=2)


def _run_video_eval(args, pipe) -> None:
    from diffalign.toy.video_data import video_prompts
    from diffalign.toy.video_evaluate import video_caption_accuracy

    prompts = video_prompts(args.split, args.num_prompts, seed=args.seed)
    result = video_caption_accuracy(pipe, prompts, seed=args.seed, num_steps=args.steps,
                                    guidance_scale=args.guidance, eta=args.eta)
    print(f"per-frame caption accuracy and motion accuracy of {args.model} on {result['n']} {args.split} "
          f"video prompts ({args.steps} steps, guidance {args.guidance}):")
    for name, value in result["accuracy"].items():
        print(f"  {name:<11} {value:6.3f}   (chance {result['chance'][name]:.3f})")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "split": args.split, **result}, f, indent=2)
