"""Sampler benchmark: trajectory recording vs the plain pipeline; batched vs one-step recompute.

    python benchmarks/sampler.py [--model tiny-sdxl] [--steps 20] [--batch 4] [--repeats 5]
    python benchmarks/sampler.py --model runs/real-sdxl --dtype bf16 --batch 2  # on a GPU (see real_size.py)
    python benchmarks/sampler.py --model tiny-animatediff --num-frames 8         # video pipelines
    python benchmarks/sampler.py --model tiny-flux       # flow families: vs the stock Euler pipeline

Prints a markdown table; figures are ratios measured in the same run (interleaved repeats, medians).
The flow families (SD3, FLUX) are timed against the stock pipeline with its own Euler scheduler, at noise
level 0 (the same steps) and at the SDE noise level ``--eta`` (default 0.7, Flow-GRPO's), which is also the
trajectory recomputed; FLUX at its guidance embedding 3.5 and no CFG.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch
from diffusers import DDIMScheduler

from diffalign.families import family_of
from diffalign.models import builtin_sampling_defaults, load_pipeline
from diffalign.sampler import recompute_log_probs, sample


def timed(fn) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16/bf16, float16/fp16")
    parser.add_argument("--num-frames", type=int, default=None, help="video pipelines: frames per clip")
    parser.add_argument("--height", type=int, default=None, help="default: the built-in model's own size")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta / flow SDE noise level (1 / 0.7)")
    args = parser.parse_args()

    pipe = load_pipeline(args.model, dtype=args.dtype, device=args.device)
    video = {} if args.num_frames is None else {"num_frames": args.num_frames}
    own = builtin_sampling_defaults(args.model)  # tiny-flux: 32 x 32, not FluxPipeline's 128 x the VAE factor
    for key in ("height", "width"):
        if getattr(args, key) or own.get(key):
            video[key] = getattr(args, key) or own[key]
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a photo of object {i}" for i in range(args.batch)]
    seeds = list(range(args.batch))
    family = family_of(pipe)
    flow = family.name in ("sd3", "flux")  # timed against the stock pipeline and its own Euler scheduler
    guidance = 3.5 if family.name == "flux" else 5.0
    eta = args.eta if args.eta is not None else (0.7 if flow else 1.0)
    plain_scheduler = pipe.scheduler if flow else DDIMScheduler.from_config(
        pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False
    )
    original = pipe.scheduler
    ddim_eta = {} if flow else {"eta": eta}

    def plain():
        pipe.scheduler = plain_scheduler
        try:
            pipe(prompts, num_inference_steps=args.steps, guidance_scale=guidance, output_type="pt",
                 generator=[torch.Generator().manual_seed(s) for s in seeds], **ddim_eta, **video)
        finally:
            pipe.scheduler = original

    def recorded(eta=eta):
        return sample(pipe, prompts, seeds=seeds, num_steps=args.steps, guidance_scale=guidance, eta=eta,
                      **video)

    runs = {"plain": plain, "recorded": recorded} | ({"recorded, noise level 0": lambda: recorded(0.0)}
                                                     if flow else {})
    for run in runs.values():  # warm-up
        run()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(timed(run))
    median = {name: statistics.median(values) for name, values in times.items()}
    t_plain, t_rec = median["plain"], median["recorded"]

    trajectory = recorded().trajectory
    denoiser = getattr(pipe, family.denoiser_attr)
    recompute = {}
    for chunk in (1, 5, args.steps):
        def run(chunk=chunk):
            with torch.no_grad():
                recompute_log_probs(denoiser, trajectory, chunk_size=chunk)
        try:
            run()
            recompute[chunk] = statistics.median(timed(run) for _ in range(args.repeats))
        except torch.OutOfMemoryError:  # a whole trajectory in one forward can exceed a GPU at real size
            recompute[chunk] = float("nan")
            torch.cuda.empty_cache()
    kept = torch.linspace(0, args.steps - 1, 4).round().long().unique()
    records = {"all steps": trajectory, f"{len(kept)} steps kept": trajectory.keep_steps(kept),
               f"{len(kept)} steps kept, bf16": trajectory.keep_steps(kept, torch.bfloat16)}

    if str(args.device).startswith("cuda"):
        machine = f"{torch.cuda.get_device_name()}, {args.dtype}"
    else:
        machine = (
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"{args.device}, {args.dtype}"
        )
    frames = f", {args.num_frames} frames" if args.num_frames else ""
    if "height" in video:
        frames += f", {video['height']}x{video['width']}"
    guide = "guidance embedding 3.5, no CFG" if family.name == "flux" else "CFG 5"
    print(
        f"### Sampler — {args.model}, {args.steps} steps, batch {args.batch}{frames}, {guide}, eta {eta} "
        f"({machine}, {date.today()})\n"
    )
    print("| measurement | value |\n| --- | --- |")
    print(f"| plain pipeline ({'stock Euler' if flow else 'DDIM'}) | {t_plain:.3f} s |")
    print(f"| diffalign.sample with trajectory + log-probs | {t_rec:.3f} s |")
    print(f"| **recording overhead ratio** (target <= 1.10) | **{t_rec / t_plain:.3f}** |")
    if flow:
        t_zero = median["recorded, noise level 0"]
        print(f"| diffalign.sample at noise level 0 (the stock steps, recorded) | {t_zero:.3f} s |")
        print(f"| **recording overhead ratio, noise level 0** | **{t_zero / t_plain:.3f}** |")
    for chunk, seconds in recompute.items():
        print(f"| recompute all {args.steps} steps, chunk {chunk} | {seconds:.3f} s "
              f"({args.steps * args.batch / seconds:.0f} sample-steps/s) |")
    print(
        f"| **batched recompute speed-up** (chunk {args.steps} vs 1) | "
        f"**{recompute[1] / recompute[args.steps]:.2f}x** |"
    )
    for label, record in records.items():
        print(f"| stored trajectory per sample, {label} (latents, log-probs, conditioning) | "
              f"{record.nbytes() / len(record) / 2**10:,.1f} KiB |")


if __name__ == "__main__":
    main()
