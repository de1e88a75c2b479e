"""PRDP (Deng et al., 2024): proximal reward difference prediction, an online method.

For a stored trajectory, the per-step log ratio of the policy ``θ`` to the frozen reference is
``r̂_t = log π_θ(x_{t-1}|x_t) - log π_ref(x_{t-1}|x_t)`` and the trajectory's implicit reward is
``r̂ = mean_t r̂_t`` (the appendix code; ``log_ratio: sum`` gives the equations' sum). For two
trajectories ``a``, ``b`` of the same prompt with rewards ``r(a) > r(b)``::

    l      = (r̂(a) - r̂(b) - (r(a) - r(b)) / β)²               predict the reward difference
    l_clip = the same with r̂_t clipped to [r̂_old,t - ε, r̂_old,t + ε] per step (θ_old: the sampler)
    loss   = mean over ordered pairs of max(l, l_clip)            proximal, like PPO's clipped objective

The online loop (sampling with θ_old, scoring, storing ``log π_old`` and ``log π_ref``, K gradient
steps) lives in :mod:`diffalign.objectives.online`; its settings are the fields of :class:`OnlineSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from diffalign.methods.base import LossOutput, MethodSpec, register_method
from diffalign.methods.online_settings import OnlineSettings, validate_online_settings


@dataclass
class PRDPConfig(OnlineSettings):
    name: ClassVar[str] = "prdp"
    beta: float = 3e-5  # paper, small-scale setting (large-scale: 3e-6)
    clip_epsilon: float = 1e-6  # per-step proximal clip ε (large-scale: 1e-4)
    log_ratio: Literal["mean", "sum"] = "mean"  # r̂ over steps: appendix code (mean) or equations (sum)


def reward_pairs(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(a, b)`` of all ordered pairs within the same group with ``rewards[a] > rewards[b]``."""
    same = groups[:, None] == groups[None, :]
    better = rewards[:, None] > rewards[None, :]
    a, b = torch.nonzero(same & better, as_tuple=True)
    return a, b


def prdp_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor,
    rewards: torch.Tensor,
    groups: torch.Tensor,
    *,
    beta: float = 3e-5,
    clip_epsilon: float = 1e-6,
    log_ratio: str = "mean",
) -> LossOutput:
    """PRDP loss on ``n`` trajectories at ``S`` steps: ``logp*`` are [n, S], ``rewards``/``groups`` [n].

    ``groups`` gives each trajectory's prompt group (pairs never cross groups). With no pair the loss is
    a zero that still has a graph, and ``extra["num_pairs"]`` is 0.
    """
    ratio_t = logp - logp_ref
    old_t = (logp_old - logp_ref).detach()
    clipped_t = torch.clamp(ratio_t, old_t - clip_epsilon, old_t + clip_epsilon)
    if log_ratio == "mean":
        r_hat, r_hat_clip = ratio_t.mean(dim=1), clipped_t.mean(dim=1)
    elif log_ratio == "sum":
        r_hat, r_hat_clip = ratio_t.sum(dim=1), clipped_t.sum(dim=1)
    else:
        raise ValueError(f"unknown PRDP log_ratio {log_ratio!r}; expected mean or sum")

    a, b = reward_pairs(rewards, groups)
    target = (rewards[a] - rewards[b]) / beta
    l_plain = (r_hat[a] - r_hat[b] - target) ** 2
    l_clip = (r_hat_clip[a] - r_hat_clip[b] - target) ** 2
    losses = torch.maximum(l_plain, l_clip)
    margin = (r_hat[a] - r_hat[b]).detach()
    if len(a) == 0:
        zero = logp.sum() * 0.0
        return LossOutput(
            zero, zero.detach(), zero.detach(), {"num_pairs": torch.tensor(0.0), "clipfrac": zero.detach()}
        )
    return LossOutput(
        loss=losses.mean(),
        implicit_acc=(margin > 0).float().mean(),
        reward_margin=margin.mean(),
        extra={
            "num_pairs": torch.tensor(float(len(a))),
            "clipfrac": ((ratio_t - old_t).abs() > clip_epsilon).float().mean().detach(),
            "target_margin": target.mean().detach(),
        },
    )


def _validate(cfg: PRDPConfig, require) -> None:
    validate_online_settings(cfg, require)
    require(cfg.beta > 0, "method.beta", cfg.beta, "a number > 0 (the paper uses 3e-5 or 3e-6)")
    require(
        cfg.clip_epsilon > 0,
        "method.clip_epsilon",
        cfg.clip_epsilon,
        "a number > 0 (the paper uses 1e-6 or 1e-4)",
    )
    require(cfg.samples_per_prompt >= 2, "method.samples_per_prompt", cfg.samples_per_prompt,
            "an integer >= 2 (PRDP compares trajectories of the same prompt)")


def _online_loss(cfg: PRDPConfig, part, logp: torch.Tensor) -> LossOutput:
    return prdp_loss(logp, part.logp_old, part.logp_ref, part.rewards, part.groups, beta=cfg.beta,
                     clip_epsilon=cfg.clip_epsilon, log_ratio=cfg.log_ratio)


def _loss_weight(cfg: PRDPConfig, part) -> float:
    """A micro-batch carries its share of the epoch's reward pairs."""
    return float(len(reward_pairs(part.rewards, part.groups)[0]))


register_method(MethodSpec("prdp", PRDPConfig, kind="online", needs_reference=True, validate=_validate,
                           online_loss=_online_loss, loss_weight=_loss_weight))
