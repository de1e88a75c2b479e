"""MaPO (Hong et al., 2024): margin-aware preference optimisation, reference-free.

With ``L(x)`` the denoising MSE at a noise and timestep shared within the pair, ``s`` = ``snr_value``
and ``T`` the number of training timesteps::

    φ_s(ℓ) = s·ℓ / (exp(s·ℓ) - 1)                 decreasing in ℓ: a lower loss is a higher likelihood
    margin = T · (φ_s(L_θ(w)) - φ_s(L_θ(l)))
    loss   = mean L_θ(w) - β · mean log σ(margin)   (β = 0.1, s = 0.5 in the paper's code)

The first term keeps fitting the winners; the second pushes winners' likelihood above the losers'.
There is no reference model: one forward pass per pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from diffalign.methods.base import LossOutput, MethodSpec, PairLosses, register_method


@dataclass
class MaPOConfig:
    name: ClassVar[str] = "mapo"
    beta: float = 0.1
    snr_value: float = 0.5


def _phi(losses: torch.Tensor, s: float) -> torch.Tensor:
    x = s * losses
    return x / torch.expm1(x)


def mapo_loss(
    model_w: torch.Tensor,
    model_l: torch.Tensor,
    *,
    beta: float = 0.1,
    snr_value: float = 0.5,
    num_train_timesteps: int = 1000,
) -> LossOutput:
    """MaPO loss from per-pair denoising losses (each [B]); see the module docstring."""
    margin = num_train_timesteps * (_phi(model_w, snr_value) - _phi(model_l, snr_value))
    loss = model_w.mean() - beta * F.logsigmoid(margin).mean()
    return LossOutput(
        loss=loss,
        implicit_acc=(margin > 0).float().mean(),
        reward_margin=margin.detach().mean(),
        extra={"loss_w": model_w.detach().mean(), "loss_l": model_l.detach().mean()},
    )


def _pair_loss(cfg: MaPOConfig, pair: PairLosses) -> LossOutput:
    return mapo_loss(pair.model_w, pair.model_l, beta=cfg.beta, snr_value=cfg.snr_value,
                     num_train_timesteps=pair.num_train_timesteps)


def _validate(cfg: MaPOConfig, require) -> None:
    require(cfg.beta >= 0, "method.beta", cfg.beta, "a number >= 0 (the paper uses 0.1)")
    require(cfg.snr_value > 0, "method.snr_value", cfg.snr_value, "a number > 0 (the paper uses 0.5)")


register_method(
    MethodSpec(
        "mapo", MaPOConfig, kind="pairs", needs_reference=False, pair_loss=_pair_loss, validate=_validate
    )
)
