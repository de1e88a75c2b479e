"""How ReFL's two terms pull at the start: LoRA gradient norms of the reward term and of the pretraining term.

    python benchmarks/refl_gradient_balance.py                       # configs/toy-sdxl/refl.yaml
    python benchmarks/refl_gradient_balance.py --config configs/tiny-sdxl/refl.yaml method.num_steps=4 \\
        method.refl_step_range=[2,3] method.pretrain_loss_weight=1 method.pretrain_data=data/shapes-pairs \\
        data.resolution=32

On one micro-step of the config's objective with the freshly added LoRA (B = 0, so only the B tensors carry
gradient), it prints ``|∇ scale · mean ReLU(c - r)|`` and ``|∇ L_pretrain|`` (the unweighted denoising loss
of the first pretraining batch): the weight ``w`` that gives the two terms gradients of one order is about
their ratio. Every gradient is taken through the trainer's own objective (sampling, the ReFL step, the VAE
decode, the scorer; the pretraining batch and its keyed draws).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator

from diffalign.config import load_config
from diffalign.families import family_of
from diffalign.methods import METHODS
from diffalign.objectives import OBJECTIVES, TrainContext
from diffalign.objectives.reward_gradient import ChainSteps, latents_for_reward, pretraining_loss
from diffalign.train import load_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/toy-sdxl/refl.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    if not getattr(cfg.method, "pretrain_data", ""):
        parser.error("the config needs method.pretrain_data and method.pretrain_loss_weight > 0")
    spec, accelerator = METHODS[cfg.method.name], Accelerator(cpu=True)
    pipe, denoiser, _, noise, dtype, _ = load_models(cfg, spec, accelerator)  # the trainer's own models
    ctx = TrainContext(cfg, spec, accelerator, pipe, family_of(pipe), denoiser, noise, dtype)
    objective = OBJECTIVES[spec.kind](ctx)
    lora = [p for n, p in denoiser.named_parameters() if "lora_" in n]

    prompts, seeds = next(objective.batches())
    trajectory = objective.sample_chain(prompts, seeds)
    chain = ChainSteps(denoiser, ctx.family, trajectory, ctx.device, ctx.weight_dtype)
    x, _ = latents_for_reward(cfg.method, chain, trajectory.latents, objective.generator)
    rewards = objective.scorer.score(objective.decode(x), prompts)
    reward_term = spec.reward_loss(cfg.method, rewards, torch.zeros(())).loss  # w · 0: the reward term alone
    pretrain = pretraining_loss(ctx, next(iter(objective.batches_of)), "balance")

    def norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, lora, allow_unused=True)
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))

    reward_norm, pretrain_norm = norm(reward_term), norm(pretrain)
    print(f"{args.config}: reward mean {rewards.mean().item():.4f}, |grad reward term| {reward_norm:.3g}, "
          f"L_pretrain {pretrain.item():.4f}, |grad L_pretrain| {pretrain_norm:.3g}, ratio (the w of equal "
          f"norms) {reward_norm / pretrain_norm:.3g}")


if __name__ == "__main__":
    main()
