"""Alignment methods: one small config dataclass and one pure loss function per method.

The trainer (:mod:`diffalign.train`) finds a method by ``method.name`` in :data:`METHODS`. A
:class:`MethodSpec` says what the method needs from the trainer:

``kind="pairs"``   offline preference pairs ``[winners..., losers...]`` with noise and timestep shared
                   within a pair; the trainer computes per-sample denoising losses of the policy (and of
                   the reference when ``needs_reference``) and calls ``pair_loss``.
``kind="online"``  (later methods) sample with :func:`diffalign.sampler.sample`, score, and recompute
                   log-probs with :func:`diffalign.sampler.recompute_log_probs`; the trainer hands the
                   method a ``step`` function instead of a batch of pairs.
"""

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


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type
    kind: str  # "pairs" or "online"
    needs_reference: bool
    pair_loss: Callable[[Any, PairLosses], LossOutput] | None = None
    #: ``validate(method_cfg, require)`` with ``require(ok, key_path, value, expected)``.
    validate: Callable[[Any, Callable], None] | None = None
    #: ``build_objective(ctx)`` for methods that bring their own objective (online methods); see
    #: :mod:`diffalign.train`. Pair methods leave it None and get the trainer's pair objective.
    build_objective: Callable[[Any], Any] | None = None


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is registered twice")
    METHODS[spec.name] = spec
    return spec


from diffalign.methods import ddpo, dpo, mapo, prdp, seppo  # noqa: E402,F401  (register the built-in methods)

__all__ = ["METHODS", "MethodSpec", "PairLosses", "LossOutput", "register_method"]
