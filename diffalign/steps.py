"""Stochastic reverse-diffusion steps that also return the log-density of the step taken.

A step rule is the one place where the sampling math lives. The sampler uses it to draw ``x_{t-1}``
while a pipeline runs; the methods use the *same* function to recompute ``log p(x_{t-1} | x_t)`` under
another denoiser. Every rule takes per-row timesteps, so K timesteps can go through one batched call.

Log-probabilities follow the DDPO convention: a diagonal Gaussian log density, averaged over all
non-batch elements, computed in fp32 whatever the model's dtype (the flow rules can sum instead:
``reduction``). A step with zero noise has no density: ``stochastic`` is False and its log-prob is 0
(leave it out of losses).

Rules: ``ddim`` (SD, SDXL, AnimateDiff); for flow-matching models (Wan, SD3, FLUX) ``flow_sde``
(Flow-GRPO's SDE, or DanceGRPO's with ``noise_schedule="constant"``), ``flow_cps`` (Flow-GRPO+'s
coefficients-preserving step) and ``flow_euler`` (the deterministic ODE step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor

LOG_PROB_REDUCTION = "mean"
#: How a rule turns per-element log-densities into one per sample (DDPO, Flow-GRPO, DanceGRPO: mean).
LOG_PROB_REDUCTIONS = ("mean", "sum")


class StepResult(NamedTuple):
    prev_sample: torch.Tensor  # x_{t-1}, in the dtype of ``sample``
    log_prob: torch.Tensor  # [N] fp32, mean over non-batch elements
    mean: torch.Tensor  # [N, ...] fp32
    std: torch.Tensor  # [N] fp32
    stochastic: torch.Tensor  # [N] bool: std > 0


def _reduce(elementwise: torch.Tensor, reduction: str) -> torch.Tensor:
    flat = elementwise.flatten(1)
    return flat.mean(dim=1) if reduction == "mean" else flat.sum(dim=1)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      reduction: str = LOG_PROB_REDUCTION) -> tuple[torch.Tensor, torch.Tensor]:
    """log N(x; mean, std^2) in fp32, reduced (mean or sum) over non-batch elements; rows with std == 0 get 0
    and mask False."""
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    view = (-1,) + (1,) * (x.ndim - 1)
    s = safe_std.view(view)
    elementwise = -((x.float() - mean) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    log_prob = _reduce(elementwise, reduction)
    return torch.where(stochastic, log_prob, torch.zeros_like(log_prob)), stochastic


def _per_row(t: torch.Tensor | int, n: int, device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    return t.expand(n) if t.ndim == 0 else t


def step_index(scheduler, timestep, n: int, device) -> torch.Tensor:
    """Per-row index into ``scheduler.timesteps`` of ``timestep`` (one value, or one per row)."""
    t = _per_row(timestep, n, device).float()
    timesteps = scheduler.timesteps.to(device=device, dtype=torch.float32)
    match = timesteps[None, :] == t[:, None]
    if not match.any(dim=1).all():
        raise ValueError(f"timesteps {t.tolist()} are not among the scheduler's {timesteps.tolist()}")
    return match.int().argmax(dim=1)


def _check_window(rule) -> None:
    """``noisy_steps`` as a tuple ``(start, stop)`` (a checkpoint's JSON gives a list back)."""
    if rule.noisy_steps is None:
        return
    start, stop = (int(v) for v in rule.noisy_steps)
    if not 0 <= start < stop:
        raise ValueError(f"noisy_steps must be (start, stop) with 0 <= start < stop, got {rule.noisy_steps}")
    object.__setattr__(rule, "noisy_steps", (start, stop))


def _noisy_rows(rule, scheduler, timestep, n: int, device) -> torch.Tensor:
    """[n] bool: the rows whose step lies in the rule's ``noisy_steps`` window (every row without one)."""
    if rule.noisy_steps is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    index = step_index(scheduler, timestep, n, device)
    start, stop = rule.noisy_steps
    return (index >= start) & (index < stop)


@dataclass(frozen=True)
class DDIMStep:
    """Stochastic DDIM step (Song et al.); ``eta`` 0 = deterministic DDIM, 1 = DDPM ancestral sampling.

    Works on a ``diffusers.DDIMScheduler`` (its ``alphas_cumprod``, ``final_alpha_cumprod`` and
    ``num_inference_steps``) and matches ``DDIMScheduler.step`` exactly, noise draw included.
    """

    eta: float = 1.0
    #: ``(start, stop)``: only steps ``start .. stop - 1`` (indices into the scheduler's timesteps) take
    #: ``eta``; the others are deterministic DDIM steps (GRPO-Fast's window). None: every step.
    noisy_steps: tuple[int, int] | None = None
    kind = "ddim"

    def __post_init__(self):
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        _check_window(self)

    @staticmethod
    def make_scheduler(config: dict):
        from diffusers import DDIMScheduler

        # DDIMScheduler.from_config silently defaults clip_sample / set_alpha_to_one to True when the
        # source config (Euler, PNDM, ...) lacks them; SD and SDXL are trained with both False.
        overrides = {k: config.get(k, False) for k in ("clip_sample", "set_alpha_to_one")}
        return DDIMScheduler.from_config(config, **overrides)

    def __call__(
        self,
        scheduler,
        model_output: torch.Tensor,
        timestep: torch.Tensor | int,
        sample: torch.Tensor,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> StepResult:
        if scheduler.config.thresholding:
            raise NotImplementedError("dynamic thresholding is not supported by the log-prob DDIM step")
        n, device = sample.shape[0], sample.device
        t = _per_row(timestep, n, device).long()
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=device)
        alpha_t = alphas_cumprod[t]
        alpha_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final)
        view = (-1,) + (1,) * (sample.ndim - 1)
        a_t, a_prev = alpha_t.view(view), alpha_prev.view(view)

        x_t, out = sample.float(), model_output.float()
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            x0, eps = (x_t - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
        elif prediction_type == "v_prediction":
            x0, eps = a_t.sqrt() * x_t - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * x_t
        elif prediction_type == "sample":
            x0, eps = out, (x_t - a_t.sqrt() * out) / (1 - a_t).sqrt()
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        if scheduler.config.clip_sample:
            r = scheduler.config.clip_sample_range
            x0 = x0.clamp(-r, r)

        variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
        noisy = _noisy_rows(self, scheduler, t, n, device)
        std = torch.where(noisy, self.eta * variance.sqrt(), torch.zeros_like(variance))
        s = std.view(view)
        mean = a_prev.sqrt() * x0 + (1 - a_prev - s**2).sqrt() * eps
        if prev_sample is None:
            prev = mean
            if self.eta > 0 and bool(noisy.any()):  # outside a window no noise is drawn
                noise = randn_tensor(
                    model_output.shape, generator=generator, device=device, dtype=model_output.dtype
                )
                prev = mean + s * noise
            prev_sample = prev.to(sample.dtype)
        # The density of the sample as stored (after the cast), so recomputation sees the same value.
        log_prob, stochastic = gaussian_log_prob(prev_sample, mean, std)
        return StepResult(prev_sample, log_prob, mean, std, stochastic)


class _FlowStep:
    """What every flow-matching rule shares: the Euler flow scheduler and the sigma lookup per row."""

    @staticmethod
    def make_scheduler(config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        # Wan ships a UniPC config with ``flow_shift``; the Euler flow scheduler calls the same shift
        # ``shift``.
        shift = config.get("shift", config.get("flow_shift", 1.0))
        return FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift)

    step_index = staticmethod(step_index)

    def sigmas_at(
        self, scheduler, timestep, n: int, device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sigma, sigma_next, all sigmas)`` in fp32 for per-row ``timestep``."""
        index = self.step_index(scheduler, timestep, n, device)
        sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
        return sigmas[index], sigmas[index + 1], sigmas


def _draw(mean: torch.Tensor, std: torch.Tensor, noisy: bool, generator, dtype: torch.dtype) -> torch.Tensor:
    """``mean + std z`` (``std`` per row, fp32 noise), cast to the sample's dtype; just ``mean`` when not
    ``noisy``."""
    if not noisy:
        return mean.to(dtype)
    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return (mean + std.view((-1,) + (1,) * (mean.ndim - 1)) * noise).to(dtype)


def _check_reduction(reduction: str) -> None:
    if reduction not in LOG_PROB_REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(LOG_PROB_REDUCTIONS)}, got {reduction!r}")


@dataclass(frozen=True)
class FlowSDEStep(_FlowStep):
    """Euler-Maruyama step of the reverse SDE with a rectified flow's marginals, for flow-matching models
    (Wan, SD3, FLUX) predicting the velocity ``v``::

        dt = sigma_next - sigma  (< 0)
        mean = x (1 + std_t^2 / (2 sigma) dt) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
        x'   = mean + std_t sqrt(-dt) z

    ``noise_schedule="flow_grpo"`` is Flow-GRPO's rule: ``std_t = noise_level * sqrt(sigma / (1 - sigma))``,
    with sigma = 1 in the denominator replaced by the second sigma. ``"constant"`` is DanceGRPO's:
    ``std_t = noise_level`` (its ``mean = x + dt (v - eta^2/2 score)``, score
    ``-(x - (1 - sigma) x0) / sigma^2``, is the same expression). ``noise_level`` 0 is the deterministic Euler
    step of ``FlowMatchEulerDiscreteScheduler`` (bitwise in fp32; :class:`FlowEulerStep` also in lower
    precision). ``reduction`` turns the per-element Gaussian log-density into one number per sample (both
    papers: mean).
    """

    noise_level: float = 0.7
    noise_schedule: str = "flow_grpo"
    reduction: str = LOG_PROB_REDUCTION
    #: ``(start, stop)``: only those steps are stochastic, the others the Euler ODE step (Flow-GRPO-Fast's
    #: window, noise level 0 outside it). None: every step.
    noisy_steps: tuple[int, int] | None = None
    kind = "flow_sde"

    def __post_init__(self):
        if not self.noise_level >= 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")
        if self.noise_schedule not in ("flow_grpo", "constant"):
            raise ValueError(f"noise_schedule must be 'flow_grpo' or 'constant', got {self.noise_schedule!r}")
        _check_reduction(self.reduction)
        _check_window(self)

    def __call__(
        self, scheduler, model_output, timestep, sample, prev_sample=None, generator=None
    ) -> StepResult:
        n, device = sample.shape[0], sample.device
        sigma, sigma_next, sigmas = self.sigmas_at(scheduler, timestep, n, device)
        dt = sigma_next - sigma
        if self.noise_schedule == "flow_grpo":
            std_t = self.noise_level * (sigma / (1 - torch.where(sigma == 1, sigmas[1], sigma))).sqrt()
        else:
            std_t = torch.full_like(sigma, self.noise_level)
        noisy = _noisy_rows(self, scheduler, timestep, n, device)
        std_t = torch.where(noisy, std_t, torch.zeros_like(std_t))
        view = (-1,) + (1,) * (sample.ndim - 1)
        s, d, st = sigma.view(view), dt.view(view), std_t.view(view)
        x, v = sample.float(), model_output.float()
        mean = x * (1 + st**2 / (2 * s) * d) + v * (1 + st**2 * (1 - s) / (2 * s)) * d
        std = std_t * (-dt).sqrt()
        if prev_sample is None:
            draw = self.noise_level > 0 and bool(noisy.any())  # outside a window no noise is drawn
            prev_sample = _draw(mean, std, draw, generator, sample.dtype)
        log_prob, stochastic = gaussian_log_prob(prev_sample, mean, std, self.reduction)
        return StepResult(prev_sample, log_prob, mean, std, stochastic)


@dataclass(frozen=True)
class FlowCPSStep(_FlowStep):
    """Flow-GRPO+'s coefficients-preserving step (CPS): the next sample keeps the flow's marginal
    coefficients, ``x' = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) eps_hat + std z`` with
    ``x0_hat = x - sigma v``, ``eps_hat = x + (1 - sigma) v`` and
    ``std = sigma_next sin(noise_level pi / 2)``.

    The last step (``sigma_next`` = 0) has no noise and no density. ``density="gaussian"`` is the proper
    log-density; ``"squared_error"`` is Flow-GRPO+'s ``-(x' - mean)^2`` without the Gaussian's scale and
    constants (its ratios are not density ratios).
    """

    noise_level: float = 0.7
    density: str = "gaussian"
    reduction: str = LOG_PROB_REDUCTION
    noisy_steps: tuple[int, int] | None = None  # as FlowSDEStep's: noise only inside the window
    kind = "flow_cps"

    def __post_init__(self):
        if not 0 <= self.noise_level <= 1:
            raise ValueError(
                "noise_level must be in [0, 1] (std = sigma_next sin(noise_level pi/2)), got "
                f"{self.noise_level}"
            )
        if self.density not in ("gaussian", "squared_error"):
            raise ValueError(f"density must be 'gaussian' or 'squared_error', got {self.density!r}")
        _check_reduction(self.reduction)
        _check_window(self)

    def __call__(
        self, scheduler, model_output, timestep, sample, prev_sample=None, generator=None
    ) -> StepResult:
        n, device = sample.shape[0], sample.device
        sigma, sigma_next, _ = self.sigmas_at(scheduler, timestep, n, device)
        noisy = _noisy_rows(self, scheduler, timestep, n, device)
        std = sigma_next * math.sin(self.noise_level * math.pi / 2)
        std = torch.where(noisy, std, torch.zeros_like(std))
        view = (-1,) + (1,) * (sample.ndim - 1)
        s, s_next, st = sigma.view(view), sigma_next.view(view), std.view(view)
        x, v = sample.float(), model_output.float()
        mean = (1 - s_next) * (x - s * v) + (s_next**2 - st**2).sqrt() * (x + (1 - s) * v)
        if prev_sample is None:
            draw = self.noise_level > 0 and bool(noisy.any())  # outside a window no noise is drawn
            prev_sample = _draw(mean, std, draw, generator, sample.dtype)
        if self.density == "gaussian":
            log_prob, stochastic = gaussian_log_prob(prev_sample, mean, std, self.reduction)
        else:
            stochastic = std > 0
            log_prob = _reduce(-((prev_sample.float() - mean) ** 2), self.reduction)
            log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
        return StepResult(prev_sample, log_prob, mean, std, stochastic)


@dataclass(frozen=True)
class FlowEulerStep(_FlowStep):
    """The deterministic Euler step of the probability-flow ODE, ``x' = x + (sigma_next - sigma) v``, computed
    as ``FlowMatchEulerDiscreteScheduler.step`` computes it (sample upcast to fp32, the product in the model's
    dtype, the result cast to it), so it reproduces the stock sampler bitwise in any dtype. No density:
    every step is non-stochastic with log-prob 0."""

    kind = "flow_euler"

    def __call__(
        self, scheduler, model_output, timestep, sample, prev_sample=None, generator=None
    ) -> StepResult:
        n, device = sample.shape[0], sample.device
        index = self.step_index(scheduler, timestep, n, device)
        mean = torch.empty(sample.shape, dtype=torch.float32, device=device)
        # Row groups sharing a step, each with diffusers' own 0-dim ``dt`` (a bf16 model output times a 0-dim
        # fp32 tensor stays bf16; a per-row fp32 ``dt`` would promote it and round differently).
        for i in index.unique().tolist():
            rows = index == i
            dt = scheduler.sigmas[i + 1] - scheduler.sigmas[i]
            mean[rows] = sample[rows].to(torch.float32) + dt * model_output[rows]
        if prev_sample is None:
            prev_sample = mean.to(model_output.dtype)
        zeros = torch.zeros(n, device=device)
        return StepResult(prev_sample, zeros, mean, zeros, torch.zeros(n, dtype=torch.bool, device=device))


STEP_RULES = {"ddim": DDIMStep, "flow_sde": FlowSDEStep, "flow_cps": FlowCPSStep, "flow_euler": FlowEulerStep}


def make_step_rule(kind: str, **settings):
    if kind not in STEP_RULES:
        raise ValueError(f"unknown step rule {kind!r}; expected one of {', '.join(STEP_RULES)}")
    return STEP_RULES[kind](**settings)
