"""SePPO (Zhang et al., 2024): self-play preference optimisation from winning images only.

There is no public training code; everything marked *reconstructed* below is our reading of the paper
and a named setting. Each step, for a batch of winning images ``w`` with their prompts:

1. draw a reference from a pool of earlier policy checkpoints (``reference``: ``uniform`` over the
   previous ones, as the paper; ``initial`` or ``latest`` for its ablations);
2. the reference **generates** ``x_ref`` for each prompt with the shared sampler; it takes the loser's
   place in a Diffusion-DPO pair;
3. with ``L`` the denoising MSE at noise ``ε`` and timestep ``t`` (shared between ``w`` and ``x_ref``
   when ``share_noise``, *reconstructed*), anchor-based adaptive flip (*reconstructed*)::

       sign   = +1 if L_θ(w) <= L_ref(w) else -1       (flip: sign;  indicator: 1 or 0;  off: always 1)
       inside = -β/2 · [ (L_θ(w) - L_ref(w)) - sign · (L_θ(x_ref) - L_ref(x_ref)) ]
       loss   = -mean log σ(inside)

   When the policy already fits the winner better than the reference does, ``x_ref`` is treated as a
   loser; otherwise it is treated as a second winner (sign) or ignored (indicator).

The objective and the checkpoint pool live in :mod:`diffalign.objectives.winners`, the winners' data in
:mod:`diffalign.winners`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from diffalign.methods.base import LossOutput, MethodSpec, register_method
from diffalign.sampling import SamplingSettings


@dataclass
class SePPOConfig:
    name: ClassVar[str] = "seppo"
    beta: float = 5000.0  # unknown in the paper: Diffusion-DPO's value (reconstructed)
    # anchor-based adaptive flip (reconstructed); quote "off" in YAML
    flip: Literal["sign", "indicator", "off"] = "sign"
    reference: Literal["uniform", "initial", "latest"] = "uniform"  # paper: uniform over previous checkpoints
    pool_interval: int = 50  # add the policy to the pool every N optimizer steps
    pool_size: int | None = None  # keep at most N saved checkpoints besides the initial model (None: all)
    share_noise: bool = True  # same ε and t for w and x_ref (reconstructed)
    # How the reference generates x_ref (the paper does not say how many steps: reconstructed)
    ref_num_steps: int = 20
    ref_guidance_scale: float = 5.0
    ref_eta: float = 1.0

    def reference_sampling(self, resolution: int, num_frames: int | None) -> SamplingSettings:
        """How the reference generates ``x_ref``: at the training resolution (and frame count)."""
        return SamplingSettings(num_steps=self.ref_num_steps,
                                guidance_scale=self.ref_guidance_scale, eta=self.ref_eta, height=resolution,
                                width=resolution, num_frames=num_frames)


def flip_sign(model_w: torch.Tensor, ref_w: torch.Tensor, flip: str = "sign") -> torch.Tensor:
    """The anchor's verdict per pair: is the policy better than the reference on the winner?"""
    better = (model_w <= ref_w).detach()
    if flip == "sign":
        return torch.where(better, 1.0, -1.0)
    if flip == "indicator":
        return better.float()
    if flip == "off":
        return torch.ones_like(model_w)
    raise ValueError(f"unknown SePPO flip {flip!r}; expected sign, indicator or off")


def seppo_loss(
    model_w: torch.Tensor,
    ref_w: torch.Tensor,
    model_r: torch.Tensor,
    ref_r: torch.Tensor,
    *,
    beta: float = 5000.0,
    flip: str = "sign",
) -> LossOutput:
    """SePPO loss from per-sample denoising losses (each [B]) of the winner ``w`` and of ``x_ref``."""
    sign = flip_sign(model_w, ref_w, flip).to(model_w.dtype)
    anchor = model_w - ref_w
    generated = model_r - ref_r
    inside = -0.5 * beta * (anchor - sign * generated)
    return LossOutput(
        loss=-F.logsigmoid(inside).mean(),
        implicit_acc=(inside > 0).float().mean(),
        reward_margin=inside.detach().mean(),
        extra={"flip_positive": (sign > 0).float().mean(), "anchor_diff": anchor.detach().mean(),
               "ref_sample_diff": generated.detach().mean(), "loss_w": model_w.detach().mean()},
    )


def _validate(cfg: SePPOConfig, require) -> None:
    require(cfg.beta > 0, "method.beta", cfg.beta, "a number > 0")
    require(cfg.pool_interval >= 1, "method.pool_interval", cfg.pool_interval, "an integer >= 1")
    require(
        cfg.pool_size is None or cfg.pool_size >= 1,
        "method.pool_size",
        cfg.pool_size,
        "null or an integer >= 1",
    )
    require(cfg.ref_num_steps >= 1, "method.ref_num_steps", cfg.ref_num_steps,
            "an integer >= 1")
    require(cfg.ref_guidance_scale >= 0, "method.ref_guidance_scale", cfg.ref_guidance_scale, "a number >= 0")
    require(cfg.ref_eta >= 0, "method.ref_eta", cfg.ref_eta, "a number >= 0")


def _winners_loss(cfg: SePPOConfig, model_w, ref_w, model_r, ref_r) -> LossOutput:
    return seppo_loss(model_w, ref_w, model_r, ref_r, beta=cfg.beta, flip=cfg.flip)


# kind "winners": trains from the winning images of ``data.source`` (opened by diffalign.winners.open_winners)
register_method(MethodSpec("seppo", SePPOConfig, kind="winners", needs_reference=True, validate=_validate,
                           winners_loss=_winners_loss))
