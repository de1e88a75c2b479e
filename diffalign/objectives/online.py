"""The online loop shared by PRDP, DDPO and GRPO: sample, score, then K gradient steps on the stored steps.

One epoch::

    θ_old ← θ                                    (the policy as it is now: the sampler records log π_old)
    N prompts × B trajectories ← sample(θ_old)   (diffalign.sampler.sample, DDIM with eta 1; or the method's
                                                  rule for the epoch, e.g. GRPO-Fast's SDE window)
    rewards ← weighted sum of scorers            (NaN/inf dropped and counted; all-equal groups skipped)
    log π_ref per step ← recompute(reference)    (PRDP; with LoRA: the same UNet with adapters disabled;
                                                  GRPO's KL: the reference's step means)
    repeat K times:                              (one optimizer step each)
        log π_θ ← recompute(θ) on all stored steps, a random subset, or the method's (per-sample) steps
        loss ← the method's loss (diffalign.methods.prdp / ddpo / grpo); backward, clip, step

The trainer (:mod:`diffalign.train`) runs it through :class:`OnlineObjective`: ``batches()`` samples an
epoch and yields it K times, and each call is one gradient step. The settings are the fields of
:class:`~diffalign.methods.online_settings.OnlineSettings`, shared by every online method's config;
``train.max_steps`` counts optimizer steps, so a run has ``ceil(max_steps / K)`` epochs. What differs
between the methods is their hooks (``online_loss``, ``loss_weight``, ``advantages``, and optionally
``sampling_rule``, ``train_columns``, ``step_means``, ``ema_settings``; see
:class:`~diffalign.methods.base.MethodSpec`).
Under ``accelerate launch`` every process samples its own N prompts (the effective batch is N × B ×
processes) and gradients are averaged as usual; a prompt's group stays on its process, and the advantages'
``every_reward`` (GRPO's global std) is every process's finite rewards, gathered once per epoch.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from diffalign.methods.base import LossOutput
from diffalign.methods.grpo import ema_update, make_ema
from diffalign.methods.online_settings import OnlineSettings
from diffalign.objectives.context import unwrap
from diffalign.parallel import common_count, gather_values, gathered, together
from diffalign.prompt_sets import load_prompt_source
from diffalign.sampler import RecomputedSteps, Trajectory, recompute_steps
from diffalign.sampling import sample_many
from diffalign.scorers import CombinedScorer, make_scorer
from diffalign.scorers.async_scoring import ScoringQueue

log = logging.getLogger("diffalign.online")


# ----------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------
class RewardError(RuntimeError):
    """A scorer raised, or too many rewards were not finite."""


def make_reward(spec: str) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """``reward(images, prompts) -> [B]`` on the CPU: the scorer spec's (weighted) score.

    A scorer that raises becomes a :class:`RewardError` naming it (the failing part of a weighted sum).
    """
    scorer = make_scorer(spec)
    parts = scorer.parts if isinstance(scorer, CombinedScorer) else [(1.0, scorer)]

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = torch.zeros(len(images))
        for weight, part in parts:
            try:
                scores = part.score(images, prompts)
            except Exception as err:
                raise RewardError(f"reward scorer {part.name!r} raised {type(err).__name__}: {err}") from err
            total += weight * scores.detach().float().cpu()
        return total

    return reward


# ----------------------------------------------------------------------------------------------------
# One epoch's samples
# ----------------------------------------------------------------------------------------------------
@dataclass
class OnlineBatch:
    """The trajectories of one epoch, with everything the losses need, for the kept samples only.

    ``logp_old`` / ``logp_ref`` are [n, S] at the stochastic ``steps`` (indices into the trajectory);
    ``mean_ref`` [n, S, ...] / ``step_std`` [n, S] the reference's step means and the steps' std (methods
    with ``step_means``). After :meth:`select` with per-sample columns, ``steps`` is [n, k].
    """

    trajectory: object  # diffalign.sampler.Trajectory
    rewards: torch.Tensor  # [n]
    groups: torch.Tensor  # [n] prompt group id
    steps: torch.Tensor  # [S]
    logp_old: torch.Tensor  # [n, S]
    logp_ref: torch.Tensor | None = None  # [n, S]
    advantages: torch.Tensor | None = None  # [n]
    stats: dict = field(default_factory=dict)
    mean_ref: torch.Tensor | None = None  # [n, S, ...]
    step_std: torch.Tensor | None = None  # [n, S]

    def to(self, device) -> OnlineBatch:
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return OnlineBatch(
            self.trajectory,
            move(self.rewards),
            move(self.groups),
            self.steps,
            move(self.logp_old),
            move(self.logp_ref),
            move(self.advantages),
            self.stats,
            move(self.mean_ref),
            move(self.step_std),
        )

    def select(self, index: torch.Tensor, columns: torch.Tensor | None = None) -> OnlineBatch:
        """The samples at ``index``, at the stored-step ``columns``: [k] for all of them, or [n, k] (one row
        per sample of this batch) for per-sample steps."""
        if columns is None:
            pick, steps = (lambda x: x[index]), self.steps
        elif columns.ndim == 1:
            pick, steps = (lambda x: x[index][:, columns]), self.steps[columns]
        else:
            own = columns[index]
            pick, steps = (lambda x: x[index][torch.arange(len(index))[:, None], own]), self.steps[own]
        optional = lambda x: None if x is None else pick(x)  # noqa: E731
        return OnlineBatch(
            trajectory=self.trajectory.select(index), rewards=self.rewards[index], groups=self.groups[index],
            steps=steps, logp_old=pick(self.logp_old), logp_ref=optional(self.logp_ref),
            advantages=None if self.advantages is None else self.advantages[index], stats=self.stats,
            mean_ref=optional(self.mean_ref), step_std=optional(self.step_std))


def sample_epoch(
    pipe, prompts: list[str], settings: OnlineSettings, seeds: list[int], reward, model_name: str = "",
    step_rule=None,
):
    """Sample ``len(prompts) × B`` trajectories (grouped by prompt) and score them; ``step_rule``: the
    sampler's rule instead of the family's. With ``settings.shared_group_noise`` a group's samples start
    from the noise of its first sample's seed and draw their steps' noise from their own seeds.

    Returns ``(trajectory, rewards [n], groups [n], timings)`` with all samples, NaN rewards included.
    Videos are scored by the reward's image scorers averaged over frames. The trajectories wait on the
    host, not the GPU.
    """
    jobs = [(p, g) for g, p in enumerate(prompts) for _ in range(settings.samples_per_prompt)]
    job_prompts = [p for p, _ in jobs]
    # async_scoring: each batch is scored in the background while the next one is sampled
    scoring = ScoringQueue(reward) if settings.async_scoring else None
    submit = None if scoring is None else \
        (lambda start, batch: scoring.submit(batch.images, job_prompts[start : start + len(batch.images)]))
    seeds = list(seeds[: len(jobs)])
    step_seeds = None
    if settings.shared_group_noise:
        b = settings.samples_per_prompt
        seeds, step_seeds = [seeds[(i // b) * b] for i in range(len(seeds))], seeds
    t0 = time.perf_counter()
    out = sample_many(pipe, job_prompts, seeds, settings.sampling(),
                      batch_size=settings.sample_batch_size, trajectories=True, model_name=model_name,
                      on_batch=submit, step_rule=step_rule, step_seeds=step_seeds)
    t1 = time.perf_counter()
    # async: scoring_s is only the wait for the batches still being scored when sampling ended
    rewards = scoring.gather() if scoring is not None else reward(out.images, out.trajectory.prompts)
    t2 = time.perf_counter()
    groups = torch.tensor([g for _, g in jobs])
    return out.trajectory, rewards, groups, {"sampling_s": t1 - t0, "scoring_s": t2 - t1}


def reward_summary(rewards: torch.Tensor) -> dict:
    """The epoch's reward mean and std over its finite rewards (NaN / 0 when there are too few)."""
    finite = rewards[torch.isfinite(rewards)]
    return {"reward_mean": float(finite.mean()) if len(finite) else float("nan"),
            "reward_std": float(finite.std()) if len(finite) > 1 else 0.0}


def filter_rewards(rewards: torch.Tensor, groups: torch.Tensor, max_bad_fraction: float):
    """Which samples to keep: finite rewards, in groups whose rewards are not all equal.

    Raises :class:`RewardError` when more than ``max_bad_fraction`` of the rewards are NaN/inf.
    """
    finite = torch.isfinite(rewards)
    num_bad = int((~finite).sum())
    if num_bad:
        log.warning("dropped %d of %d samples with a NaN/inf reward", num_bad, len(rewards))
        if num_bad > max_bad_fraction * len(rewards):
            raise RewardError(f"{num_bad} of {len(rewards)} rewards are NaN/inf (more than "
                              f"max_bad_reward_fraction={max_bad_fraction}); check the reward scorers")
    keep = finite.clone()
    num_flat = 0
    for g in groups.unique():
        member = (groups == g) & finite
        values = rewards[member]
        if len(values) < 2 or bool((values == values[0]).all()):
            keep &= ~member
            num_flat += 1
    if num_flat:
        log.warning(
            "skipped %d prompt group(s) whose rewards are all equal (or fewer than 2): nothing to learn "
            "from them",
            num_flat,
        )
    return keep, {"num_bad_rewards": num_bad, "num_flat_groups": num_flat}


def stochastic_steps(trajectory) -> torch.Tensor:
    return torch.nonzero(trajectory.stochastic, as_tuple=True)[0]


@torch.no_grad()
def batched_log_probs(
    denoiser, trajectory, steps: torch.Tensor, *, chunk_size: int, sample_batch: int, with_mean: bool = False
):
    """``recompute_log_probs`` over many samples, ``sample_batch`` at a time, without gradients (with
    ``with_mean``: the whole :class:`~diffalign.sampler.RecomputedSteps`)."""
    out = []
    for start in range(0, len(trajectory), sample_batch):
        part = trajectory.select(torch.arange(start, min(start + sample_batch, len(trajectory))))
        result = recompute_steps(denoiser, part, steps, chunk_size=chunk_size, with_mean=with_mean)
        out.append(RecomputedSteps(*(None if x is None else x.float().cpu() for x in result)))
    if not with_mean:
        return torch.cat([r.log_prob for r in out])
    return RecomputedSteps(*(torch.cat(list(column)) for column in zip(*out, strict=True)))


# ----------------------------------------------------------------------------------------------------
# The objective the trainer drives (diffalign.train): one call = one gradient step
# ----------------------------------------------------------------------------------------------------
def micro_batches(groups: torch.Tensor, prompts_per_micro_batch: int) -> list[torch.Tensor]:
    """Sample indices split by whole prompt groups (PRDP's pairs never cross a micro-batch)."""
    ids = groups.unique()
    return [torch.nonzero(torch.isin(groups, ids[i : i + prompts_per_micro_batch]), as_tuple=True)[0]
            for i in range(0, len(ids), prompts_per_micro_batch)]


MAX_EMPTY_EPOCHS = 5


class OnlineObjective:
    """PRDP / DDPO / GRPO for the trainer: ``batches()`` samples an epoch and yields it K times; each call is
    one gradient step of the method's loss over all of the epoch's samples, micro-batch by micro-batch."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.spec = ctx.spec
        self.settings = ctx.cfg.method
        self.prompts = load_prompt_source(self.settings.prompts, self.settings.prompt_column)
        self.reward = make_reward(self.settings.reward)
        self.epoch = 0
        self.current: OnlineBatch | None = None  # the epoch being trained on, used ``self.used`` times so far
        self.used = 0
        self.steps_rng = torch.Generator().manual_seed(ctx.cfg.train.seed)
        self.needs_means = self.spec.step_means is not None and bool(self.spec.step_means(self.settings))
        # an EMA of the trained weights (GRPO's ``ema``), for the final evaluation and export only
        ema = None if self.spec.ema_settings is None else self.spec.ema_settings(self.settings)
        self.ema_params = [p for p in unwrap(ctx.unet).parameters() if p.requires_grad] if ema else []
        self.ema = None if ema is None else make_ema(self.ema_params, max_decay=ema[0])
        self.ema_interval = 0 if ema is None else ema[1]
        log.info(
            "%s: %d prompts from %s; reward %s",
            self.settings.name,
            len(self.prompts),
            self.settings.prompts,
            self.settings.reward,
        )

    # -- sampling ------------------------------------------------------------------------------------
    def collect(self) -> tuple[OnlineBatch, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Sample, score and store one epoch: ``(batch, rewards, groups, kept)``, the batch of the kept
        samples, every sample's rewards and groups (the advantages come from them, in :meth:`next_epoch`)
        and the kept samples' indices; None when no prompt group has anything to learn from."""
        ctx, m = self.ctx, self.settings
        seed = epoch_seed(ctx.cfg.train.seed, self.epoch, ctx.accelerator.process_index)
        prompts = choose_prompts(self.prompts, m.num_prompts, seed)
        seeds = [seed + i for i in range(len(prompts) * m.samples_per_prompt)]
        step_rule = None
        if self.spec.sampling_rule is not None:  # e.g. GRPO-Fast: this epoch's SDE window
            generator = torch.Generator().manual_seed(seed)
            step_rule = self.spec.sampling_rule(m, ctx.family.make_step_rule(m.eta), generator)
        unet = unwrap(ctx.unet)
        unet.eval()
        trajectory, rewards, groups, timings = sample_epoch(
            ctx.pipe, prompts, m, seeds, self.reward, ctx.cfg.model.name, step_rule
        )
        unet.train()
        keep, stats = filter_rewards(rewards, groups, m.max_bad_reward_fraction)
        stats |= timings | reward_summary(rewards)
        if not bool(keep.any()):
            log.warning("epoch %d: no prompt group with distinct rewards; sampling again", self.epoch)
            return None
        index = torch.nonzero(keep, as_tuple=True)[0]
        all_rewards, all_groups = rewards, groups
        trajectory, rewards, groups = trajectory.select(index), rewards[index], groups[index]
        steps = stochastic_steps(trajectory)
        batch = OnlineBatch(
            trajectory, rewards, groups, steps, trajectory.log_probs[:, steps].float(), stats=stats
        )
        if self.needs_means:
            t0 = time.perf_counter()
            with ctx.reference() as reference:
                ref = batched_log_probs(reference, trajectory, steps, chunk_size=m.recompute_chunk_size,
                                        sample_batch=m.sample_batch_size, with_mean=True)
            batch.mean_ref, batch.step_std = ref.mean, ref.std
            stats["reference_s"] = time.perf_counter() - t0
        if ctx.spec.needs_reference:
            t0 = time.perf_counter()
            with ctx.reference() as reference:
                batch.logp_ref = batched_log_probs(
                    reference,
                    trajectory,
                    steps,
                    chunk_size=m.recompute_chunk_size,
                    sample_batch=m.sample_batch_size,
                )
            stats["reference_s"] = time.perf_counter() - t0
        return batch, all_rewards, all_groups, index

    def _kept_epoch(self) -> tuple[OnlineBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`collect` until an epoch has something to learn from (each process on its own)."""
        for _ in range(MAX_EMPTY_EPOCHS):
            collected = self.collect()
            self.epoch += 1
            if collected is not None:
                return collected
        raise RewardError(
            f"{MAX_EMPTY_EPOCHS} epochs in a row had no prompt group with distinct rewards: the "
            f"reward ({self.settings.reward}) does not separate samples"
        )

    def batches(self):
        """The current epoch's batch, ``gradient_steps_per_epoch x accumulation`` times, then a new epoch."""
        repeats = self.settings.gradient_steps_per_epoch * self.ctx.cfg.train.gradient_accumulation_steps
        while True:
            if self.current is None or self.used >= repeats:
                self.current, self.used = self.next_epoch(), 0
            self.used += 1
            yield self.current

    def next_epoch(self) -> OnlineBatch:
        # FSDP: the weights gathered once for the epoch, so sampling again and the reference log-probs of
        # however many samples a process kept need no collective
        accelerator = self.ctx.accelerator
        with gathered(self.ctx.unet, self.ctx.ref_unet):
            if self.spec.advantages is None:
                return self._kept_epoch()[0]
            # the processes agree that each has its epoch (a scorer may fail on one) before they gather
            batch, rewards, groups, kept = together(accelerator, self._kept_epoch)
        # from every finite reward of every process (GRPO's global std), then kept
        finite = torch.isfinite(rewards)
        every_reward = gather_values(accelerator, rewards[finite])
        advantages = torch.zeros(len(rewards))
        advantages[finite] = self.spec.advantages(self.settings, rewards[finite], groups[finite],
                                                  every_reward).float()
        batch.advantages = advantages[kept]
        batch.stats["reward_std_global"] = reward_summary(every_reward)["reward_std"]
        return batch

    # -- one gradient step -----------------------------------------------------------------------------
    def __call__(self, batch: OnlineBatch):
        """Backward every piece of the epoch's loss but the last here; return a loss whose value is the
        whole epoch's loss and whose gradient is the last piece's (the trainer calls backward on it)."""
        ctx, m = self.ctx, self.settings
        t0 = time.perf_counter()
        columns = None
        if self.spec.train_columns is not None:  # the method's own choice, possibly per sample
            columns = self.spec.train_columns(m, len(batch.rewards), len(batch.steps), self.steps_rng)
        elif m.train_timesteps is not None and m.train_timesteps < len(batch.steps):
            columns = (
                torch.randperm(len(batch.steps), generator=self.steps_rng)[: m.train_timesteps].sort().values
            )
        parts = [batch.select(index, columns) for index in micro_batches(batch.groups, m.micro_batch_prompts)]
        weights = [self.spec.loss_weight(m, part) for part in parts]
        parts, weights = (
            [p for p, w in zip(parts, weights, strict=True) if w > 0],
            [w for w in weights if w > 0],
        )
        # FSDP: every process runs as many micro-batches (each forward is a collective); extra ones weigh 0
        padding = common_count(ctx.accelerator, ctx.unet, len(parts)) - len(parts)
        parts, weights = parts[:1] * padding + parts, [0.0] * padding + weights
        total = sum(weights)
        metrics: dict[str, float] = {}
        done = 0.0
        for j, (part, weight) in enumerate(zip(parts, weights, strict=True)):
            out, pieces = self._loss_pieces(part, weight / total)
            for k, piece in enumerate(pieces):
                last = j == len(parts) - 1 and k == len(pieces) - 1
                with contextlib.nullcontext() if last else ctx.accelerator.no_sync(ctx.unet):
                    term, value = piece()
                    if not last:
                        ctx.accelerator.backward(term)
                done += value
            for key, value in {
                "implicit_acc": out.implicit_acc,
                "reward_margin": out.reward_margin,
                **out.extra,
            }.items():
                metrics[key] = metrics.get(key, 0.0) + float(value) * weight / total
        loss = term + (done - float(term.detach()))  # value: the epoch's loss; gradient: the last piece's
        metrics |= {k: v for k, v in batch.stats.items()} | {"train_s": time.perf_counter() - t0}
        implicit_acc = torch.tensor(metrics.pop("implicit_acc"))
        reward_margin = torch.tensor(metrics.pop("reward_margin"))
        return LossOutput(
            loss, implicit_acc, reward_margin, {k: torch.tensor(float(v)) for k, v in metrics.items()}
        )

    def _loss_pieces(self, part: OnlineBatch, scale: float):
        """The method's loss on one micro-batch, as pieces ``() -> (graph term, loss value)`` whose
        gradients sum to the gradient of ``scale × loss``.

        One piece: all of the micro-batch's steps in one graph. With ``steps_per_backward``: the policy's
        log-probs are first computed without a graph, ``d loss / d log π_θ`` is taken on them, and each
        chunk of steps is recomputed with a graph and back-propagated as ``Σ grad · log π_θ`` (exact, one
        more forward pass, memory for only ``steps_per_backward`` steps).
        """
        ctx, m = self.ctx, self.settings
        recompute = lambda steps, with_mean=False: recompute_steps(  # noqa: E731
            ctx.unet, part.trajectory, steps, chunk_size=m.recompute_chunk_size, with_mean=with_mean
        )
        num_steps = part.steps.shape[-1]
        if self.needs_means:  # the loss takes the policy's step means too: one graph per micro-batch
            if m.steps_per_backward is not None and m.steps_per_backward < num_steps:
                raise NotImplementedError(f"{m.name}: steps_per_backward with a loss on the steps' means "
                                          "(e.g. GRPO's KL, beta > 0) is not supported; set it to null")
            policy = recompute(part.steps, with_mean=True)
            logp = policy.log_prob.float()
            out = self.spec.online_loss(m, part.to(logp.device), logp, policy.mean)
            term = out.loss * scale
            return out, [lambda: (term, float(term.detach()))]
        if m.steps_per_backward is None or m.steps_per_backward >= num_steps:
            logp = recompute(part.steps).log_prob.float()
            out = self.spec.online_loss(m, part.to(logp.device), logp)
            term = out.loss * scale
            return out, [lambda: (term, float(term.detach()))]
        with torch.no_grad():
            logp = recompute(part.steps).log_prob.float()
        leaf = logp.requires_grad_(True)
        out = self.spec.online_loss(m, part.to(leaf.device), leaf)
        (grad,) = torch.autograd.grad(out.loss * scale, leaf)
        value = float(out.loss.detach()) * scale
        chunks = torch.arange(num_steps).split(m.steps_per_backward)

        def piece(cols, first):
            return lambda: (
                (grad[:, cols] * recompute(part.steps[..., cols]).log_prob.float()).sum(),
                value if first else 0.0,
            )

        return out, [piece(cols, k == 0) for k, cols in enumerate(chunks)]

    # -- the EMA of the weights -------------------------------------------------------------------------
    def on_step_end(self, step: int) -> None:
        if self.ema is not None:
            ema_update(self.ema, self.ema_params, step - 1, self.ema_interval)

    def final_weights(self) -> None:
        """At the end of training: the EMA's weights replace the trained ones (what is evaluated and
        exported; checkpoints keep the trained weights and the EMA)."""
        if self.ema is not None:
            self.ema.copy_to(self.ema_params)

    # -- checkpoints: the epoch counter, and the current epoch's samples so a resume finishes that epoch --
    def state_dict(self) -> dict:
        current = None
        if self.current is not None:
            current = {f.name: getattr(self.current, f.name) for f in fields(OnlineBatch)}
            current["trajectory"] = {
                f.name: getattr(self.current.trajectory, f.name) for f in fields(self.current.trajectory)
            }
        return {
            "epoch": self.epoch,
            "used": self.used,
            "steps_rng": self.steps_rng.get_state(),
            "current": current,
            "ema": None if self.ema is None else self.ema.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.used = state["epoch"], state["used"]
        self.steps_rng.set_state(state["steps_rng"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.ema_params[0].device)
        current = state["current"]
        if current is not None:
            current = dict(current, trajectory=Trajectory(**current["trajectory"]))
        self.current = None if current is None else OnlineBatch(**current)


def epoch_seed(seed: int, epoch: int, process: int) -> int:
    return (seed * 1_000_003 + epoch * 9_973 + process * 101) % (2**31)


def choose_prompts(prompts: list[str], n: int, seed: int) -> list[str]:
    """N prompts for one epoch: without replacement when there are enough, else with replacement."""
    rng = random.Random(seed)
    return rng.sample(prompts, n) if n <= len(prompts) else rng.choices(prompts, k=n)
