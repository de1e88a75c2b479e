"""DiffusionNFT (NVlabs/DiffusionNFT@24af555, scripts/train_nft_sd3.py, config/nft.py): negative-aware
fine-tuning on the velocity of a flow-matching model, CFG-free, on samples from any sampler (ODE included).

The "old" policy (a slowly moving copy of the weights) samples final latents ``x_0``; their group advantages
``A`` (:func:`diffalign.methods.grpo.group_advantages`) become optimality probabilities. Training re-noises
``x_0`` at random timesteps ``x_t = (1 - t) x_0 + t ε`` and, with ``v_old``, ``v_ref`` without gradients::

    r    = clamp(clip(A, ±5) / 10 + 1/2, 0, 1)
    v⁺   = β v_θ + (1 - β) v_old               x0⁺ = x_t - t v⁺      (implicit positive policy)
    v⁻   = (1 + β) v_old - β v_θ               x0⁻ = x_t - t v⁻      (implicit negative policy)
    ℓ^±  = ⟨(x0^± - x_0)²⟩ / sg(max(⟨|x0^± - x_0|⟩, 1e-5))          (adaptive normalisation)
    L    = scale · mean[(r ℓ⁺ + (1 - r) ℓ⁻) / β] + kl_weight · mean ⟨(v_θ - v_ref)²⟩
           scale 5, kl_weight 1e-4, β 1 (.1 for OCR / multi-reward)

After each epoch ``old ← d · old + (1 - d) θ`` with ``d = min(.001 · step, .5)`` (OCR: 0 for 75 steps,
then +.0075 per step up to .999). It needs a velocity-parameterised (flow-matching) family: ε- and
v-prediction UNets (SD, SDXL, AnimateDiff) have no ``x̂0 = x_t - t·v`` with ``t = σ``.

In the trainer (``method.name: nft``, :mod:`diffalign.objectives.nft`) an epoch samples ``num_prompts ×
samples_per_prompt`` final latents with the old policy (CFG-free, the ODE by default: ``eta`` 0), and each of
its ``gradient_steps_per_epoch`` steps re-noises all of them at a random ``timestep_fraction`` of the
sampling schedule's sigmas (one draw per gradient step, shared by the samples).

Unverified (named settings): the OCR schedule's form ``min(.0075 · (step - 75), .999)`` after the flat
part (``old_decay``); which std the advantages use (DiffusionNFT's stat tracker; FG's defaults here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from diffalign.families import FAMILIES, Family
from diffalign.methods.base import LossOutput, MethodSpec, register_method
from diffalign.methods.online_settings import validate_prompts_and_reward, validate_sizes
from diffalign.sampling import SamplingSettings, settings_of

#: d(step) = 0 before ``flat`` steps, then min(rate · (step - flat), cap)
OLD_DECAY_SCHEDULES: dict[str, tuple[int, float, float]] = {
    "none": (0, 0.0, 0.0),
    "default": (0, 0.001, 0.5),
    "ocr": (75, 0.0075, 0.999),
}


@dataclass
class NFTConfig:
    name: ClassVar[str] = "nft"
    beta: float = 1.0  # the implicit policies' step β (.1 for OCR / multi-reward)
    loss_scale: float = 5.0
    kl_weight: float = 1e-4  # weight of ⟨(v_θ - v_ref)²⟩
    adv_clip_max: float = 5.0  # r = clamp(clip(A, ±adv_clip_max) / (2 · adv_clip_max) + 1/2, 0, 1)
    norm_floor: float = 1e-5  # floor of the adaptive normaliser
    timestep_fraction: float = 0.9  # trained timesteps per sample: a random 9 of 10
    old_decay: Literal["none", "default", "ocr"] = "default"
    global_std: bool = True  # advantages as grpo.group_advantages (unverified for DiffusionNFT)
    std_eps: float = 1e-4
    # What the trainer samples (as the online methods): N prompts x G samples per epoch and process
    prompts: str = "ddpo-animals"
    prompt_column: str = "prompt"
    reward: str = "pickscore"
    num_prompts: int = 8
    samples_per_prompt: int = 8  # G, the advantages' group
    gradient_steps_per_epoch: int = 1
    num_steps: int = 10
    guidance_scale: float = 1.0  # 1: CFG-free, as DiffusionNFT (FLUX.1-dev: its guidance embedding)
    eta: float = 0.0  # 0: the ODE (Euler); > 0: the flow SDE's noise level
    height: int | None = None  # None: the model's default
    width: int | None = None
    num_frames: int | None = None  # video models; None: the pipeline's default
    sample_batch_size: int = 8  # samples per sampling call
    train_batch_size: int = 8  # re-noised samples per forward/backward piece
    max_bad_reward_fraction: float = 0.25
    async_scoring: bool = False
    shared_group_noise: bool = False  # one initial noise per group (DanceGRPO's choice; the online setting)

    def sampling(self) -> SamplingSettings:
        return settings_of(self)


def validate_nft_settings(cfg: NFTConfig, require) -> None:
    require(cfg.beta > 0, "method.beta", cfg.beta, "a number > 0 (DiffusionNFT uses 1, or .1 for OCR)")
    require(cfg.loss_scale > 0, "method.loss_scale", cfg.loss_scale, "a number > 0 (DiffusionNFT uses 5)")
    require(cfg.kl_weight >= 0, "method.kl_weight", cfg.kl_weight, "a number >= 0 (DiffusionNFT uses 1e-4)")
    require(
        cfg.adv_clip_max > 0, "method.adv_clip_max", cfg.adv_clip_max, "a number > 0 (DiffusionNFT uses 5)"
    )
    require(cfg.norm_floor > 0, "method.norm_floor", cfg.norm_floor, "a number > 0")
    require(
        0 < cfg.timestep_fraction <= 1,
        "method.timestep_fraction",
        cfg.timestep_fraction,
        "a number in (0, 1]",
    )
    require(cfg.old_decay in OLD_DECAY_SCHEDULES, "method.old_decay", cfg.old_decay,
            f"one of {', '.join(OLD_DECAY_SCHEDULES)}")


def _validate(cfg: NFTConfig, require) -> None:
    validate_nft_settings(cfg, require)
    validate_prompts_and_reward(cfg, require)
    for key in ("num_prompts", "gradient_steps_per_epoch", "num_steps", "sample_batch_size",
                "train_batch_size"):
        require(getattr(cfg, key) >= 1, f"method.{key}", getattr(cfg, key), "an integer >= 1")
    require(cfg.samples_per_prompt >= 2, "method.samples_per_prompt", cfg.samples_per_prompt,
            "an integer >= 2 (advantages are relative to each prompt's group)")
    require(cfg.eta >= 0, "method.eta", cfg.eta, "a number >= 0 (0: the ODE)")
    require(cfg.guidance_scale >= 0, "method.guidance_scale", cfg.guidance_scale, "a number >= 0")
    validate_sizes(cfg, require)
    require(0 <= cfg.max_bad_reward_fraction < 1, "method.max_bad_reward_fraction",
            cfg.max_bad_reward_fraction, "a number in [0, 1)")


def require_flow_family(family: Family | str, method: str = "DiffusionNFT") -> None:
    """Refuse families that do not predict a flow's velocity (their steps are not the flow SDE/ODE)."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    rule = fam.make_step_rule(0.0)
    if not rule.kind.startswith("flow_"):
        flow = sorted(name for name, f in FAMILIES.items() if f.make_step_rule(0.0).kind.startswith("flow_"))
        raise NotImplementedError(
            f"{method} applies to flow-matching (velocity-parameterised) families only ({', '.join(flow)}); "
            f"{fam.name!r} samples with {rule.kind} steps on a noise/v-prediction UNet, where x0 = x_t - t·v "
            "does not hold")


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float = 5.0) -> torch.Tensor:
    """``r = clamp(clip(A, ±c) / (2c) + 1/2, 0, 1)`` (c = 5: DiffusionNFT's ``/10``)."""
    return (advantages.clamp(-adv_clip_max, adv_clip_max) / (2 * adv_clip_max) + 0.5).clamp(0.0, 1.0)


def _normalised_x0_error(x0_pred: torch.Tensor, x0: torch.Tensor, floor: float) -> torch.Tensor:
    error = x0_pred - x0
    scale = error.detach().abs().flatten(1).mean(dim=1).clamp(min=floor)
    return (error**2).flatten(1).mean(dim=1) / scale


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    v_ref: torch.Tensor | None,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    *,
    beta: float = 1.0,
    loss_scale: float = 5.0,
    kl_weight: float = 1e-4,
    norm_floor: float = 1e-5,
) -> LossOutput:
    """DiffusionNFT's loss on ``n`` noised samples: velocities/latents ``[n, ...]``, ``t`` [n] in [0, 1] (σ),
    ``r`` [n] optimality probabilities. ``v_old``, ``v_ref``, ``x_t``, ``x0`` are constants for autograd."""
    v_old, x_t, x0 = v_old.detach().float(), x_t.detach().float(), x0.detach().float()
    v_theta = v_theta.float()
    tt = t.detach().float().view(-1, *([1] * (x_t.ndim - 1)))
    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta
    loss_pos = _normalised_x0_error(x_t - tt * v_pos, x0, norm_floor)
    loss_neg = _normalised_x0_error(x_t - tt * v_neg, x0, norm_floor)
    r = r.detach().float()
    policy = loss_scale * ((r * loss_pos + (1 - r) * loss_neg) / beta).mean()
    loss, extra = policy, {"policy_loss": policy.detach(), "loss_pos": loss_pos.detach().mean(),
                           "loss_neg": loss_neg.detach().mean(), "r_mean": r.mean()}
    if kl_weight > 0:
        if v_ref is None:
            raise ValueError("nft_loss with kl_weight > 0 needs the reference velocity v_ref")
        kl = ((v_theta - v_ref.detach().float()) ** 2).flatten(1).mean(dim=1).mean()
        loss = loss + kl_weight * kl
        extra["kl"] = kl.detach()
    # a sample is ranked right when it lies closer to the branch its r puts it in (r = 1/2: neither)
    side = torch.sign(2 * r - 1)
    gap = (loss_neg - loss_pos).detach()
    decided = side != 0
    acc = ((side * gap)[decided] > 0).float().mean() if decided.any() else torch.tensor(float("nan"))
    margin = (side * gap).mean()
    return LossOutput(loss, acc, margin, extra)


def old_policy_decay(step: int, schedule: str = "default") -> float:
    """The old policy's EMA decay after ``step`` optimizer steps: 0 before ``flat``, then ``min(rate ·
    (step - flat), cap)``; "default" ``min(.001 · step, .5)``, "ocr" 75 flat steps then .0075 up to .999."""
    if schedule not in OLD_DECAY_SCHEDULES:
        raise ValueError(
            f"unknown old-policy decay {schedule!r}; expected one of {', '.join(OLD_DECAY_SCHEDULES)}"
        )
    flat, rate, cap = OLD_DECAY_SCHEDULES[schedule]
    return 0.0 if step < flat else min(rate * (step - flat), cap)


@torch.no_grad()
def update_old_policy(old_parameters, parameters, decay: float) -> None:
    """``old ← decay · old + (1 - decay) · θ``, in place."""
    for old, new in zip(list(old_parameters), list(parameters), strict=True):
        old.lerp_(new.detach().to(old.dtype), 1.0 - decay)


def _velocity_loss(cfg: NFTConfig, v_theta, v_old, v_ref, x_t, x0, t, r) -> LossOutput:
    return nft_loss(v_theta, v_old, v_ref if cfg.kl_weight > 0 else None, x_t, x0, t, r, beta=cfg.beta,
                    loss_scale=cfg.loss_scale, kl_weight=cfg.kl_weight, norm_floor=cfg.norm_floor)


register_method(MethodSpec("nft", NFTConfig, kind="nft", needs_reference=True, validate=_validate,
                           velocity_loss=_velocity_loss, check_family=require_flow_family))
