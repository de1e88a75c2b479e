"""Diffusion-DPO (Wallace et al., 2023): DPO on the per-sample denoising losses of a preference pair.

With ``L(x)`` the denoising MSE of a sample at a noise and timestep shared within the pair, the policy
``θ`` and a frozen reference ``ref``::

    inside = -β/2 · [ (L_θ(w) - L_ref(w)) - (L_θ(l) - L_ref(l)) ]
    sigmoid: loss = -mean log σ(inside)                      (the paper; β = 5000)
    hinge:   loss =  mean relu(1 - inside)
    ipo:     loss =  mean (logits - 1/(2β))²   with logits = inside / (β/2), i.e. unscaled

The diffusers script writes the same sigmoid loss as ``-log σ(β'·(ref_diff - model_diff))``, β' = β/2.
The IPO target ``1/(2β)`` follows IPO's τ = β (the diffusers script's IPO variant is broken); with
``ipo`` choose β as IPO's regularisation, not the sigmoid β.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from diffalign.methods.base import LossOutput, MethodSpec, PairLosses, register_method


@dataclass
class DPOConfig:
    name: ClassVar[str] = "dpo"
    beta: float = 5000.0
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"


def dpo_loss(
    model_w: torch.Tensor,
    model_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    *,
    beta: float = 5000.0,
    loss_type: str = "sigmoid",
) -> LossOutput:
    """Diffusion-DPO loss from per-pair denoising losses (each [B]); see the module docstring."""
    model_diff = model_w - model_l  # < 0 when the policy denoises the winner better than the loser
    ref_diff = ref_w - ref_l
    logits = ref_diff - model_diff  # = -[(L_θ(w) - L_ref(w)) - (L_θ(l) - L_ref(l))]
    inside = 0.5 * beta * logits
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(inside)
    elif loss_type == "hinge":
        losses = torch.relu(1 - inside)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected sigmoid, hinge or ipo")
    return LossOutput(
        loss=losses.mean(),
        implicit_acc=(inside > 0).float().mean(),
        reward_margin=inside.detach().mean(),
        extra={"model_diff": model_diff.detach().mean(), "ref_diff": ref_diff.detach().mean(),
               "loss_w": model_w.detach().mean(), "loss_l": model_l.detach().mean()},
    )


def _pair_loss(cfg: DPOConfig, pair: PairLosses) -> LossOutput:
    return dpo_loss(
        pair.model_w, pair.model_l, pair.ref_w, pair.ref_l, beta=cfg.beta, loss_type=cfg.loss_type
    )


def _validate(cfg: DPOConfig, require) -> None:
    require(cfg.beta > 0, "method.beta", cfg.beta, "a number > 0 (the paper uses 5000)")


register_method(
    MethodSpec("dpo", DPOConfig, kind="pairs", needs_reference=True, pair_loss=_pair_loss, validate=_validate)
)
