"""The reward-gradient loop (DRaFT, DRaFT-K, DRaFT-LV, AlignProp, ReFL): one call = one micro-step.

One micro-step::

    B prompts ← the prompt source (train.batch_size per process; seeded by the step)
    x_T ... x_0 ← sample(θ) with the deterministic step (DDIM eta 0 / flow Euler), no graph  (the sampler)
    steps ← the variant's gradient steps (diffalign.methods.reward_gradient.gradient_steps)
    x ← the gradient steps recomputed from the stored x_a with a graph, each one checkpointed
    r ← differentiable scorer(VAE decode(x), prompts);  loss ← the variant's loss on r

With ``method.pretrain_loss_weight`` ``w > 0`` (ReFL's pretraining term) each micro-step also draws one
batch of ``train.batch_size`` images with captions from ``method.pretrain_data`` (epoch-shuffled, resumable:
:class:`~diffalign.data.EpochBatches`) and adds ``w ·`` the family's denoising loss of the trained denoiser
on it (:func:`~diffalign.denoising.denoising_losses`, as DPO computes it), its noise, timestep and VAE
posterior sample drawn from ``(seed, epoch, image index)``, so a resumed run draws what an uninterrupted
one would.

The chain before the first gradient step is the sampler's own (a constant for autograd, as in
:func:`~diffalign.methods.reward_gradient.sample_for_reward`, which would recompute it without a graph): the
gradient steps start from the stored latents, so no step runs twice. The recomputed steps call the denoiser
as the sampler does (:func:`diffalign.sampler.predict`, with CFG when ``guidance_scale > 1``) and take the
trajectory's own step rule, so they repeat the sampled chain up to float rounding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch
from torch.utils.checkpoint import checkpoint as checkpoint_call

from diffalign.config_types import ConfigError
from diffalign.data import DataError, EpochBatches
from diffalign.denoising import (
    decode_latents,
    denoising_losses,
    encode_images,
    keyed_generator,
    pair_noise,
    sample_latents,
)
from diffalign.methods.reward_gradient import (
    differentiable_sample,
    draft_lv_sample,
    gradient_steps,
    refl_sample,
    require_differentiable,
)
from diffalign.objectives.context import unwrap
from diffalign.objectives.online import choose_prompts, epoch_seed
from diffalign.prompt_sets import load_prompt_source
from diffalign.sampler import Trajectory, predict
from diffalign.sampling import sample_many
from diffalign.scorers import make_scorer
from diffalign.winners import WinnersDataset, open_winners

log = logging.getLogger("diffalign.reward_gradient")


def predicted_x0(rule, scheduler, model_output: torch.Tensor, t: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:
    """The denoiser's clean-latent estimate x̂_0 at per-row timesteps ``t`` (ReFL scores it): DDIM families
    from epsilon / v / sample prediction, flow families ``x - σ v``."""
    x, out = x.float(), model_output.float()
    view = (-1,) + (1,) * (x.ndim - 1)
    if rule.kind != "ddim":
        sigma = rule.sigmas_at(scheduler, t, len(x), x.device)[0].view(view)
        return x - sigma * out
    a = scheduler.alphas_cumprod.to(x.device, torch.float32)[t.long()].view(view)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x - (1 - a).sqrt() * out) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * out
    return out


def forward_noise(rule, scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t`` of the family's forward process (DRaFT-LV re-noises the final sample at the last step's t)."""
    rows = t.expand(len(x0)).to(x0.device)
    if rule.kind == "ddim":
        return scheduler.add_noise(x0, noise, rows.long())
    sigma = rule.sigmas_at(scheduler, rows, len(x0), x0.device)[0].view((-1,) + (1,) * (x0.ndim - 1))
    return (1 - sigma) * x0 + sigma * noise


class ChainSteps:
    """The sampler's step and x̂_0 for one trajectory, as differentiable functions ``(x, t) -> tensor`` of
    the trained denoiser (its conditioning and guidance are the trajectory's)."""

    def __init__(self, denoiser, family, trajectory: Trajectory, device, dtype: torch.dtype):
        self.denoiser, self.family, self.trajectory = denoiser, family, trajectory
        self.device, self.dtype = device, dtype
        self.rule, self.scheduler = trajectory.make_step_rule(), trajectory.make_scheduler()
        cast = lambda d: {k: v.to(device, dtype if v.is_floating_point() else v.dtype)  # noqa: E731
                          for k, v in d.items()}
        self.cond, self.uncond = cast(trajectory.cond), cast(trajectory.uncond)

    def _output(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = t.to(self.device).expand(len(x))
        tr = self.trajectory
        return predict(self.denoiser, self.family, x.to(self.dtype), rows, self.cond, self.uncond,
                       tr.guidance_scale, tr.guidance_rescale), rows

    def step(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out, rows = self._output(x, t)
        return self.rule(self.scheduler, out, rows, x).prev_sample

    def x0(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out, rows = self._output(x, t)
        return predicted_x0(self.rule, self.scheduler, out, rows, x)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return forward_noise(self.rule, self.scheduler, x0, noise, t)


def latents_for_reward(cfg, chain: ChainSteps, latents: torch.Tensor, generator: torch.Generator | None):
    """``(latents to decode and score, the gradient steps)`` for one draw of ``cfg.variant``, from a
    trajectory's stored chain ``latents`` [B, N+1, ...] (x_T ... x_0). Equals
    :func:`~diffalign.methods.reward_gradient.sample_for_reward` from ``x_T`` with the same generator when
    the stored chain is the step's own (it then repeats the no-gradient prefix)."""
    timesteps = list(chain.trajectory.timesteps)
    n = len(timesteps)
    steps = gradient_steps(cfg, n, generator)
    if cfg.variant == "draft_lv":
        x0 = latents[:, n]
        return draft_lv_sample(chain.step, chain.add_noise, x0, timesteps[-1], cfg.lv_renoisings, generator,
                               cfg.checkpoint), steps
    start = latents[:, steps[0]]
    if cfg.variant == "refl":
        return refl_sample(chain.step, chain.x0, start, timesteps[steps[0]:], 0, cfg.checkpoint), steps
    local = range(0, len(steps))  # the suffix [a, N) is all gradient steps
    return differentiable_sample(chain.step, start, timesteps[steps[0]:], local, cfg.checkpoint), steps


def open_pretraining_data(cfg):
    """The images with captions of ``method.pretrain_data`` (None when unset), opened and checked before any
    model loads; a dataset that cannot be read is one :class:`ConfigError` naming the key."""
    source = getattr(cfg.method, "pretrain_data", "")
    if not source:
        return None
    try:
        return open_winners(replace(cfg.data, source=source))
    except DataError as err:
        raise ConfigError("method.pretrain_data", source, "images with captions: a preference set (its "
                          "chosen images), a JSONL of prompt / image or a `diffalign sample` folder "
                          f"({err})") from None


def pretraining_loss(ctx, batch: dict, noise_key: str) -> torch.Tensor:
    """The mean denoising loss of the trained denoiser on a batch of images with captions (the family's own
    training noise); the VAE posterior sample, noise and timestep of each image drawn from ``(noise_key,
    its dataset index)``."""
    vae, family, device, dtype = ctx.pipe.vae, ctx.family, ctx.device, ctx.weight_dtype
    indices = batch["index"]
    generators = [keyed_generator(f"{noise_key}/posterior/{i}") for i in indices.tolist()]
    latents = sample_latents(vae, encode_images(vae, batch["pixels"]), generators).to(device, dtype)
    cond = family.encode_prompt(ctx.pipe, batch["caption"], device)
    cond = {k: v.to(device, dtype) for k, v in cond.items()}
    for key in family.micro_conditioning:  # SDXL: original size, crop offsets, target size per image
        cond[key] = batch[key].to(device, dtype)
    noise, timesteps = pair_noise(indices, noise_key, tuple(latents.shape[1:]),
                                  ctx.noise_scheduler.config.num_train_timesteps)
    return denoising_losses(ctx.unet, family, ctx.noise_scheduler, latents, noise.to(device, dtype),
                            timesteps.to(device), cond).mean()


class RewardGradientObjective:
    """DRaFT / DRaFT-K / DRaFT-LV / AlignProp / ReFL for the trainer (``MethodSpec.kind="reward_gradient"``).
    ``batches()`` draws each micro-step's prompts and seeds; each call samples, back-propagates through the
    variant's steps, decodes, scores and returns the loss (the trainer calls backward on it)."""

    def __init__(self, ctx):
        self.ctx, self.spec, self.settings = ctx, ctx.spec, ctx.cfg.method
        m = self.settings
        self.prompts = load_prompt_source(m.prompts, m.prompt_column)
        self.scorer = make_scorer(m.reward)
        require_differentiable(self.scorer, f"{m.name} (a reward-gradient method)")
        self.sampling = m.sampling().for_model(ctx.pipe, ctx.cfg.model.name)
        self.calls = 0  # micro-steps drawn so far: seeds each one's prompts and initial noise
        self.generator = torch.Generator().manual_seed(ctx.cfg.train.seed)  # truncation / re-noising draws
        self.batches_of = self.pretrain_batches = None  # ReFL's pretraining images (batches_of: skip report)
        if m.pretrain_loss_weight > 0:
            cfg = ctx.cfg
            source = ctx.source if ctx.source is not None else open_pretraining_data(cfg)
            frames = ctx.prep.num_frames if ctx.prep is not None else None
            dataset = WinnersDataset(source, cfg.data.resolution, cfg.data.random_flip, cfg.train.seed,
                                     frames, cfg.data.frame_policy)
            self.batches_of = EpochBatches(dataset, ctx.accelerator, batch_size=cfg.train.batch_size,
                                           seed=cfg.train.seed, num_workers=cfg.data.num_workers,
                                           max_bad_fraction=cfg.data.max_bad_fraction)
            log.info("%s: pretraining loss (weight %g) on %d images with captions from %s", m.name,
                     m.pretrain_loss_weight, len(source), source.description)
        log.info("%s: %d prompts from %s; reward %s; %d steps", m.name, len(self.prompts), m.prompts,
                 m.reward, self.sampling.num_steps)

    def batches(self):
        """``(prompts, seeds)`` of each micro-step: ``train.batch_size`` prompts, one sample each."""
        ctx = self.ctx
        while True:
            seed = epoch_seed(ctx.cfg.train.seed, self.calls, ctx.accelerator.process_index)
            prompts = choose_prompts(self.prompts, ctx.cfg.train.batch_size, seed)
            self.calls += 1
            yield prompts, [seed + i for i in range(len(prompts))]

    def sample_chain(self, prompts: list[str], seeds: list[int]) -> Trajectory:
        """The deterministic chains of the current weights, without a graph."""
        ctx = self.ctx
        bare = unwrap(ctx.unet)
        bare.eval()
        out = sample_many(ctx.pipe, prompts, seeds, self.sampling, batch_size=len(prompts), decode=False,
                          trajectories=True, model_name=ctx.cfg.model.name)
        bare.train()
        return out.trajectory

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pipe, family = self.ctx.pipe, self.ctx.family
        s = self.sampling

        def run(z):
            return decode_latents(pipe.vae, family.training_latents(pipe, z, s.height, s.width))

        if not self.settings.checkpoint:
            return run(latents)
        return checkpoint_call(run, latents, use_reentrant=False)

    def __call__(self, batch):
        prompts, seeds = batch
        ctx, m = self.ctx, self.settings
        t0 = time.perf_counter()
        trajectory = self.sample_chain(prompts, seeds)
        t1 = time.perf_counter()
        chain = ChainSteps(ctx.unet, ctx.family, trajectory, ctx.device, ctx.weight_dtype)
        latents = trajectory.latents.to(ctx.device)
        x, steps = latents_for_reward(m, chain, latents, self.generator)
        images = self.decode(x)
        copies = len(x) // len(prompts)  # DRaFT-LV scores each re-noised copy
        rewards = self.scorer.score(images, prompts * copies).to(ctx.device)
        pretrain = None
        if self.batches_of is not None:
            if self.pretrain_batches is None:
                self.pretrain_batches = iter(self.batches_of)
            images_batch = next(self.pretrain_batches)
            key = f"pretrain/{ctx.cfg.train.seed}/{self.batches_of.epoch}"
            pretrain = pretraining_loss(ctx, images_batch, key)
        out = self.spec.reward_loss(m, rewards, pretrain)
        timings = {"sampling_s": t1 - t0, "forward_s": time.perf_counter() - t1,
                   "first_gradient_step": float(steps[0]), "gradient_steps": float(len(steps))}
        return out._replace(extra={**out.extra, **{k: torch.tensor(v) for k, v in timings.items()}})

    # -- checkpoints: the micro-step counter, the variant's random draws, the pretraining data position ---
    def state_dict(self) -> dict:
        state = {"calls": self.calls, "generator": self.generator.get_state()}
        if self.batches_of is not None:
            state["pretrain"] = self.batches_of.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]
        self.generator.set_state(state["generator"])
        # a checkpoint saved without the pretraining term: its images start from the first batch
        if self.batches_of is not None and state.get("pretrain") is not None:
            self.batches_of.load_state_dict(state["pretrain"])
            self.pretrain_batches = None  # a fresh iterator starts at the restored position
