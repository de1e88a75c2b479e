"""Alignment methods: one small config dataclass, one pure loss and its objective's hooks per method.

Each method module registers a :class:`~diffalign.methods.base.MethodSpec` in :data:`METHODS`; the
trainer finds a method by ``method.name`` and runs it under the objective its ``kind`` names
(:mod:`diffalign.objectives`):

``kind="pairs"``    offline preference pairs ``[winners..., losers...]`` with noise and timestep shared
                    within a pair; the objective computes the policy's (and, with ``needs_reference``, the
                    reference's) per-sample denoising losses and calls the ``pair_loss`` hook (DPO, MaPO).
``kind="online"``   sample with the shared sampler, score, recompute log-probs; the objective calls the
                    ``online_loss`` / ``loss_weight`` / ``advantages`` hooks (PRDP, DDPO, GRPO).
``kind="winners"``  winning images only; the reference generates the other side of each pair and the
                    objective calls ``winners_loss`` (SePPO).
``kind="reward_gradient"``  sample, back-propagate a differentiable reward through some sampler steps; the
                    objective calls ``reward_loss`` (DRaFT, DRaFT-K, DRaFT-LV, AlignProp, ReFL).
``kind="nft"``      sample with a slowly moving old policy, re-noise the samples; the objective calls
                    ``velocity_loss`` (DiffusionNFT; flow-matching families only).

Adding a method is one module here (config, loss, hooks, ``register_method``) and one import below.
"""

from diffalign.methods import (  # noqa: F401  (register the built-in methods)
    ddpo,
    dpo,
    grpo,
    mapo,
    nft,
    prdp,
    reward_gradient,
    seppo,
)
from diffalign.methods.base import KINDS, METHODS, LossOutput, MethodSpec, PairLosses, register_method

__all__ = ["KINDS", "METHODS", "MethodSpec", "PairLosses", "LossOutput", "register_method"]
