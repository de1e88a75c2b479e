"""GRPO for diffusion (Flow-GRPO; DanceGRPO's choices as settings): group-relative PPO on the SDE steps.

Sources: FG = yifan123/flow_grpo@ac4c86e (train_sd3.py, config/grpo.py; FG+ = 54809b5/74db691 for the
Fast variant), DG = XueZeyue/DanceGRPO@15cc71d (fastvideo/train_grpo_flux.py). Each prompt is sampled
``G`` times; with rewards ``r`` of a group ``g``::

    A      = clip((r - mean_g(r)) / (std + eps), ±adv_clip_max)     std: of all rewards (FG's global_std)
                                                                    or of the group; eps 1e-4 (FG), 1e-8 (DG)
    ρ_t    = exp(log π_θ(x_{t-1}|x_t) - log π_old(x_{t-1}|x_t))     log π: mean over elements (steps.py)
    L_clip = mean over samples and trained steps of max(-A ρ_t, -A clip(ρ_t, 1 ± clip_range))
    KL_t   = ⟨(μ_θ - μ_ref)²⟩ / (2 σ_t²)                            σ_t: the step's std (StepResult.std;
                                                                    FG's std_dev_t·√-Δ), μ: the step's mean
    L      = L_clip + beta · mean KL_t                              beta 0 (FG base); .04 geneval/ocr,
                                                                    .004 wan

Groups whose rewards are all equal have A = 0 everywhere and are skipped (and counted, the metric
``num_flat_groups``). The trained steps are the first ``int(S · timestep_fraction)`` of the ``S`` stored
stochastic steps (FG), a random ``int(S' · timestep_fraction)`` per sample and gradient step (DG, S' = S
without the last step with ``drop_last_step``), or a window of ``window_size`` steps, its start drawn per
epoch from ``U{lo .. hi - size}``, inside which the sampler is stochastic and outside of which it is the
ODE (``noisy_steps`` of the step rules; FG+ Fast), in sampling and in training alike. DanceGRPO also
shares one initial noise within each group (the online setting ``shared_group_noise``). Training without
CFG is ``guidance_scale: 1`` (sampling and ρ both conditional-only, as FG's ``*_nocfg`` configs).

Wiring (``method.name: grpo``, :mod:`diffalign.objectives.online`): the config is :class:`GRPOConfig`, the
online loop's settings plus GRPO's own; ``eta`` is DDIM's eta on the UNet families and the SDE's noise
level ``a`` on the flow families (FG .7, DG .3). Advantages come from every finite reward of the epoch:
the groups' means from this process's (a group is sampled on one process), the global std from every
process's (as FG, which gathers the rewards); with ``beta > 0`` the reference (LoRA
adapters disabled) gives each step's mean once per epoch, and the policy's means are recomputed with its
log-probs at every gradient step. ``ema: true`` keeps an EMA of the trained weights (FG's decay
``min((1 + n) / (10 + n), 0.9)``, every 8th optimizer step) that, as in FG, is used only at the end: the
run's after-evaluation and export are the EMA's weights (training, validation images and checkpoints use
the trained weights; checkpoints also hold the EMA, so a resume is exact).

Unverified (named settings): DG's group std is taken from torch's ``.std()`` (Bessel-corrected) as seen in
copies of its script, not DG@15cc71d itself (``std_unbiased``); whether DG's random step count counts the
dropped last step (``drop_last_step``); the Fast window's exact draw (``window_range``, from the fork
Xianchao-Wu/flow_grpo).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from diffusers.training_utils import EMAModel

from diffalign.methods.base import LossOutput, MethodSpec, register_method
from diffalign.methods.ddpo import ddpo_loss
from diffalign.methods.online_settings import OnlineSettings, validate_online_settings
from diffalign.steps import DDIMStep, FlowCPSStep, FlowSDEStep


@dataclass
class GRPOConfig(OnlineSettings):
    """The online loop's settings (:class:`OnlineSettings`) and GRPO's own."""

    name: ClassVar[str] = "grpo"
    clip_range: float = 1e-4  # PPO clip on ρ_t (FG, DG); FG+ *_fast_nocfg: 1e-5
    adv_clip_max: float = 5.0
    global_std: bool = True  # FG default: one std over every process's rewards; False: per group (DG)
    std_eps: float = 1e-4  # FG 1e-4, DG 1e-8
    std_unbiased: bool = False  # FG: population std (np.std); DG: torch .std(), Bessel-corrected (unverified)
    beta: float = 0.0  # KL weight
    # Which stored steps are trained: "fraction" (FG), "random" (DG), "window" (FG+ Fast).
    timestep_selection: Literal["fraction", "random", "window"] = "fraction"
    timestep_fraction: float = 0.99  # FG .99 (10 steps -> 9); DG .6
    drop_last_step: bool = False  # DG --ignore_last: the last step is never trained (random selection)
    window_size: int = 2  # Fast: SDE steps per trajectory (FG+ default 2; *_fast_nocfg 3)
    # Fast: the window lies in steps [lo, hi) (FG+ [0, 10]; nocfg [0, 5])
    window_range: list[int] = field(default_factory=lambda: [0, 10])
    # flow families' stochastic step: FG's SDE, DG's constant-noise SDE, or FG+'s CPS (diffalign.steps)
    sde: Literal["flow_grpo", "dance_grpo", "cps"] = "flow_grpo"
    ema: bool = False  # FG: EMA of the trained weights, for evaluation and saving only
    ema_max_decay: float = 0.9
    ema_update_interval: int = 8


def validate_grpo_settings(cfg: GRPOConfig, require, num_steps: int) -> None:
    """Range checks on GRPO's own fields; ``require(ok, key_path, value, expected)`` as the trainer's."""
    require(cfg.clip_range > 0, "method.clip_range", cfg.clip_range, "a number > 0 (Flow-GRPO uses 1e-4)")
    require(cfg.adv_clip_max > 0, "method.adv_clip_max", cfg.adv_clip_max, "a number > 0 (Flow-GRPO uses 5)")
    require(cfg.std_eps > 0, "method.std_eps", cfg.std_eps, "a number > 0 (Flow-GRPO 1e-4, DanceGRPO 1e-8)")
    require(cfg.beta >= 0, "method.beta", cfg.beta, "a number >= 0")
    require(cfg.timestep_selection in ("fraction", "random", "window"), "method.timestep_selection",
            cfg.timestep_selection, "one of fraction, random, window")
    require(
        cfg.sde in ("flow_grpo", "dance_grpo", "cps"), "method.sde", cfg.sde, "flow_grpo, dance_grpo or cps"
    )
    if cfg.timestep_selection in ("fraction", "random"):
        candidates = num_steps - int(cfg.drop_last_step and cfg.timestep_selection == "random")
        require(0 < cfg.timestep_fraction <= 1 and int(candidates * cfg.timestep_fraction) >= 1,
                "method.timestep_fraction", cfg.timestep_fraction,
                f"a number in (0, 1] that keeps at least one of {candidates} steps")
    else:
        ok = len(cfg.window_range) == 2
        require(ok, "method.window_range", list(cfg.window_range), "two integers [lo, hi]")
        lo, hi = cfg.window_range if ok else (0, num_steps)
        require(0 <= lo < hi <= num_steps, "method.window_range", list(cfg.window_range),
                f"[lo, hi] with 0 <= lo < hi <= num_steps ({num_steps})")
        require(1 <= cfg.window_size <= hi - lo, "method.window_size", cfg.window_size,
                f"an integer in [1, hi - lo] = [1, {hi - lo}]")
    require(
        cfg.ema_update_interval >= 1, "method.ema_update_interval", cfg.ema_update_interval, "an integer >= 1"
    )
    require(0 <= cfg.ema_max_decay < 1, "method.ema_max_decay", cfg.ema_max_decay, "a number in [0, 1)")


# ----------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------
def group_advantages(
    rewards: torch.Tensor,
    groups: torch.Tensor,
    *,
    global_std: bool = True,
    eps: float = 1e-4,
    unbiased: bool = False,
    adv_clip_max: float = 5.0,
    std_over: torch.Tensor | None = None,
) -> torch.Tensor:
    """``clip((r - mean_group) / (std + eps), ±adv_clip_max)`` [n] fp32; std of all rewards or of the
    group. ``std_over``: the rewards the global std is taken over when they are more than ``rewards``
    (every process's, FG's gather; the groups' means stay those of ``rewards``)."""
    r = rewards.float()
    centered = torch.zeros_like(r)
    scale = torch.zeros_like(r)
    pool = r if std_over is None else std_over.float()
    all_std = pool.std(unbiased=unbiased) if len(pool) > 1 else r.new_zeros(())
    for g in groups.unique():
        member = groups == g
        centered[member] = r[member] - r[member].mean()
        group_std = r[member].std(unbiased=unbiased) if int(member.sum()) > 1 else r.new_zeros(())
        scale[member] = all_std if global_std else group_std
    return (centered / (scale + eps)).clamp(-adv_clip_max, adv_clip_max)


# ----------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------
def flow_grpo_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's per-step KL ``⟨(μ_θ - μ_ref)²⟩ / (2 σ²)``: ``mean``/``mean_ref`` [n, S, ...], ``std`` [n,
    S]."""
    squared = (mean.float() - mean_ref.detach().float()) ** 2
    return squared.flatten(2).mean(dim=2) / (2 * std.detach().float() ** 2)


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
    beta: float = 0.0,
    mean: torch.Tensor | None = None,
    mean_ref: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> LossOutput:
    """PPO-clip (DDPO's form) plus ``beta ·`` Flow-GRPO's KL on ``n`` samples at ``S`` trained steps.

    ``logp``/``logp_old`` [n, S]; ``advantages`` [n]; with ``beta > 0``, the steps' means under the policy
    and the reference ``mean``/``mean_ref`` [n, S, ...] and their std ``std`` [n, S] (StepResult fields).
    """
    clipped = ddpo_loss(logp, logp_old, advantages, clip_range=clip_range, adv_clip_max=adv_clip_max)
    ratio = torch.exp(logp.detach() - logp_old.detach())
    extra = dict(clipped.extra, ratio_mean=ratio.mean(), policy_loss=clipped.loss.detach())
    loss = clipped.loss
    if beta > 0:
        if mean is None or mean_ref is None or std is None:
            raise ValueError("grpo_loss with beta > 0 needs the steps' mean, mean_ref and std")
        kl = flow_grpo_kl(mean, mean_ref, std).mean()
        loss = loss + beta * kl
        extra["kl"] = kl.detach()
    return LossOutput(loss, clipped.implicit_acc, clipped.reward_margin, extra)


# ----------------------------------------------------------------------------------------------------
# Which steps are stochastic and trained
# ----------------------------------------------------------------------------------------------------
def fraction_steps(num_steps: int, fraction: float) -> torch.Tensor:
    """Flow-GRPO: the first ``int(num_steps · fraction)`` steps (Python's ``int``, as FG)."""
    return torch.arange(int(num_steps * fraction))


def random_steps(num_samples: int, num_steps: int, fraction: float, *, drop_last: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """DanceGRPO: ``[num_samples, k]`` sorted step indices, a fresh random subset per sample, ``k =
    int(T' · fraction)`` of ``T' = num_steps`` steps (``num_steps - 1`` with ``drop_last``)."""
    candidates = num_steps - int(drop_last)
    k = int(candidates * fraction)
    rows = [torch.randperm(candidates, generator=generator)[:k].sort().values for _ in range(num_samples)]
    return torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)


def sde_window(num_steps: int, size: int, window_range, generator: torch.Generator | None = None
               ) -> tuple[int, int]:
    """Flow-GRPO-Fast: ``(start, start + size)`` with ``start ~ U{lo .. hi - size}``, the steps that are
    stochastic and trained (the step rules' ``noisy_steps``); every other step is the ODE."""
    lo, hi = window_range
    if not (0 <= lo < hi <= num_steps and 1 <= size <= hi - lo):
        raise ValueError(f"window of {size} steps in [{lo}, {hi}) does not fit {num_steps} steps")
    start = int(torch.randint(lo, hi - size + 1, (), generator=generator))
    return start, start + size


def train_step_indices(cfg: GRPOConfig, num_samples: int, num_steps: int, *,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The trained steps per sample ``[num_samples, k]``, indices into the ``num_steps`` stored stochastic
    steps, under ``cfg.timestep_selection`` ("window": all of them, the sampler was stochastic only there)."""
    if cfg.timestep_selection == "fraction":
        return fraction_steps(num_steps, cfg.timestep_fraction).expand(num_samples, -1)
    if cfg.timestep_selection == "random":
        return random_steps(num_samples, num_steps, cfg.timestep_fraction, drop_last=cfg.drop_last_step,
                            generator=generator)
    if cfg.timestep_selection == "window":
        return torch.arange(num_steps).expand(num_samples, -1)
    raise ValueError(
        f"unknown timestep_selection {cfg.timestep_selection!r}; expected fraction, random or window"
    )


def flow_step_rule(cfg: GRPOConfig, noise_level: float, noisy_steps: tuple[int, int] | None = None):
    """The flow families' sampling step of ``cfg.sde`` (DanceGRPO's SDE is the constant-noise one),
    stochastic only at ``noisy_steps`` when given."""
    if cfg.sde == "cps":
        return FlowCPSStep(noise_level=noise_level, noisy_steps=noisy_steps)
    return FlowSDEStep(noise_level=noise_level, noisy_steps=noisy_steps,
                       noise_schedule={"flow_grpo": "flow_grpo", "dance_grpo": "constant"}[cfg.sde])


# ----------------------------------------------------------------------------------------------------
# EMA of the trained weights (diffusers' EMAModel with Flow-GRPO's schedule)
# ----------------------------------------------------------------------------------------------------
def flow_grpo_ema_decay(step: int, max_decay: float = 0.9) -> float:
    return min((1 + step) / (10 + step), max_decay)


def make_ema(parameters, max_decay: float = 0.9) -> EMAModel:
    """An EMA of ``parameters`` whose decay at optimizer step ``n`` is ``min((1 + n) / (10 + n), max_decay)``
    when updated through :func:`ema_update` (diffusers' non-warmup schedule, counted in optimizer steps)."""
    return EMAModel(parameters, decay=max_decay, min_decay=0.0, update_after_step=0, use_ema_warmup=False)


def ema_update(ema: EMAModel, parameters, step: int, interval: int = 8) -> bool:
    """Update ``ema`` after optimizer step ``step`` (0-based) when ``(step + 1) % interval == 0`` (FG);
    True when it updated. At step 0 diffusers' schedule gives decay 0 where FG gives 0.1: with FG's
    interval 8 no update falls there."""
    if (step + 1) % interval:
        return False
    ema.optimization_step = step  # EMAModel adds one and decays with (1 + step) / (10 + step)
    ema.step(parameters)
    return True


# ----------------------------------------------------------------------------------------------------
# The trainer's hooks (diffalign.objectives.online)
# ----------------------------------------------------------------------------------------------------
def _validate(cfg: GRPOConfig, require) -> None:
    validate_online_settings(cfg, require)
    validate_grpo_settings(cfg, require, cfg.num_steps)
    require(cfg.samples_per_prompt >= 2, "method.samples_per_prompt", cfg.samples_per_prompt,
            "an integer >= 2 (advantages are relative to the prompt's group)")
    require(cfg.train_timesteps is None, "method.train_timesteps", cfg.train_timesteps,
            "null (GRPO picks its trained steps with timestep_selection and timestep_fraction)")
    require(cfg.beta == 0 or cfg.steps_per_backward is None, "method.steps_per_backward",
            cfg.steps_per_backward, "null when beta > 0 (the KL needs the steps' means in one graph)")


def _sampling_rule(cfg: GRPOConfig, family_rule, generator: torch.Generator):
    """The epoch's step rule: the family's (DDIM at ``eta``) or ``cfg.sde`` (flow families at noise level
    ``eta``), stochastic only inside this epoch's window for ``timestep_selection: window``."""
    window = None
    if cfg.timestep_selection == "window":
        window = sde_window(cfg.num_steps, cfg.window_size, cfg.window_range, generator)
    if isinstance(family_rule, DDIMStep):
        if cfg.sde != "flow_grpo":
            raise ValueError(f"method.sde={cfg.sde!r} is a flow-matching SDE; this model samples with DDIM "
                             "(leave method.sde at flow_grpo: the UNet families use DDIM's eta)")
        return DDIMStep(eta=cfg.eta, noisy_steps=window)
    return flow_step_rule(cfg, cfg.eta, window)


def _online_loss(cfg: GRPOConfig, part, logp: torch.Tensor, mean: torch.Tensor | None = None) -> LossOutput:
    return grpo_loss(logp, part.logp_old, part.advantages, clip_range=cfg.clip_range,
                     adv_clip_max=cfg.adv_clip_max, beta=cfg.beta, mean=mean, mean_ref=part.mean_ref,
                     std=part.step_std)


def _loss_weight(cfg: GRPOConfig, part) -> float:
    """A micro-batch carries its share of the epoch's samples."""
    return float(len(part.rewards))


def _advantages(cfg: GRPOConfig, rewards: torch.Tensor, groups: torch.Tensor,
                every_reward: torch.Tensor) -> torch.Tensor:
    return group_advantages(rewards, groups, global_std=cfg.global_std, eps=cfg.std_eps,
                            unbiased=cfg.std_unbiased, adv_clip_max=cfg.adv_clip_max, std_over=every_reward)


def _train_columns(cfg: GRPOConfig, num_samples: int, num_steps: int, generator: torch.Generator):
    return train_step_indices(cfg, num_samples, num_steps, generator=generator)


register_method(MethodSpec(
    "grpo", GRPOConfig, kind="online", needs_reference=False, validate=_validate, online_loss=_online_loss,
    loss_weight=_loss_weight, advantages=_advantages, sampling_rule=_sampling_rule,
    train_columns=_train_columns, step_means=lambda cfg: cfg.beta > 0,
    ema_settings=lambda cfg: (cfg.ema_max_decay, cfg.ema_update_interval) if cfg.ema else None,
))
