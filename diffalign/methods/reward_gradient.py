"""Reward-gradient methods: DRaFT, DRaFT-K, DRaFT-LV, AlignProp and ReFL, one module.

All of them sample ``x_T → x_0`` with a deterministic sampler step ``x_{i+1} = step(x_i, t_i)`` (DDIM eta 0,
or a flow's Euler step), decode, score with a *differentiable* reward ``r`` and back-propagate it into the
weights through some of the steps only. The steps before the first gradient step run without a graph;
the gradient steps are checkpointed (``torch.utils.checkpoint``) so memory holds one step's activations::

    DRaFT      (2309.17400)  gradient through all N steps                           L = -scale · mean r
    DRaFT-K                  the last K steps [N - K, N)                            L = -scale · mean r
    DRaFT-LV                 x_0 without gradient; the last step recomputed from   L = -scale · mean r
                             n re-noisings x = add_noise(sg(x_0), ε_j, t_{N-1})     (over the n copies)
    AlignProp  (AP@b22918a)  b = clamp(int(N(μ, σ)), 1, N - 1); steps [b, N)         L = -scale · mean r
                             (μ 42, σ 5 of N = 50; loss (1 - HPS) · .01 = -.01 HPS + const)
    ReFL       (IR@c1392c6)  m ~ U{lo .. hi} (30..39 of 40); steps < m without       L = scale·mean ReLU(c-r)
                             gradient; one gradient call at t_m gives x̂_0 (scored)    + w · L_pretrain
                             (c 2, scale 1e-3; the pretraining MSE only in ReFL_SDXL*.py)

In the trainer each variant is a method of its own (``method.name: draft | draft_k | draft_lv | alignprop |
refl``, :class:`DRaFTConfig` ...) run by :mod:`diffalign.objectives.reward_gradient`: it samples the chain
with the shared sampler (no graph), recomputes the gradient steps from the stored latents with a graph,
decodes with the VAE and scores with a differentiable scorer. ReFL's pretraining loss ``L_pretrain`` is the
model family's own denoising loss (epsilon / v MSE for DDPM families, the flow-matching loss for flow
families) of the trained denoiser on one batch of images with captions per micro-step
(``method.pretrain_data``, read like SePPO's winners: a preference set's chosen images, a JSONL of
``prompt`` / ``image`` or a ``diffalign sample`` folder). The term is the same code for every variant, so
every variant takes it (``L = reward loss + w · L_pretrain``); it is off (``w = 0``, no data) by default.
IR's ReFL_SDXL.py takes the pretraining loss as an optimizer step of its own (weight 1), before each reward
step on the same batch's captions; here the two are one summed loss per micro-step (one step, one clip).

Unverified (named settings): DRaFT-LV's re-noising (only the abstract was read: ``lv_renoisings`` and the
caller's ``add_noise``); AlignProp's rounding of the normal draw (``int``, toward zero, is used here).
A step rule that draws noise must use the global RNG (which checkpointing replays), not a private
generator; the deterministic steps these methods use draw none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.checkpoint import checkpoint as checkpoint_call

from diffalign.methods.base import LossOutput, MethodSpec, register_method
from diffalign.methods.online_settings import validate_prompts_and_reward, validate_sizes
from diffalign.sampling import SamplingSettings
from diffalign.scorers import SCORERS, parse_scorer_spec

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
VARIANTS = ("draft", "draft_k", "draft_lv", "alignprop", "refl")


@dataclass
class RewardGradientConfig:
    name: ClassVar[str] = "reward_gradient"
    variant: Literal["draft", "draft_k", "draft_lv", "alignprop", "refl"] = "draft_k"
    k: int = 1  # DRaFT-K: gradient through the last K steps
    lv_renoisings: int = 2  # DRaFT-LV: re-noised copies of the final sample (unverified)
    truncation_mean: float = 42.0  # AlignProp: b ~ int(N(mean, std)), clamped to [1, N - 1] (N = 50)
    truncation_std: float = 5.0  # 0: the fixed truncation int(mean) (AlignProp's 49 = DRaFT-1)
    refl_step_range: list[int] = field(default_factory=lambda: [30, 39])  # ReFL: m ~ U{lo .. hi}, both ends
    refl_threshold: float = 2.0  # ReFL: L = ReLU(c - r)
    pretrain_loss_weight: float = 0.0  # ReFL's w: weight of the pretraining (denoising) loss; 0: none
    loss_scale: float = 1.0  # AlignProp .01, ReFL 1e-3
    checkpoint: bool = True  # gradient checkpointing of the gradient steps


def validate_reward_gradient_settings(cfg: RewardGradientConfig, require, num_steps: int) -> None:
    n = num_steps
    require(len(cfg.refl_step_range) == 2, "method.refl_step_range", cfg.refl_step_range, "[lo, hi]")
    require(cfg.variant in VARIANTS, "method.variant", cfg.variant, f"one of {', '.join(VARIANTS)}")
    require(1 <= cfg.k <= n, "method.k", cfg.k, f"an integer in [1, num_steps] = [1, {n}]")
    require(cfg.lv_renoisings >= 1, "method.lv_renoisings", cfg.lv_renoisings, "an integer >= 1")
    require(cfg.truncation_std >= 0, "method.truncation_std", cfg.truncation_std, "a number >= 0")
    lo, hi = cfg.refl_step_range
    if cfg.variant == "refl":
        require(0 <= lo <= hi <= n - 1, "method.refl_step_range", list(cfg.refl_step_range),
                f"[lo, hi] with 0 <= lo <= hi <= num_steps - 1 ({n - 1})")
    if cfg.variant == "alignprop":
        require(
            n >= 2, "method.num_steps", n, "an integer >= 2 (AlignProp truncates within the chain)"
        )
    require(
        cfg.pretrain_loss_weight >= 0,
        "method.pretrain_loss_weight",
        cfg.pretrain_loss_weight,
        "a number >= 0",
    )
    require(cfg.loss_scale > 0, "method.loss_scale", cfg.loss_scale, "a number > 0")


def require_differentiable(scorer, method: str = "reward-gradient methods") -> None:
    """Refuse a scorer whose score carries no gradient to the image (``Scorer.differentiable``)."""
    if getattr(scorer, "differentiable", False):
        return
    parts = getattr(scorer, "parts", None)
    culprits = (
        [s.name for _, s in parts if not s.differentiable]
        if parts
        else [getattr(scorer, "name", repr(scorer))]
    )
    usable = sorted(name for name, factory in SCORERS.items() if getattr(factory, "differentiable", False))
    raise ValueError(
        f"{method} back-propagate the reward into the model, but scorer {', '.join(culprits)} is not "
        f"differentiable; use a differentiable one ({', '.join(usable)})"
    )


# ----------------------------------------------------------------------------------------------------
# Which sampler steps carry gradients
# ----------------------------------------------------------------------------------------------------
def alignprop_truncation(
    num_steps: int, mean: float, std: float, generator: torch.Generator | None = None
) -> int:
    """AlignProp's ``b = clamp(int(N(mean, std)), 1, num_steps - 1)``: steps ``i >= b`` carry gradients."""
    draw = mean + std * float(torch.randn((), generator=generator))
    return min(max(int(draw), 1), num_steps - 1)


def gradient_steps(
    cfg: RewardGradientConfig, num_steps: int, generator: torch.Generator | None = None
) -> range:
    """The sampler steps (indices into the N steps) through which this draw back-propagates the reward.

    DRaFT-LV: the last step, recomputed on re-noisings of the final sample; ReFL: the one step ``m`` whose
    predicted ``x̂_0`` is scored (the chain stops there).
    """
    if cfg.variant == "draft":
        return range(num_steps)
    if cfg.variant == "draft_k":
        return range(num_steps - cfg.k, num_steps)
    if cfg.variant == "draft_lv":
        return range(num_steps - 1, num_steps)
    if cfg.variant == "alignprop":
        return range(
            alignprop_truncation(num_steps, cfg.truncation_mean, cfg.truncation_std, generator), num_steps
        )
    if cfg.variant == "refl":
        lo, hi = cfg.refl_step_range
        m = int(torch.randint(lo, hi + 1, (), generator=generator))
        return range(m, m + 1)
    raise ValueError(
        f"unknown reward-gradient variant {cfg.variant!r}; expected one of {', '.join(VARIANTS)}"
    )


def _contiguous(steps: Sequence[int] | range, num_steps: int) -> range:
    steps = list(steps)
    if not steps:
        return range(0)
    if steps != list(range(steps[0], steps[-1] + 1)) or steps[0] < 0 or steps[-1] >= num_steps:
        raise ValueError(f"gradient steps must be consecutive indices in [0, {num_steps}), got {steps}")
    return range(steps[0], steps[-1] + 1)


# ----------------------------------------------------------------------------------------------------
# Differentiable sampling
# ----------------------------------------------------------------------------------------------------
def _call(fn: StepFn, x: torch.Tensor, t, checkpoint: bool) -> torch.Tensor:
    return checkpoint_call(fn, x, t, use_reentrant=False) if checkpoint else fn(x, t)


def differentiable_sample(
    step_fn: StepFn,
    x_T: torch.Tensor,
    timesteps: Sequence,
    grad_steps: Sequence[int] | range,
    checkpoint: bool = True,
) -> torch.Tensor:
    """Run ``x = step_fn(x, t)`` over ``timesteps``; only the consecutive ``grad_steps`` build a graph.

    Steps outside ``grad_steps`` run under ``torch.no_grad`` (their output is a constant for autograd); each
    gradient step is checkpointed when ``checkpoint`` (its activations are recomputed in backward).
    """
    grad = _contiguous(grad_steps, len(timesteps))
    x = x_T
    for i, t in enumerate(timesteps):
        if i in grad:
            x = _call(step_fn, x, t, checkpoint)
        else:
            with torch.no_grad():
                x = step_fn(x, t)
    return x


def refl_sample(step_fn: StepFn, x0_fn: StepFn, x_T: torch.Tensor, timesteps: Sequence, step: int,
                checkpoint: bool = True) -> torch.Tensor:
    """ReFL: steps ``< step`` without gradient, then one gradient call ``x̂_0 = x0_fn(x, t_step)``."""
    x = differentiable_sample(step_fn, x_T, timesteps[:step], range(0))
    return _call(x0_fn, x, timesteps[step], checkpoint)


def draft_lv_sample(step_fn: StepFn, add_noise: Callable, x0: torch.Tensor, t, num_renoisings: int,
                    generator: torch.Generator | None = None, checkpoint: bool = True) -> torch.Tensor:
    """DRaFT-LV: ``[num_renoisings × B, ...]``, the last step ``step_fn(add_noise(sg(x0), ε_j, t), t)`` for
    fresh noises ``ε_j``; the loss averages the reward over all copies."""
    x0 = x0.detach()
    outs = []
    for _ in range(num_renoisings):
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        outs.append(_call(step_fn, add_noise(x0, noise, t), t, checkpoint))
    return torch.cat(outs)


def sample_for_reward(cfg: RewardGradientConfig, step_fn: StepFn, x_T: torch.Tensor, timesteps: Sequence, *,
                      x0_fn: StepFn | None = None, add_noise: Callable | None = None,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, range]:
    """The latents to decode and score for one draw of ``cfg.variant``, and the steps that carry gradients.

    ReFL needs ``x0_fn(x, t) -> x̂_0`` (the denoiser's predicted clean latents); DRaFT-LV needs
    ``add_noise(x0, noise, t) -> x_t`` (the scheduler's forward process at the last step's timestep).
    """
    n = len(timesteps)
    steps = gradient_steps(cfg, n, generator)
    if cfg.variant == "refl":
        if x0_fn is None:
            raise ValueError("ReFL needs x0_fn, the denoiser's predicted x0 at a timestep")
        return refl_sample(step_fn, x0_fn, x_T, timesteps, steps[0], cfg.checkpoint), steps
    if cfg.variant == "draft_lv":
        if add_noise is None:
            raise ValueError(
                "DRaFT-LV needs add_noise(x0, noise, t), the forward process at the last timestep"
            )
        x0 = differentiable_sample(step_fn, x_T, timesteps, range(0))
        return draft_lv_sample(
            step_fn, add_noise, x0, timesteps[-1], cfg.lv_renoisings, generator, cfg.checkpoint
        ), steps
    return differentiable_sample(step_fn, x_T, timesteps, steps, cfg.checkpoint), steps


# ----------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------
class RewardLoss(NamedTuple):
    loss: torch.Tensor  # scalar, with gradients
    extra: dict[str, torch.Tensor]  # scalars worth logging


def reward_gradient_loss(rewards: torch.Tensor, cfg: RewardGradientConfig,
                         pretrain_loss: torch.Tensor | None = None) -> RewardLoss:
    """``-scale · mean r``, or ReFL's ``scale · mean ReLU(c - r)``; plus ``w · pretrain_loss`` when
    ``pretrain_loss_weight`` ``w > 0`` (ReFL's pretraining term, the same for every variant)."""
    extra = {"reward_mean": rewards.detach().mean()}
    if cfg.variant == "refl":
        loss = cfg.loss_scale * torch.relu(cfg.refl_threshold - rewards).mean()
        extra["below_threshold"] = (rewards.detach() < cfg.refl_threshold).float().mean()
    else:
        loss = -cfg.loss_scale * rewards.mean()
    if cfg.pretrain_loss_weight > 0:
        if pretrain_loss is None:
            raise ValueError("pretrain_loss_weight > 0 needs the pretraining (denoising) loss")
        loss = loss + cfg.pretrain_loss_weight * pretrain_loss
        extra["pretrain_loss"] = pretrain_loss.detach()
    return RewardLoss(loss, extra)


# ----------------------------------------------------------------------------------------------------
# The trainer's methods: one per variant
# ----------------------------------------------------------------------------------------------------
@dataclass
class RewardGradientTraining(RewardGradientConfig):
    """A variant's settings plus what the trainer samples: ``train.batch_size`` prompts per micro-step,
    one deterministic chain each (DDIM eta 0, or the flow's Euler step), scored by ``reward``."""

    prompts: str = "ddpo-animals"  # a prompt file, a shipped set or a dataset (as the online methods)
    prompt_column: str = "prompt"
    reward: str = "aesthetic"  # a differentiable scorer spec, e.g. "hpsv2" or "toy_saturation"
    # ReFL's pretraining images with captions (with pretrain_loss_weight > 0): data.source's grammar, read
    # as SePPO reads its winners (a preference set's chosen images, a JSONL of prompt / image, a `diffalign
    # sample` folder), preprocessed by data.resolution / random_flip / format / split / max_pairs
    pretrain_data: str = ""
    num_steps: int = 50
    guidance_scale: float = 5.0
    guidance_rescale: float = 0.0
    height: int | None = None  # None: the model's default
    width: int | None = None
    num_frames: int | None = None  # video models; None: the pipeline's default

    def sampling(self) -> SamplingSettings:
        """The deterministic chain the gradient steps are recomputed on (eta 0: DDIM / Euler)."""
        return SamplingSettings(num_steps=self.num_steps, guidance_scale=self.guidance_scale,
                                guidance_rescale=self.guidance_rescale, eta=0.0, height=self.height,
                                width=self.width, num_frames=self.num_frames)


#: Each variant's own settings. A variant's config refuses another variant's setting set away from its default
#: (it would be ignored).
VARIANT_SETTINGS = {"draft": (), "draft_k": ("k",), "draft_lv": ("lv_renoisings",),
                    "alignprop": ("truncation_mean", "truncation_std"),
                    "refl": ("refl_step_range", "refl_threshold")}


@dataclass
class DRaFTConfig(RewardGradientTraining):
    name: ClassVar[str] = "draft"
    variant: ClassVar[str] = "draft"


@dataclass
class DRaFTKConfig(RewardGradientTraining):
    name: ClassVar[str] = "draft_k"
    variant: ClassVar[str] = "draft_k"


@dataclass
class DRaFTLVConfig(RewardGradientTraining):
    name: ClassVar[str] = "draft_lv"
    variant: ClassVar[str] = "draft_lv"


@dataclass
class AlignPropConfig(RewardGradientTraining):
    name: ClassVar[str] = "alignprop"
    variant: ClassVar[str] = "alignprop"
    loss_scale: float = 0.01  # AlignProp's (1 - HPS) · .01


@dataclass
class ReFLConfig(RewardGradientTraining):
    name: ClassVar[str] = "refl"
    variant: ClassVar[str] = "refl"
    loss_scale: float = 1e-3  # ReFL's ReLU(2 - r) · 1e-3
    num_steps: int = 40
    guidance_scale: float = 1.0  # ReFL samples without CFG


def non_differentiable_terms(spec: str) -> list[str]:
    """The scorers of a spec whose class keeps no gradient to the image (nothing is built)."""
    return [name for _, name, _ in parse_scorer_spec(spec)
            if not getattr(SCORERS[name], "differentiable", False)]


def _validate(cfg: RewardGradientTraining, require) -> None:
    defaults = RewardGradientConfig()
    for other, keys in VARIANT_SETTINGS.items():
        for key in keys if other != cfg.variant else ():
            value = getattr(cfg, key)
            require(value == getattr(defaults, key), f"method.{key}", value,
                    f"unset: {key} is a setting of {other}, not of {cfg.variant}")
    validate_prompts_and_reward(cfg, require)
    bad = non_differentiable_terms(cfg.reward)
    usable = sorted(name for name, factory in SCORERS.items() if getattr(factory, "differentiable", False))
    require(not bad, "method.reward", cfg.reward,
            f"a differentiable scorer spec: {cfg.variant} back-propagates the reward into the model and "
            f"{', '.join(bad)} is not differentiable (use {', '.join(usable)})")
    require(cfg.num_steps >= 1, "method.num_steps", cfg.num_steps, "an integer >= 1")
    require(cfg.guidance_scale >= 0, "method.guidance_scale", cfg.guidance_scale, "a number >= 0")
    validate_sizes(cfg, require)
    validate_reward_gradient_settings(cfg, require, cfg.num_steps)
    require(cfg.pretrain_loss_weight == 0 or bool(cfg.pretrain_data), "method.pretrain_loss_weight",
            cfg.pretrain_loss_weight, "0, or method.pretrain_data set: the pretraining (denoising) loss is "
            "computed on its images with captions")
    require(cfg.pretrain_loss_weight > 0 or not cfg.pretrain_data, "method.pretrain_data", cfg.pretrain_data,
            "unset while method.pretrain_loss_weight is 0 (the images would be read for nothing)")


def _reward_loss(cfg: RewardGradientTraining, rewards: torch.Tensor,
                 pretrain_loss: torch.Tensor | None = None) -> LossOutput:
    out = reward_gradient_loss(rewards, cfg, pretrain_loss)
    nan = torch.tensor(float("nan"))
    std = rewards.detach().std() if len(rewards) > 1 else torch.zeros(())
    return LossOutput(out.loss, nan, nan, {**out.extra, "reward_std": std})


for _config in (DRaFTConfig, DRaFTKConfig, DRaFTLVConfig, AlignPropConfig, ReFLConfig):
    register_method(MethodSpec(_config.name, _config, kind="reward_gradient", needs_reference=False,
                               validate=_validate, reward_loss=_reward_loss))
