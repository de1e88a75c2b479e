"""Online methods (PRDP / DDPO): where an epoch's time goes, batched recomputation, trajectory memory.

    python benchmarks/online.py [--model tiny-sdxl] [--threads 1] [--json out.json]

1. One PRDP epoch through the real objective (diffalign.objectives.online.OnlineObjective) on a LoRA UNet:
   seconds spent sampling, scoring, recomputing the reference's log-probs, and in the K gradient steps.
2. ``recompute_log_probs`` on the same trajectories with all T timesteps batched into one forward
   (chunk_size = T) vs one timestep at a time (chunk_size = 1), forward only and forward + backward.
   The ratio is the figure of merit (same run, same machine).
3. Bytes stored per sampled trajectory (latents x_T..x_0, log-probs, conditioning), measured on the
   model and computed with the same formula for real SD 1.5 / SDXL shapes at 50 steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import torch


def _timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def trajectory_bytes(trajectory) -> dict[str, float]:
    """Bytes per sample of a Trajectory's per-sample tensors."""
    n = len(trajectory)
    parts = {"latents": trajectory.latents, "log_probs": trajectory.log_probs}
    parts |= {f"cond.{k}": v for k, v in trajectory.cond.items()} | {
        f"uncond.{k}": v for k, v in trajectory.uncond.items()
    }
    return {k: v.element_size() * v.numel() / n for k, v in parts.items()}


def formula_bytes(
    steps: int, latent: tuple[int, ...], text: tuple[int, int], pooled: int, cfg: bool, elem: int
) -> float:
    """The same layout as a Trajectory: (T+1) latents, T log-probs (fp32), cond (+ uncond under CFG)."""
    latents = (steps + 1) * torch.Size(latent).numel() * elem
    cond = (text[0] * text[1] + pooled + (6 if pooled else 0)) * elem
    return latents + steps * 4 + cond * (2 if cfg else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="sampling steps T")
    parser.add_argument("--prompts", type=int, default=2, help="N")
    parser.add_argument("--per-prompt", type=int, default=4, help="B")
    parser.add_argument("--inner", type=int, default=2, help="K gradient steps")
    parser.add_argument("--reward", default="brightness")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from accelerate import Accelerator
    from peft import LoraConfig

    from diffalign.config import load_config
    from diffalign.methods import METHODS
    from diffalign.models import load_pipeline
    from diffalign.objectives import OnlineObjective, TrainContext
    from diffalign.sampler import family_of, recompute_log_probs

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    cfg = load_config(
        "configs/tiny-sdxl/prdp.yaml",
        [
            f"model.name={args.model}",
            f"method.num_prompts={args.prompts}",
            f"method.samples_per_prompt={args.per_prompt}",
            f"method.num_steps={args.steps}",
            f"method.gradient_steps_per_epoch={args.inner}",
            "method.train_timesteps=null",
            f"method.reward={args.reward}",
            f"method.recompute_chunk_size={args.steps}",
            "method.prompts=toy-train"
            if args.model.startswith("toy")
            else "method.prompts=data/tiny-prompts.txt",
        ],
    )
    ctx = TrainContext(
        cfg, METHODS["prdp"], Accelerator(cpu=True), pipe, family_of(pipe), unet, None, torch.float32
    )
    objective = OnlineObjective(ctx)
    optimizer = torch.optim.AdamW(lora, lr=1e-4)

    # 1. one epoch, split
    t0 = time.perf_counter()
    batch = objective.next_epoch()
    collect_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.inner):
        out = objective(batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    train_s = time.perf_counter() - t0
    epoch = {
        "sampling_s": batch.stats["sampling_s"],
        "scoring_s": batch.stats["scoring_s"],
        "reference_s": batch.stats["reference_s"],
        "training_s": train_s,
        "other_s": collect_s
        - batch.stats["sampling_s"]
        - batch.stats["scoring_s"]
        - batch.stats["reference_s"],
    }
    total = sum(epoch.values())
    epoch_share = {k: v / total for k, v in epoch.items()}

    # 2. batched vs per-step recomputation (same trajectories, all T steps), for several chunk sizes
    trajectory = batch.trajectory
    chunks = sorted({1, *(c for c in (2, 5) if c < args.steps), args.steps})

    def fwd_bwd(chunk):
        def run():
            recompute_log_probs(unet, trajectory, chunk_size=chunk).sum().backward()
            optimizer.zero_grad()
        return run

    recompute = {}
    for chunk in chunks:
        with torch.no_grad():
            forward = _timed(lambda c=chunk: recompute_log_probs(unet, trajectory, chunk_size=c))
        recompute[chunk] = {"forward_s": forward, "fwd_bwd_s": _timed(fwd_bwd(chunk))}
    for chunk in chunks:
        recompute[chunk]["forward_speedup_vs_1"] = recompute[1]["forward_s"] / recompute[chunk]["forward_s"]
        recompute[chunk]["fwd_bwd_speedup_vs_1"] = recompute[1]["fwd_bwd_s"] / recompute[chunk]["fwd_bwd_s"]
    same = torch.allclose(recompute_log_probs(unet, trajectory, chunk_size=1).detach(),
                          recompute_log_probs(unet, trajectory, chunk_size=args.steps).detach(), atol=1e-5)

    # 3. memory per stored trajectory
    measured = trajectory_bytes(trajectory)
    real = {
        "sd15_512_T50_fp32_MB": formula_bytes(50, (4, 64, 64), (77, 768), 0, True, 4) / 2**20,
        "sd15_512_T50_fp16_MB": formula_bytes(50, (4, 64, 64), (77, 768), 0, True, 2) / 2**20,
        "sdxl_1024_T50_fp32_MB": formula_bytes(50, (4, 128, 128), (77, 2048), 1280, True, 4) / 2**20,
        "sdxl_1024_T50_fp16_MB": formula_bytes(50, (4, 128, 128), (77, 2048), 1280, True, 2) / 2**20,
    }
    check = formula_bytes(args.steps, tuple(trajectory.latents.shape[2:]),
                          tuple(trajectory.cond["encoder_hidden_states"].shape[1:]),
                          trajectory.cond.get("text_embeds", torch.zeros(1, 0)).shape[1], trajectory.do_cfg,
                          trajectory.latents.element_size())

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), CPU",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": args.model, "N": args.prompts, "B": args.per_prompt, "T": args.steps, "K": args.inner,
        "epoch_s": epoch, "epoch_share": epoch_share,
        "recompute_by_chunk_size": recompute, "recompute_equal": same, "recompute_samples": len(trajectory),
        "bytes_per_trajectory": measured | {"total": sum(measured.values()), "formula": check},
        "real_models_per_trajectory": real,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
