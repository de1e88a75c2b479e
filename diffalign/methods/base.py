"""The method interface: a config dataclass, a pure loss and the hooks its objective needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch


class PairLosses(NamedTuple):
    """Per-pair denoising losses ``L(x) = mean over (C,H,W) of (pred - target)^2``, each [B] fp32."""

    model_w: torch.Tensor
    model_l: torch.Tensor
    ref_w: torch.Tensor | None = None
    ref_l: torch.Tensor | None = None
    num_train_timesteps: int = 1000


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, with gradients
    implicit_acc: torch.Tensor  # scalar: fraction of pairs the implicit reward ranks correctly
    reward_margin: torch.Tensor  # scalar: mean implicit reward of winner minus loser
    extra: dict[str, torch.Tensor]  # more scalars worth logging


#: The objectives a method can run under (:mod:`diffalign.objectives`), by ``MethodSpec.kind``.
KINDS = ("pairs", "online", "winners", "reward_gradient", "nft")
#: The kinds that sample their own training data from ``method.prompts`` (no ``data.source``).
SAMPLING_KINDS = ("online", "reward_gradient", "nft")


@dataclass(frozen=True)
class MethodSpec:
    """What a method is and the hooks its objective calls (all pure functions of the method's config).

    ``kind="pairs"``: ``pair_loss(cfg, PairLosses)``. ``kind="online"``: ``online_loss(cfg, part, logp)`` on
    a part of an epoch's samples (``part.logp_old``, ``.logp_ref``, ``.rewards``, ``.groups``,
    ``.advantages``) with the policy's log-probs ``logp`` [n, S]; ``loss_weight(cfg, part)``, how much of
    the epoch's mean that part carries; ``advantages(cfg, rewards, groups, every_reward)`` (or None) computed
    once per epoch from this process's finite rewards and their prompt groups (``every_reward``: every
    process's finite rewards, for a std over all of them); optionally ``sampling_rule(cfg, family_rule,
    generator)``, the step rule an epoch samples with (default: the family's rule at ``eta``; ``generator``
    is seeded per epoch), ``train_columns(cfg,
    num_samples, num_stored_steps, generator)``, which stored steps one gradient step trains ([k], or [n, k]
    per sample), and ``step_means(cfg)``: True when the loss also takes the steps' means under the policy
    (``online_loss(cfg, part, logp, mean)``, with ``part.mean_ref`` and ``part.step_std``);
    ``ema_settings(cfg)``: ``(max_decay, update_interval)`` for an EMA of the trained weights that the run
    evaluates and exports (None: no EMA).
    ``kind="winners"``: ``winners_loss(cfg, model_w, ref_w, model_r, ref_r)`` on the denoising
    losses of the winners and of the reference's own samples. ``kind="reward_gradient"``:
    ``reward_loss(cfg, rewards, pretrain_loss)`` on differentiable rewards [n] (``pretrain_loss``: a denoising
    loss, or None). ``kind="nft"``: ``velocity_loss(cfg, v_theta,
    v_old, v_ref, x_t, x0, t, r)`` on velocities of re-noised samples. ``check_family(family)`` raises
    NotImplementedError for a model family the method does not apply to.
    """

    name: str
    config_class: type
    kind: str  # one of KINDS
    needs_reference: bool
    #: ``validate(method_cfg, require)`` with ``require(ok, key_path, value, expected)``.
    validate: Callable[[Any, Callable], None] | None = None
    pair_loss: Callable[[Any, PairLosses], LossOutput] | None = None
    online_loss: Callable[[Any, Any, torch.Tensor], LossOutput] | None = None
    loss_weight: Callable[[Any, Any], float] | None = None
    advantages: Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    sampling_rule: Callable[..., Any] | None = None
    train_columns: Callable[..., torch.Tensor] | None = None
    step_means: Callable[[Any], bool] | None = None
    ema_settings: Callable[[Any], tuple[float, int] | None] | None = None
    winners_loss: Callable[..., LossOutput] | None = None
    reward_loss: Callable[..., LossOutput] | None = None
    velocity_loss: Callable[..., LossOutput] | None = None
    check_family: Callable[[Any], None] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        needed = {"pairs": ("pair_loss",), "online": ("online_loss", "loss_weight"),
                  "winners": ("winners_loss",), "reward_gradient": ("reward_loss",),
                  "nft": ("velocity_loss",)}
        missing = [hook for hook in needed[self.kind] if getattr(self, hook) is None]
        if missing:
            raise ValueError(f"method {self.name!r} (kind {self.kind}) needs the hook(s) "
                             f"{', '.join(missing)}")


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is registered twice")
    METHODS[spec.name] = spec
    return spec
