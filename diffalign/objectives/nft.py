"""The DiffusionNFT loop (:mod:`diffalign.methods.nft`): the old policy samples, the policy learns on
re-noised samples. Flow-matching families only.

One epoch::

    x_0 ← sample(θ_old), CFG-free, N prompts × G per process    (the shared sampler; the ODE by default)
    r   ← optimality probability of the group advantages          (grpo.group_advantages; flat groups skipped;
                                                                    the global std over every process's)
    repeat K times (one optimizer step each):
        steps ← a random timestep_fraction of the sampling schedule's sigmas (one draw for all samples)
        x_t = (1 - σ) x_0 + σ ε  (fresh ε);  v_old, v_ref without gradients;  v_θ
        loss ← nft_loss over every sample and step, piece by piece (train_batch_size samples per backward)
    θ_old ← d θ_old + (1 - d) θ,  d = old_policy_decay(step)

The old policy is a copy of the trainable tensors (the LoRA layers, or the whole denoiser for a full
fine-tune); it samples and gives ``v_old`` by being copied into the denoiser for the duration (the
trained values are put back). Its tensors are part of the objective's checkpoint state (safetensors), with
the current epoch's samples and the random draws, so a resume continues exactly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, fields

import torch

from diffalign.methods.grpo import group_advantages
from diffalign.methods.nft import old_policy_decay, optimality_probability, update_old_policy
from diffalign.objectives.context import unwrap
from diffalign.objectives.online import (
    MAX_EMPTY_EPOCHS,
    RewardError,
    choose_prompts,
    epoch_seed,
    filter_rewards,
    make_reward,
    reward_summary,
    sample_epoch,
)
from diffalign.parallel import gather_values, together
from diffalign.prompt_sets import load_prompt_source

log = logging.getLogger("diffalign.nft")


@dataclass
class NFTBatch:
    """One epoch's kept samples: final latents [n, ...], their conditioning, and the schedule they came
    from (``timesteps`` the denoiser's, ``sigmas`` the matching σ ∈ [0, 1])."""

    x0: torch.Tensor
    cond: dict[str, torch.Tensor]
    rewards: torch.Tensor  # [n]
    groups: torch.Tensor  # [n]
    r: torch.Tensor | None  # [n] optimality probabilities (next_epoch's: the std is every process's)
    timesteps: torch.Tensor  # [N]
    sigmas: torch.Tensor  # [N]
    stats: dict = field(default_factory=dict)


class NFTObjective:
    """DiffusionNFT for the trainer: ``batches()`` samples an epoch with the old policy and yields it K
    times; each call is one gradient step of the NFT loss over all of its samples."""

    def __init__(self, ctx):
        self.ctx, self.spec, self.settings = ctx, ctx.spec, ctx.cfg.method
        self.spec.check_family(ctx.family)  # a model whose class was unknown when the config was checked
        m = self.settings
        self.prompts = load_prompt_source(m.prompts, m.prompt_column)
        self.reward = make_reward(m.reward)
        bare = unwrap(ctx.unet)
        self.trained = {name: p for name, p in bare.named_parameters() if p.requires_grad}
        self.old = {name: p.detach().clone() for name, p in self.trained.items()}
        self.epoch, self.used = 0, 0
        self.current: NFTBatch | None = None
        self.last_decay = 0.0
        self.steps_rng = torch.Generator().manual_seed(ctx.cfg.train.seed)
        self.noise_rng = torch.Generator().manual_seed(ctx.cfg.train.seed + 1)
        log.info("nft: %d prompts from %s; reward %s; old-policy decay %s", len(self.prompts), m.prompts,
                 m.reward, m.old_decay)

    # -- the old policy ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def old_policy(self):
        """The denoiser with the old policy's weights (the trained values come back afterwards)."""
        with torch.no_grad():
            current = {name: p.detach().clone() for name, p in self.trained.items()}
            for name, p in self.trained.items():
                p.copy_(self.old[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.trained.items():
                    p.copy_(current[name])

    def on_step_end(self, step: int) -> None:
        """At the end of an epoch's gradient steps: ``old ← d old + (1 - d) θ``."""
        if self.used >= self.repeats:
            self.last_decay = old_policy_decay(step, self.settings.old_decay)
            update_old_policy(self.old.values(), self.trained.values(), self.last_decay)

    # -- sampling ------------------------------------------------------------------------------------
    @property
    def repeats(self) -> int:
        return self.settings.gradient_steps_per_epoch * self.ctx.cfg.train.gradient_accumulation_steps

    def collect(self) -> NFTBatch | None:
        ctx, m = self.ctx, self.settings
        seed = epoch_seed(ctx.cfg.train.seed, self.epoch, ctx.accelerator.process_index)
        prompts = choose_prompts(self.prompts, m.num_prompts, seed)
        seeds = [seed + i for i in range(len(prompts) * m.samples_per_prompt)]
        bare = unwrap(ctx.unet)
        bare.eval()
        with self.old_policy():
            trajectory, rewards, groups, timings = sample_epoch(ctx.pipe, prompts, m, seeds, self.reward,
                                                                ctx.cfg.model.name)
        bare.train()
        keep, stats = filter_rewards(rewards, groups, m.max_bad_reward_fraction)
        stats |= timings | reward_summary(rewards)
        if not bool(keep.any()):
            log.warning("epoch %d: no prompt group with distinct rewards; sampling again", self.epoch)
            return None
        index = torch.nonzero(keep, as_tuple=True)[0]
        trajectory, rewards, groups = trajectory.select(index), rewards[index], groups[index]
        scheduler = trajectory.make_scheduler()
        n = trajectory.num_steps
        return NFTBatch(x0=trajectory.latents[:, -1], cond=trajectory.cond, rewards=rewards, groups=groups,
                        r=None, timesteps=trajectory.timesteps, sigmas=scheduler.sigmas[:n].float().cpu(),
                        stats=stats)

    def batches(self):
        while True:
            if self.current is None or self.used >= self.repeats:
                self.current, self.used = self.next_epoch(), 0
            self.used += 1
            yield self.current

    def _kept_epoch(self) -> NFTBatch:
        for _ in range(MAX_EMPTY_EPOCHS):
            batch = self.collect()
            self.epoch += 1
            if batch is not None:
                return batch
        raise RewardError(f"{MAX_EMPTY_EPOCHS} epochs in a row had no prompt group with distinct rewards: "
                          f"the reward ({self.settings.reward}) does not separate samples")

    def next_epoch(self) -> NFTBatch:
        """An epoch with something to learn from, its optimality probabilities from the group advantages
        of its kept samples (the global std: of every process's kept rewards)."""
        m, accelerator = self.settings, self.ctx.accelerator
        # the processes agree that each has its epoch (a scorer may fail on one) before they gather
        batch = together(accelerator, self._kept_epoch)
        every_reward = gather_values(accelerator, batch.rewards)
        advantages = group_advantages(batch.rewards, batch.groups, global_std=m.global_std, eps=m.std_eps,
                                      adv_clip_max=m.adv_clip_max, std_over=every_reward)
        batch.r = optimality_probability(advantages, m.adv_clip_max)
        batch.stats["reward_std_global"] = reward_summary(every_reward)["reward_std"]
        return batch

    # -- one gradient step -----------------------------------------------------------------------------
    def noised(self, batch: NFTBatch):
        """``(x_t, x0, σ, model timestep, sample index)`` rows for this step's draw: every sample at each of
        a random ``timestep_fraction`` of the schedule's steps, with fresh noise."""
        m, n = self.settings, len(batch.timesteps)
        count = max(1, int(n * m.timestep_fraction))
        steps = torch.randperm(n, generator=self.steps_rng)[:count].sort().values
        x0 = batch.x0.float()
        noise = torch.randn((len(steps), *x0.shape), generator=self.noise_rng)
        sigma = batch.sigmas[steps].view(-1, 1, *([1] * (x0.ndim - 1)))
        x_t = ((1 - sigma) * x0[None] + sigma * noise).flatten(0, 1)  # step-major rows
        rows = torch.arange(len(x0)).repeat(len(steps))
        sigmas = batch.sigmas[steps].repeat_interleave(len(x0))
        timesteps = batch.timesteps[steps].repeat_interleave(len(x0))
        return x_t, x0[rows], sigmas, timesteps, rows

    def velocities(self, denoiser, x_t, timesteps, cond_rows):
        ctx = self.ctx
        return ctx.family.call(denoiser, x_t.to(ctx.device, ctx.weight_dtype), timesteps.to(ctx.device),
                               cond_rows).float()

    def __call__(self, batch: NFTBatch):
        ctx, m = self.ctx, self.settings
        t0 = time.perf_counter()
        x_t, x0, sigmas, timesteps, rows = self.noised(batch)
        cast = lambda v: v.to(ctx.device, ctx.weight_dtype if v.is_floating_point() else v.dtype)  # noqa: E731
        pieces = torch.arange(len(rows)).split(m.train_batch_size)
        conds = [{k: cast(v[rows[p]]) for k, v in batch.cond.items()} for p in pieces]

        def all_velocities(denoiser):
            pairs = zip(pieces, conds, strict=True)
            return [self.velocities(denoiser, x_t[p], timesteps[p], c) for p, c in pairs]

        with torch.no_grad(), self.old_policy():
            v_old = all_velocities(ctx.unet)
        v_ref = [None] * len(pieces)
        if m.kl_weight > 0:
            with torch.no_grad(), ctx.reference() as reference:
                v_ref = all_velocities(reference)
        metrics: dict[str, float] = {}
        done = 0.0
        for j, p in enumerate(pieces):
            v_theta = self.velocities(ctx.unet, x_t[p], timesteps[p], conds[j])
            dev = lambda v: v.to(ctx.device)  # noqa: E731
            out = self.spec.velocity_loss(m, v_theta, v_old[j], v_ref[j], dev(x_t[p]), dev(x0[p]),
                                          dev(sigmas[p]), dev(batch.r[rows[p]]))
            weight = len(p) / len(rows)
            term = out.loss * weight
            last = j == len(pieces) - 1
            if not last:
                with ctx.accelerator.no_sync(ctx.unet):
                    ctx.accelerator.backward(term)
            done += float(term.detach())
            for key, value in {"implicit_acc": out.implicit_acc, "reward_margin": out.reward_margin,
                               **out.extra}.items():
                metrics[key] = metrics.get(key, 0.0) + float(value) * weight
        loss = term + (done - float(term.detach()))  # value: the step's loss; gradient: the last piece's
        metrics |= dict(batch.stats) | {"old_policy_decay": self.last_decay,
                                        "train_s": time.perf_counter() - t0}
        acc, margin = torch.tensor(metrics.pop("implicit_acc")), torch.tensor(metrics.pop("reward_margin"))
        return out._replace(loss=loss, implicit_acc=acc, reward_margin=margin,
                            extra={k: torch.tensor(float(v)) for k, v in metrics.items()})

    # -- checkpoints: the old policy, the epoch's samples and the draws --------------------------------
    def state_dict(self) -> dict:
        current = None if self.current is None else {f.name: getattr(self.current, f.name)
                                                     for f in fields(NFTBatch)}
        return {"epoch": self.epoch, "used": self.used, "last_decay": self.last_decay, "old": dict(self.old),
                "steps_rng": self.steps_rng.get_state(), "noise_rng": self.noise_rng.get_state(),
                "current": current}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.used, self.last_decay = state["epoch"], state["used"], state["last_decay"]
        missing = set(self.old) ^ set(state["old"])
        if missing:
            raise ValueError(f"the checkpoint's old policy does not match the trained weights "
                             f"({sorted(missing)[:3]})")
        with torch.no_grad():
            for name, value in state["old"].items():
                self.old[name].copy_(value)
        self.steps_rng.set_state(state["steps_rng"])
        self.noise_rng.set_state(state["noise_rng"])
        self.current = None if state["current"] is None else NFTBatch(**state["current"])
