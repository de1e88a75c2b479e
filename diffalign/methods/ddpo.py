"""DDPO (Black et al., 2023), the PPO-clip baseline of the online methods.

Rewards are standardised within each prompt's group of samples into advantages ``A`` (clipped at
``±adv_clip_max``); every stored step is one PPO action with ratio
``ρ_t = π_θ(x_{t-1}|x_t) / π_old(x_{t-1}|x_t)``::

    loss = mean over samples and steps of max(-A·ρ_t, -A·clip(ρ_t, 1 - c, 1 + c))

It runs on the same online loop and records as PRDP (:mod:`diffalign.objectives.online`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffalign.methods.base import LossOutput, MethodSpec, register_method
from diffalign.methods.online_settings import OnlineSettings, validate_online_settings


@dataclass
class DDPOConfig(OnlineSettings):
    name: ClassVar[str] = "ddpo"
    clip_range: float = 1e-4  # PPO clip c on the per-step ratio (DDPO's value)
    adv_clip_max: float = 5.0  # advantages are clipped to [-adv_clip_max, adv_clip_max]


def per_prompt_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` within each group (population std); a group of equal rewards gives 0."""
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    for g in groups.unique():
        member = groups == g
        r = rewards[member].float()
        advantages[member] = (r - r.mean()) / (r.std(unbiased=False) + eps)
    return advantages


def ddpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
) -> LossOutput:
    """PPO-clip loss on ``n`` trajectories at ``S`` steps: ``logp``/``logp_old`` [n, S], ``advantages``
    [n]."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)[:, None]
    log_ratio = logp - logp_old.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    moved = log_ratio.detach()
    return LossOutput(
        loss=loss,
        # how often the policy moved a step's likelihood the way its advantage asks
        implicit_acc=((moved * adv) > 0).float().mean(),
        reward_margin=(moved * adv).mean(),
        extra={
            "approx_kl": 0.5 * (moved**2).mean(),
            "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
        },
    )


def _validate(cfg: DDPOConfig, require) -> None:
    validate_online_settings(cfg, require)
    require(cfg.clip_range > 0, "method.clip_range", cfg.clip_range, "a number > 0 (DDPO uses 1e-4)")
    require(cfg.adv_clip_max > 0, "method.adv_clip_max", cfg.adv_clip_max, "a number > 0 (DDPO uses 5)")
    require(cfg.samples_per_prompt >= 2, "method.samples_per_prompt", cfg.samples_per_prompt,
            "an integer >= 2 (advantages are standardised within each prompt's samples)")


def _online_loss(cfg: DDPOConfig, part, logp: torch.Tensor) -> LossOutput:
    return ddpo_loss(logp, part.logp_old, part.advantages, clip_range=cfg.clip_range,
                     adv_clip_max=cfg.adv_clip_max)


def _loss_weight(cfg: DDPOConfig, part) -> float:
    """A micro-batch carries its share of the epoch's samples."""
    return float(len(part.rewards))


def _advantages(cfg: DDPOConfig, rewards: torch.Tensor, groups: torch.Tensor,
                every_reward: torch.Tensor) -> torch.Tensor:
    return per_prompt_advantages(rewards, groups)


register_method(MethodSpec("ddpo", DDPOConfig, kind="online", needs_reference=False, validate=_validate,
                           online_loss=_online_loss, loss_weight=_loss_weight, advantages=_advantages))
