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

Groups whose rewards are all equal have A = 0 everywhere and are skipped (and counted). The trained steps
are the first ``int(T · timestep_fraction)`` (FG), a random ``int(T' · timestep_fraction)`` per sample
(DG, T' = T without the last step), or a window of ``window_size`` steps drawn from
``U{lo .. hi - size}`` inside which the sampler is stochastic and outside of which it is the ODE (FG+
Fast). DanceGRPO also shares one initial noise within each group (``shared_group_noise``). The optional
EMA of the weights uses FG's decay ``min((1 + n) / (10 + n), 0.9)``, every 8th optimizer step.

Unverified (named settings): DG's group std is taken from torch's ``.std()`` (Bessel-corrected) as seen in
copies of its script, not DG@15cc71d itself (``std_unbiased``); whether DG's random step count counts the
dropped last step (``drop_last_step``); the Fast window's exact draw (``window_range``, from the fork
Xianchao-Wu/flow_grpo).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor

from diffalign.methods.base import LossOutput
from diffalign.methods.ddpo import ddpo_loss
from diffalign.steps import FlowCPSStep, FlowSDEStep


@dataclass
class GRPOConfig:
    """GRPO's own settings (merged with the online loop's settings when it is wired into the trainer)."""

    name: ClassVar[str] = "grpo"
    clip_range: float = 1e-4  # PPO clip on ρ_t (FG, DG); FG+ *_fast_nocfg: 1e-5
    adv_clip_max: float = 5.0
    global_std: bool = True  # FG default: one std over all of the epoch's rewards; False: per group (DG)
    std_eps: float = 1e-4  # FG 1e-4, DG 1e-8
    std_unbiased: bool = False  # FG: population std (np.std); DG: torch .std(), Bessel-corrected (unverified)
    beta: float = 0.0  # KL weight
    # Which stored steps are trained: "fraction" (FG), "random" (DG), "window" (FG+ Fast).
    timestep_selection: Literal["fraction", "random", "window"] = "fraction"
    timestep_fraction: float = 0.99  # FG .99 (10 steps -> 9); DG .6
    drop_last_step: bool = False  # DG --ignore_last: the last step is never trained (random selection)
    window_size: int = 2  # Fast: SDE steps per trajectory (FG+ default 2; *_fast_nocfg 3)
    window_range: tuple[int, int] = (
        0,
        10,
    )  # Fast: the window lies in steps [lo, hi) (FG+ (0, 10); nocfg (0, 5))
    # flow families' stochastic step: FG's SDE, DG's constant-noise SDE, or FG+'s CPS (diffalign.steps)
    sde: Literal["flow_grpo", "dance_grpo", "cps"] = "flow_grpo"
    shared_group_noise: bool = False  # DG --init_same_noise: one initial noise per prompt group
    train_cfg: bool = True  # FG train.cfg: ρ is recomputed with the sampling CFG; False: conditional only
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
        lo, hi = cfg.window_range
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
) -> torch.Tensor:
    """``clip((r - mean_group) / (std + eps), ±adv_clip_max)`` [n] fp32; std of all rewards or of the
    group."""
    r = rewards.float()
    centered = torch.zeros_like(r)
    scale = torch.zeros_like(r)
    all_std = r.std(unbiased=unbiased) if len(r) > 1 else r.new_zeros(())
    for g in groups.unique():
        member = groups == g
        centered[member] = r[member] - r[member].mean()
        group_std = r[member].std(unbiased=unbiased) if int(member.sum()) > 1 else r.new_zeros(())
        scale[member] = all_std if global_std else group_std
    return (centered / (scale + eps)).clamp(-adv_clip_max, adv_clip_max)


def informative_groups(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(keep [n] bool, num_skipped)``: samples of groups whose rewards are not all equal, and how many
    groups were skipped (all advantages of such a group are 0: nothing to learn from it)."""
    keep = torch.ones_like(groups, dtype=torch.bool)
    skipped = 0
    for g in groups.unique():
        member = groups == g
        values = rewards[member]
        if bool((values == values[0]).all()):
            keep &= ~member
            skipped += 1
    return keep, skipped


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


class SDEWindow(NamedTuple):
    noise_levels: torch.Tensor  # [T] the sampler's noise level per step: the SDE's inside, 0 (ODE) outside
    train_steps: torch.Tensor  # [size] the steps trained on (the window)


def sde_window(num_steps: int, size: int, window_range: tuple[int, int], noise_level: float,
               generator: torch.Generator | None = None) -> SDEWindow:
    """Flow-GRPO-Fast: ``start ~ U{lo .. hi - size}``; steps ``[start, start + size)`` are stochastic with
    ``noise_level`` and trained, every other step is deterministic (noise level 0, the ODE)."""
    lo, hi = window_range
    if not (0 <= lo < hi <= num_steps and 1 <= size <= hi - lo):
        raise ValueError(f"window of {size} steps in [{lo}, {hi}) does not fit {num_steps} steps")
    start = int(torch.randint(lo, hi - size + 1, (), generator=generator))
    levels = torch.zeros(num_steps)
    levels[start : start + size] = noise_level
    return SDEWindow(levels, torch.arange(start, start + size))


def train_step_indices(cfg: GRPOConfig, num_samples: int, num_steps: int, *, window: SDEWindow | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The trained steps per sample ``[num_samples, k]`` under ``cfg.timestep_selection`` (the window's
    steps for "window": pass the :class:`SDEWindow` the epoch was sampled with)."""
    if cfg.timestep_selection == "fraction":
        return fraction_steps(num_steps, cfg.timestep_fraction).expand(num_samples, -1)
    if cfg.timestep_selection == "random":
        return random_steps(num_samples, num_steps, cfg.timestep_fraction, drop_last=cfg.drop_last_step,
                            generator=generator)
    if cfg.timestep_selection == "window":
        if window is None:
            raise ValueError("timestep_selection 'window' needs the SDEWindow the samples were drawn with")
        return window.train_steps.expand(num_samples, -1)
    raise ValueError(
        f"unknown timestep_selection {cfg.timestep_selection!r}; expected fraction, random or window"
    )


def flow_step_rule(cfg: GRPOConfig, noise_level: float):
    """The flow families' sampling step of ``cfg.sde`` (DanceGRPO's SDE is the constant-noise one)."""
    if cfg.sde == "cps":
        return FlowCPSStep(noise_level=noise_level)
    return FlowSDEStep(
        noise_level=noise_level, noise_schedule={"flow_grpo": "flow_grpo", "dance_grpo": "constant"}[cfg.sde]
    )


# ----------------------------------------------------------------------------------------------------
# Initial noise shared within a group (DanceGRPO --init_same_noise)
# ----------------------------------------------------------------------------------------------------
def initial_noise(
    shape: tuple[int, ...],
    groups: torch.Tensor,
    seeds: list[int],
    *,
    shared_within_group: bool,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Initial latents ``[n, *shape]``: sample ``i``'s from ``seeds[i]``, or (shared) every member of a group
    gets the noise of the group's first sample's seed. Pass them to the sampler as ``latents`` while the
    per-sample seeds still drive the SDE's step noise, so a group's trajectories start equal and then
    differ."""
    if len(seeds) != len(groups):
        raise ValueError(f"got {len(seeds)} seeds for {len(groups)} samples")
    first_of_group: dict[int, int] = {}
    rows = []
    for i, g in enumerate(groups.tolist()):
        source = first_of_group.setdefault(g, i) if shared_within_group else i
        generator = torch.Generator().manual_seed(int(seeds[source]))
        rows.append(randn_tensor(tuple(shape), generator=generator, dtype=dtype))
    return torch.stack(rows)


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
