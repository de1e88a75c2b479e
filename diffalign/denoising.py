"""Denoising primitives the objectives share: latents from pixels, the training noise processes and the
per-sample denoising loss.

A noise process turns clean latents, noise and integer timestep draws (``0 <= t < num_train_timesteps``)
into ``(noisy latents, the denoiser's timestep, the regression target)``: :class:`DDPMNoise` (epsilon or
v-prediction, SD/SDXL/AnimateDiff) and :class:`FlowMatchingNoise` (velocity, SD3/FLUX/Wan). Each model family
(:mod:`diffalign.families`) names its own, so the losses never branch on the model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from diffalign.flow_matching import (
    LOSS_WEIGHTINGS,
    TIMESTEP_DENSITIES,
    flux_mu,
    loss_weights,
    packed_seq_len,
    u_of_uniform,
)
from diffalign.steps import FlowSDEStep


def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAE posterior parameters (mean and log-variance) of pixels in [-1, 1], in fp32.

    Images [N, 3, H, W] give [N, 2C, h, w]. Videos [N, F, 3, H, W] give [N, 2C, f, h, w]: an image VAE
    (AnimateDiff's) encodes frame by frame (f = F); a video VAE (Wan's causal 3D VAE) encodes the clip
    (f = its temporally compressed length).
    """
    from diffusers import AutoencoderKL

    with torch.no_grad():
        pixels = pixels.to(vae.device, vae.dtype)
        if pixels.ndim == 4:
            return vae.encode(pixels).latent_dist.parameters.float()
        n, f = pixels.shape[:2]
        if isinstance(vae, AutoencoderKL):
            params = vae.encode(pixels.flatten(0, 1)).latent_dist.parameters.float()
            return params.unflatten(0, (n, f)).transpose(1, 2)
        return vae.encode(pixels.transpose(1, 2)).latent_dist.parameters.float()


def sample_latents(vae, params: torch.Tensor, generator=None) -> torch.Tensor:
    """A posterior sample in the denoiser's latent space, normalised the way the pipeline un-normalises it:
    SD/SDXL ``(z - shift) * scaling_factor``; Wan ``(z - latents_mean) / latents_std`` per channel.
    ``generator``: one ``torch.Generator`` per row (or one for all, or None for the global RNG)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    latents = DiagonalGaussianDistribution(params).sample(generator=generator)
    if (
        getattr(vae.config, "latents_mean", None) is not None
        and getattr(vae.config, "latents_std", None) is not None
    ):
        view = (1, -1) + (1,) * (latents.ndim - 2)
        mean = torch.tensor(vae.config.latents_mean, dtype=latents.dtype, device=latents.device).view(view)
        std = torch.tensor(vae.config.latents_std, dtype=latents.dtype, device=latents.device).view(view)
        return (latents - mean) / std
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


#: The flow-matching training settings (``train.flow_*``) and their defaults: draws as drawn, unweighted,
#: the scheduler's own table.
FLOW_DEFAULTS = {"timestep_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
                 "loss_weighting": "none", "dynamic_shift": False}
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] of the denoiser's latents, as the pipelines decode them, *with* gradients (the
    reward-gradient methods back-propagate through it): images [N, C, h, w] give [N, 3, H, W]; videos
    [N, C, f, h, w] give [N, F, 3, H, W] (an image VAE frame by frame, a video VAE the whole clip).

    Un-normalised as the pipelines do: ``z / scaling_factor + shift`` (SD, SDXL, SD3, FLUX), or
    ``z · std / scaling_factor + mean`` with per-channel ``latents_mean`` / ``latents_std`` (Wan).
    """
    from diffusers import AutoencoderKL

    config = vae.config
    latents = latents.to(vae.dtype)
    scale = getattr(config, "scaling_factor", None) or 1.0
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        view = (1, -1) + (1,) * (latents.ndim - 2)
        mean = torch.tensor(config.latents_mean, dtype=latents.dtype, device=latents.device).view(view)
        std = torch.tensor(config.latents_std, dtype=latents.dtype, device=latents.device).view(view)
        z = latents * std / scale + mean
    else:
        z = latents / scale + (getattr(config, "shift_factor", None) or 0.0)
    if z.ndim == 4:
        pixels = vae.decode(z).sample
    elif isinstance(vae, AutoencoderKL):  # AnimateDiff: the image VAE, frame by frame
        n, f = z.shape[0], z.shape[2]
        pixels = vae.decode(z.transpose(1, 2).flatten(0, 1)).sample.unflatten(0, (n, f))
    else:  # Wan's causal video VAE: [N, 3, F, H, W]
        pixels = vae.decode(z).sample.transpose(1, 2)
    pixels = pixels.to(torch.promote_types(pixels.dtype, torch.float32))  # fp16 VAEs: fp32 pixels
    return (pixels / 2 + 0.5).clamp(0, 1)


@dataclass
class DDPMNoise:
    """The training noise of a DDPM-family model: ``scheduler.add_noise``, target epsilon or velocity."""

    scheduler: object  # diffusers DDPMScheduler from the pipeline's scheduler config

    @classmethod
    def from_pipeline_config(cls, config: dict, timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                             logit_std: float = 1.0, **flow_settings) -> DDPMNoise:
        """Timesteps are drawn uniformly and the losses unweighted: the flow settings must stay at their
        defaults."""
        from diffusers import DDPMScheduler

        flow_settings |= {"timestep_sampling": timestep_sampling, "logit_mean": logit_mean,
                          "logit_std": logit_std}
        changed = {k: v for k, v in flow_settings.items() if v != FLOW_DEFAULTS[k]}
        if changed:
            keys = ", ".join(f"train.flow_{k}={v!r}" for k, v in changed.items())
            raise ValueError(f"{keys}: flow-matching settings, for sd3, flux and wan; this model trains with "
                             "DDPM noise (uniform timesteps, unweighted): leave train.flow_* unset")
        return cls(DDPMScheduler.from_config(dict(config)))

    @property
    def config(self):
        return self.scheduler.config

    def corrupt(self, latents, noise, timesteps):
        """``(noisy latents, the denoiser's timesteps, target)`` for integer draws ``timesteps`` [N]."""
        scheduler = self.scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "epsilon":
            target = noise
        elif scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise NotImplementedError(f"training with prediction_type {scheduler.config.prediction_type!r} "
                                      "is not supported")
        return noisy, timesteps, target

    def loss_weights(self, timesteps, latents) -> None:
        return None  # unweighted


@dataclass
class FlowMatchingNoise:
    """The training noise of a flow-matching model (SD3, FLUX, Wan): ``x_t = (1 - σ) x0 + σ ε``, target
    ``ε - x0``, as diffusers' SD3/FLUX training scripts compute it.

    It takes the same integer timestep draws as a DDPM scheduler (``0 <= index < num_train_timesteps``,
    so DPO's keyed per-pair draws stay as they are) and maps them to a sigma of the pipeline's own flow
    schedule (with its static shift). ``timestep_sampling`` (the scripts' ``--weighting_scheme``):
    ``uniform`` takes the index as drawn; ``logit_normal`` (``logit_mean``, ``logit_std``) and ``mode``
    (``mode_scale``) map ``v = (index + 0.5) / N`` to the u that diffusers' sampler draws from that uniform
    (:func:`~diffalign.flow_matching.u_of_uniform`), then index ``int(u N)`` as the scripts do.
    ``loss_weighting`` weights each sample's loss by ``w(σ)`` (``none``, ``sigma_sqrt``, ``cosmap``).
    ``dynamic_shift`` (schedulers with ``use_dynamic_shifting``, FLUX): shift the drawn sigma by ``mu`` of
    the latents' packed token count, as ``FluxPipeline`` shifts its sampling sigmas (diffusers' FLUX script
    trains on the unshifted table: the default).
    """

    scheduler: object  # FlowMatchEulerDiscreteScheduler with the pipeline's shift, full training table
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: str = "none"
    dynamic_shift: bool = False

    @classmethod
    def from_pipeline_config(cls, config: dict, timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                             logit_std: float = 1.0, **flow_settings) -> FlowMatchingNoise:
        """The other settings (:data:`FLOW_DEFAULTS`) by keyword: ``mode_scale``, ``loss_weighting``,
        ``dynamic_shift``."""
        settings = FLOW_DEFAULTS | flow_settings | {"timestep_sampling": timestep_sampling,
                                                    "logit_mean": logit_mean, "logit_std": logit_std}
        if settings["timestep_sampling"] not in TIMESTEP_DENSITIES:
            raise ValueError(f"train.flow_timestep_sampling={settings['timestep_sampling']!r}: expected one "
                             f"of {', '.join(TIMESTEP_DENSITIES)}")
        if settings["loss_weighting"] not in LOSS_WEIGHTINGS:
            raise ValueError(f"train.flow_loss_weighting={settings['loss_weighting']!r}: expected one of "
                             f"{', '.join(LOSS_WEIGHTINGS)}")
        scheduler = FlowSDEStep.make_scheduler(dict(config))
        if settings["dynamic_shift"] and not scheduler.config.use_dynamic_shifting:
            raise ValueError("train.flow_dynamic_shift=true: this model's scheduler has a static shift "
                             f"({scheduler.config.shift}, already in its sigmas); set it false")
        return cls(scheduler, **settings)

    @property
    def config(self):
        return self.scheduler.config

    def sigmas_and_timesteps(
        self, index: torch.Tensor, latent_shape: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row sigma [N] and the denoiser's timestep [N] (``sigma * num_train_timesteps``) for draws
        ``index``; ``latent_shape`` ([N, C, h, w]) gives the token count of a dynamic shift."""
        n = self.config.num_train_timesteps
        index = index.long().cpu()
        if self.timestep_sampling != "uniform":
            u = u_of_uniform(self.timestep_sampling, (index.double() + 0.5) / n, logit_mean=self.logit_mean,
                             logit_std=self.logit_std, mode_scale=self.mode_scale)
            index = (u * n).long().clamp(0, n - 1)
        if not self.dynamic_shift:
            return self.scheduler.sigmas[index].float(), self.scheduler.timesteps[index].float()
        if latent_shape is None or len(latent_shape) != 4:
            raise ValueError(f"a dynamic shift needs image latents [N, C, h, w], got shape {latent_shape}")
        mu = flux_mu(packed_seq_len(*latent_shape[-2:]), self.config)
        sigmas = self.scheduler.time_shift(mu, 1.0, self.scheduler.sigmas[index].double()).float()
        return sigmas, sigmas * n

    def corrupt(self, latents, noise, timesteps):
        sigmas, model_t = self.sigmas_and_timesteps(timesteps, tuple(latents.shape))
        sigmas = sigmas.to(latents.device, latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1 - sigmas) * latents + sigmas * noise
        return noisy, model_t.to(latents.device), noise.float() - latents.float()

    def loss_weights(self, timesteps, latents) -> torch.Tensor | None:
        """Per-row loss weights ``w(σ)`` [N] in fp32 (None when unweighted)."""
        if self.loss_weighting == "none":
            return None
        sigmas, _ = self.sigmas_and_timesteps(timesteps, tuple(latents.shape))
        return loss_weights(self.loss_weighting, sigmas).to(latents.device)


def denoising_losses(denoiser, family, noise_process, latents, noise, timesteps, cond) -> torch.Tensor:
    """Per-sample ``mean over (C, [F,] H, W) of (pred - target)^2`` [N] in fp32, times the noise process's
    loss weights when it has any.

    ``noise_process`` is the family's :class:`DDPMNoise` or :class:`FlowMatchingNoise`.
    """
    noisy, model_t, target = noise_process.corrupt(latents, noise, timesteps)
    pred = family.call(denoiser, noisy, model_t, cond)
    losses = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    weights = noise_process.loss_weights(timesteps, latents)
    return losses if weights is None else losses * weights


def keyed_generator(key: str) -> torch.Generator:
    """A CPU generator seeded from a hash of ``key``."""
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def pair_noise(indices: torch.Tensor, key: str, shape: tuple[int, ...], num_train_timesteps: int):
    """Noise [N, *shape] (fp32) and timesteps [N] drawn from ``(key, dataset index)`` for each pair.

    Keyed draws make a pair's noise independent of the batch it lands in: one process with batch 2b and
    two with batch b draw the same, and a resumed run draws what an uninterrupted one would.
    """
    noise, timesteps = [], []
    for index in indices.tolist():
        generator = keyed_generator(f"{key}/{index}")
        timesteps.append(int(torch.randint(0, num_train_timesteps, (1,), generator=generator)))
        noise.append(torch.randn(shape, generator=generator))
    return torch.stack(noise), torch.tensor(timesteps, dtype=torch.long)
