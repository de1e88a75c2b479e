"""The denoising-trajectory sampler shared by every method, scorer and evaluation.

``sample`` runs a *stock* diffusers pipeline. It swaps in a scheduler that draws ``x_{t-1}`` with a step
rule from :mod:`diffalign.steps` and records ``(x_t, t, x_{t-1}, log p)``, and it captures the
conditioning tensors the denoiser saw through ``callback_on_step_end``. The result is a
:class:`Trajectory`: everything needed to recompute any step later, under any denoiser of the same
family, with :func:`recompute_log_probs`.

What differs between pipeline families (which callback tensors hold the conditioning, how the
denoiser is called, the step rule) is one :class:`~diffalign.families.Family` entry.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffalign.families import FAMILIES, Family, family_of
from diffalign.files import save_safetensors
from diffalign.steps import LOG_PROB_REDUCTION, make_step_rule


# ----------------------------------------------------------------------------------------------------
# The trajectory record
# ----------------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """B sampled denoising trajectories of T steps.

    latents      [B, T+1, *latent_shape]  x_T ... x_0 as the pipeline held them
    log_probs    [B, T] fp32              log p(x_{t-1} | x_t) of the step rule (mean over elements)
    timesteps    [T]                      the timestep of each step (long for DDPM-family, float for flows)
    stochastic   [T] bool                 steps with noise (only these have a density)
    cond/uncond  name -> [B, ...]         denoiser conditioning (uncond empty without CFG)
    latent_steps [L] long or None         after :meth:`keep_steps`, which of the T+1 latents ``latents`` holds
    extra["set_timesteps"]                the pipeline's own ``scheduler.set_timesteps`` arguments (FLUX: its
                                          sigmas and dynamic-shift ``mu``), replayed by :meth:`make_scheduler`
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    stochastic: torch.Tensor
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    prompts: list[str]
    family: str
    step_rule: dict  # {"kind": "ddim", "eta": 1.0}
    scheduler_config: dict
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    model: str = ""
    extra: dict = field(default_factory=dict)
    latent_steps: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def do_cfg(self) -> bool:
        return bool(self.uncond)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def latent_positions(self, indices: torch.Tensor) -> torch.Tensor:
        """Where latents ``x`` at trajectory positions ``indices`` (0 = x_T) sit in ``self.latents``."""
        if self.latent_steps is None:
            return indices
        lookup = torch.full((self.num_steps + 1,), -1, dtype=torch.long)
        lookup[self.latent_steps] = torch.arange(len(self.latent_steps))
        positions = lookup[indices]
        if (positions < 0).any():
            missing = sorted(set(indices[positions < 0].tolist()))
            raise ValueError(
                f"this trajectory no longer stores the latents of positions {missing} (see keep_steps)"
            )
        return positions

    def keep_steps(self, steps: Sequence[int] | torch.Tensor, dtype: torch.dtype | None = None) -> Trajectory:
        """A smaller record that can recompute only ``steps``: it keeps ``x_t`` and ``x_{t-1}`` of those steps
        (and every log-prob), with latents and conditioning optionally stored in ``dtype`` (e.g. bfloat16).

        With a lower-precision ``dtype`` the stored latents are rounded, so recomputed log-probs differ from
        ``log_probs`` (computed on the unrounded values): about 1e-3 at mid steps but up to ~0.4 at the last,
        low-noise steps on tiny SDXL, where bf16 rounding is large against the step's std. Recompute the old
        policy's log-probs from the compact record when exact ratios matter.
        """
        steps = torch.as_tensor(steps, dtype=torch.long)
        if len(steps) == 0 or steps.min() < 0 or steps.max() >= self.num_steps:
            raise ValueError(
                f"steps must be a non-empty subset of 0..{self.num_steps - 1}, got {steps.tolist()}"
            )
        needed = torch.unique(torch.cat([steps, steps + 1]))
        cast = (lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v)  # noqa: E731
        return replace(
            self,
            latents=cast(self.latents[:, self.latent_positions(needed)]),
            latent_steps=needed,
            cond={k: cast(v) for k, v in self.cond.items()},
            uncond={k: cast(v) for k, v in self.uncond.items()},
        )

    def nbytes(self) -> int:
        """Bytes held by the record's tensors (latents, log-probs, conditioning)."""
        tensors = [self.latents, self.log_probs, *self.cond.values(), *self.uncond.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def select(self, index: Sequence[int] | torch.Tensor) -> Trajectory:
        """The sub-record of the samples at ``index``."""
        index = torch.as_tensor(index, dtype=torch.long)
        pick = lambda d: {k: v[index] for k, v in d.items()}  # noqa: E731
        return replace(self, latents=self.latents[index], log_probs=self.log_probs[index],
                       cond=pick(self.cond), uncond=pick(self.uncond),
                       prompts=[self.prompts[i] for i in index.tolist()])

    @classmethod
    def cat(cls, parts: Sequence[Trajectory]) -> Trajectory:
        """Join records of the same sampling settings along the sample axis."""
        first = parts[0]
        for other in parts[1:]:
            same_kept = (other.latent_steps is None) == (first.latent_steps is None) and (
                first.latent_steps is None or torch.equal(other.latent_steps, first.latent_steps))
            if (
                not torch.equal(other.timesteps, first.timesteps)
                or other.step_rule != first.step_rule
                or not same_kept
            ):
                raise ValueError("can only join trajectories sampled with the same steps and step rule")
        join = lambda name: {k: torch.cat([getattr(p, name)[k] for p in parts]) for k in getattr(first, name)}  # noqa: E731
        return replace(
            first,
            latents=torch.cat([p.latents for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]),
            cond=join("cond"),
            uncond=join("uncond"),
            prompts=[q for p in parts for q in p.prompts],
        )

    def make_step_rule(self):
        settings = {k: v for k, v in self.step_rule.items() if k != "kind"}
        return make_step_rule(self.step_rule["kind"], **settings)

    def make_scheduler(self):
        """A fresh scheduler set to this trajectory's steps, for recomputation."""
        scheduler = self.make_step_rule().make_scheduler(self.scheduler_config)
        # the pipeline's own set_timesteps arguments when recorded (FLUX: its sigmas and dynamic-shift mu)
        settings = self.extra.get("set_timesteps")
        if settings:
            scheduler.set_timesteps(**settings)
        else:
            scheduler.set_timesteps(self.num_steps)
        return scheduler

    def metadata(self) -> dict[str, str]:
        return {
            "format": "diffalign.trajectory/1",
            "model": self.model,
            "family": self.family,
            "scheduler_class": self.scheduler_config.get("_class_name", ""),
            "scheduler_config": json.dumps(self.scheduler_config),
            "step_rule": json.dumps(self.step_rule),
            "eta": str(self.step_rule.get("eta", "")),
            "guidance_scale": repr(self.guidance_scale),
            "guidance_rescale": repr(self.guidance_rescale),
            "log_prob_reduction": LOG_PROB_REDUCTION,
            "prompts": json.dumps(self.prompts),
            "extra": json.dumps(self.extra),
        }

    def save(self, path) -> None:
        tensors = {"latents": self.latents, "log_probs": self.log_probs, "timesteps": self.timesteps,
                   "stochastic": self.stochastic.to(torch.uint8)}
        if self.latent_steps is not None:
            tensors["latent_steps"] = self.latent_steps
        tensors |= {f"cond.{k}": v for k, v in self.cond.items()}
        tensors |= {f"uncond.{k}": v for k, v in self.uncond.items()}
        save_safetensors(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata=self.metadata()
        )

    @classmethod
    def load(cls, path) -> Trajectory:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "diffalign.trajectory/1":
            raise ValueError(
                f"{path} is not a diffalign trajectory file (metadata 'format' is {meta.get('format')!r})"
            )
        t = load_file(str(path))
        return cls(
            latents=t["latents"],
            log_probs=t["log_probs"],
            timesteps=t["timesteps"],
            stochastic=t["stochastic"].bool(),
            cond={k[5:]: v for k, v in t.items() if k.startswith("cond.")},
            uncond={k[7:]: v for k, v in t.items() if k.startswith("uncond.")},
            prompts=json.loads(meta["prompts"]),
            family=meta["family"],
            step_rule=json.loads(meta["step_rule"]),
            scheduler_config=json.loads(meta["scheduler_config"]),
            guidance_scale=float(meta["guidance_scale"]),
            guidance_rescale=float(meta["guidance_rescale"]),
            model=meta["model"],
            extra=json.loads(meta["extra"]),
            latent_steps=t.get("latent_steps"),
        )


@dataclass
class SampleOutput:
    images: torch.Tensor | None  # [B, 3, H, W] (videos: [B, F, 3, H, W]) float in [0, 1]; None if not decoded
    trajectory: Trajectory | None  # None only from sample_many without trajectories


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------
class _RecordingMixin:
    """Makes a diffusers scheduler draw each step with ``step_rule`` and record it."""

    step_rule = None
    records: list

    generator = None
    step_generator = None  # the steps' own noise generators, when they are not the initial noise's

    def step(self, model_output, timestep, sample, *args, generator=None, return_dict=True, **kwargs):
        if self.step_generator is not None:
            generator = self.step_generator
        generator = generator if generator is not None else self.generator
        result = self.step_rule(self, model_output, timestep, sample, generator=generator)
        self.records.append((sample, result.prev_sample, result.log_prob, bool(result.stochastic[0])))
        return (result.prev_sample,) if not return_dict else _StepOutput(result.prev_sample)


@dataclass
class _StepOutput:
    prev_sample: torch.Tensor


def _plain(value):
    """A set_timesteps argument as JSON can hold it (arrays and tensors as lists of Python numbers)."""
    return value.tolist() if hasattr(value, "tolist") else value


def _recording_set_timesteps(base_set_timesteps):
    """``set_timesteps`` that also keeps its arguments (but the device), so a trajectory can replay them.
    It keeps the base signature: pipelines inspect it for ``sigmas`` / ``timesteps`` support."""

    @functools.wraps(base_set_timesteps)
    def set_timesteps(self, *args, **kwargs):
        bound = inspect.signature(base_set_timesteps).bind(self, *args, **kwargs)
        self.timestep_settings = {k: _plain(v) for k, v in bound.arguments.items()
                                  if k not in ("self", "device") and v is not None}
        return base_set_timesteps(self, *args, **kwargs)

    return set_timesteps


def step_rule_record(step_rule) -> dict:
    """What a trajectory records of its rule (``make_step_rule(**record)`` rebuilds it); a rule without a
    window (``noisy_steps`` None, stochastic at every step) records no ``noisy_steps``, as before windows."""
    settings = {k: v for k, v in vars(step_rule).items() if not (k == "noisy_steps" and v is None)}
    return {"kind": step_rule.kind, **settings}


def recording_scheduler(step_rule, config: dict):
    base = step_rule.make_scheduler(config)
    cls = type(f"Recording{type(base).__name__}", (_RecordingMixin, type(base)),
               {"set_timesteps": _recording_set_timesteps(type(base).set_timesteps)})
    scheduler = cls.from_config(base.config)
    scheduler.step_rule, scheduler.records = step_rule, []
    return scheduler


@torch.no_grad()
def sample(
    pipe,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] | None = None,
    step_seeds: Sequence[int] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    guidance_rescale: float = 0.0,
    eta: float = 1.0,
    step_rule=None,
    negative_prompt: str | Sequence[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    latents: torch.Tensor | None = None,
    decode: bool = True,
    model_name: str = "",
    **pipeline_kwargs,
) -> SampleOutput:
    """Sample one trajectory per prompt with ``pipe`` (a stock diffusers pipeline).

    Per-sample ``seeds`` (one per prompt) make each sample reproducible whatever the batch; with
    ``step_seeds`` too, ``seeds`` draw only the initial noise and ``step_seeds`` the steps' noise (samples
    sharing a seed then start from the same noise and still differ: DanceGRPO's shared group noise).
    ``eta`` is the noise of the family's step rule (DDIM's eta; the flow-matching SDE's noise level);
    ``step_rule`` replaces the rule altogether. Extra keyword arguments go to the pipeline (e.g.
    ``num_frames``).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    family = family_of(pipe)
    step_rule = step_rule or family.make_step_rule(eta)
    if seeds is not None:
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        generator = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    if guidance_rescale > 0:
        if "guidance_rescale" not in inspect.signature(pipe.__call__).parameters:
            raise ValueError(f"{type(pipe).__name__} does not support guidance_rescale")
        pipeline_kwargs["guidance_rescale"] = guidance_rescale
    # unset sizes are left out, so the pipeline's own defaults apply (Wan's __call__ cannot take None)
    pipeline_kwargs |= {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    original = pipe.scheduler
    recorder = recording_scheduler(step_rule, dict(original.config))
    recorder.generator = generator  # for pipelines that do not pass their generator to scheduler.step
    if step_seeds is not None:
        if len(step_seeds) != len(prompts):
            raise ValueError(f"got {len(step_seeds)} step seeds for {len(prompts)} prompts")
        recorder.step_generator = [torch.Generator(device="cpu").manual_seed(int(s)) for s in step_seeds]
    captured: dict[str, torch.Tensor] = {}

    def capture(_pipe, i, _t, callback_kwargs):
        latents_now = callback_kwargs.pop("latents")
        if i == 0:
            captured.update({k: v.detach() for k, v in callback_kwargs.items() if v is not None})
            captured["do_cfg"] = bool(getattr(_pipe, "do_classifier_free_guidance", False))  # FLUX: none
        vae = getattr(_pipe, "vae", None)
        if decode and vae is not None and i == getattr(_pipe, "_num_timesteps", num_steps) - 1:
            # mixed precision: bf16 text embeddings make bf16 latents, which the pipelines hand their fp32
            # VAE as they are (only on MPS do they cast); the VAE decodes in its own dtype
            latents_now = latents_now.to(vae.dtype)
        return {**callback_kwargs, "latents": latents_now}

    # the request as the pipeline will resolve it (its own sizes where unset), for the family's checks:
    # one clear line before sampling
    request = {**family.default_size(pipe), **pipeline_kwargs, "guidance_scale": guidance_scale,
               "negative_prompt": negative_prompt}
    problem = family.check_sampling(pipe, request)
    if problem is not None:
        raise ValueError(problem)
    prompt_inputs, conditioning = {"prompt": prompts}, {}
    if family.prepare_sampling is not None:  # conditioning the callback lacks: encoded once, handed over
        prompt_inputs, conditioning = family.prepare_sampling(pipe, prompts, request)

    pipe.scheduler = recorder
    try:
        out = pipe(
            **{"negative_prompt": negative_prompt, **prompt_inputs},  # pre-encoded inputs replace it
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            latents=latents,
            output_type="pt" if decode else "latent",
            callback_on_step_end=capture,
            callback_on_step_end_tensor_inputs=["latents", *family.callback_inputs],
            **pipeline_kwargs,
        )
    finally:
        pipe.scheduler = original

    records = recorder.records
    captured.update(conditioning)
    cond, uncond = family.capture(captured, len(prompts), captured["do_cfg"])
    trajectory = Trajectory(
        latents=torch.stack([records[0][0]] + [r[1] for r in records], dim=1),
        log_probs=torch.stack([r[2] for r in records], dim=1),
        timesteps=torch.stack([torch.as_tensor(t) for t in recorder.timesteps[: len(records)]]).cpu(),
        stochastic=torch.tensor([r[3] for r in records]),
        cond=cond,
        uncond=uncond,
        prompts=prompts,
        family=family.name,
        step_rule=step_rule_record(step_rule),
        scheduler_config=dict(original.config),
        guidance_scale=float(guidance_scale),
        guidance_rescale=float(guidance_rescale),
        model=model_name or getattr(pipe, "name_or_path", "") or "",
        extra={"set_timesteps": getattr(recorder, "timestep_settings", {})},
    )
    # images [B, 3, H, W] (pipeline output .images) or videos [B, F, 3, H, W] (.frames)
    media = out[0].float().clamp(0, 1) if decode else None
    return SampleOutput(images=media, trajectory=trajectory)


# ----------------------------------------------------------------------------------------------------
# Recomputation
# ----------------------------------------------------------------------------------------------------
def predict(denoiser, family: Family, x, t, cond, uncond, guidance_scale: float, guidance_rescale: float):
    """The guided model output for latents ``x`` [N, ...] at per-row timesteps ``t`` [N]."""
    if not uncond:
        return family.call(denoiser, x, t, cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    out_uncond, out_cond = family.call(denoiser, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    guided = out_uncond + guidance_scale * (out_cond - out_uncond)
    if guidance_rescale > 0:
        from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

        guided = rescale_noise_cfg(guided, out_cond, guidance_rescale=guidance_rescale)
    return guided


def _tile(tensors: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Each [B, ...] tensor repeated k times along dim 0 (step-major, matching the stacked latents)."""
    return {n: v.repeat(k, *([1] * (v.ndim - 1))) for n, v in tensors.items()}


class RecomputedSteps(NamedTuple):
    log_prob: torch.Tensor  # [B, k] fp32, with gradients
    mean: torch.Tensor | None  # [B, k, *latent_shape] fp32: the steps' means (``with_mean``)
    std: torch.Tensor | None  # [B, k] fp32: the steps' std (``with_mean``)


def recompute_steps(
    denoiser,
    trajectory: Trajectory,
    steps: Sequence[int] | torch.Tensor | None = None,
    *,
    chunk_size: int = 1,
    scheduler=None,
    with_mean: bool = False,
) -> RecomputedSteps:
    """The stored steps under ``denoiser``: their log-probs and, ``with_mean``, their means and std.

    ``steps`` [k] are the same steps of every sample, or [B, k] each sample's own steps (its row of
    indices). ``chunk_size`` columns go through one batched forward pass; the result equals one step at a
    time (up to the float rounding of a larger batch). Non-stochastic steps have log-prob 0.
    """
    family = FAMILIES[trajectory.family]
    b = len(trajectory)
    steps = torch.arange(trajectory.num_steps) if steps is None else torch.as_tensor(steps, dtype=torch.long)
    if steps.ndim == 1:
        steps = steps.expand(b, -1)
    if steps.shape[0] != b:
        raise ValueError(f"per-sample steps have {steps.shape[0]} rows for {b} samples")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scheduler = scheduler or trajectory.make_scheduler()
    rule = trajectory.make_step_rule()
    param = next(denoiser.parameters())
    device, dtype = param.device, param.dtype
    to = lambda d: {  # noqa: E731
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in d.items()
    }
    cond, uncond = to(trajectory.cond), to(trajectory.uncond)
    rows = torch.arange(b)[:, None]
    shape = trajectory.latents.shape[2:]
    log_probs, means, stds = [], [], []
    for chunk in steps.split(chunk_size, dim=1):
        k = chunk.shape[1]
        # [B, k, ...] -> step-major [k * B, ...], matching the tiled conditioning
        x_t, x_prev = (trajectory.latents[rows, trajectory.latent_positions(c)].transpose(0, 1)
                       .reshape(k * b, *shape) for c in (chunk, chunk + 1))
        t = trajectory.timesteps[chunk.T.reshape(-1)].to(device)
        model_output = predict(denoiser, family, x_t.to(device, dtype), t, _tile(cond, k), _tile(uncond, k),
                               trajectory.guidance_scale, trajectory.guidance_rescale)
        result = rule(scheduler, model_output, t, x_t.to(device, dtype), prev_sample=x_prev.to(device, dtype))
        log_probs.append(result.log_prob.view(k, b).transpose(0, 1))
        if with_mean:
            means.append(result.mean.view(k, b, *shape).transpose(0, 1))
            stds.append(result.std.view(k, b).transpose(0, 1))
    return RecomputedSteps(torch.cat(log_probs, dim=1), torch.cat(means, dim=1) if with_mean else None,
                           torch.cat(stds, dim=1) if with_mean else None)


def recompute_log_probs(
    denoiser,
    trajectory: Trajectory,
    steps: Sequence[int] | torch.Tensor | None = None,
    *,
    chunk_size: int = 1,
    scheduler=None,
) -> torch.Tensor:
    """``log p(x_{t-1} | x_t)`` of the stored steps under ``denoiser``: [B, len(steps)], with gradients.

    ``denoiser`` is any model of the trajectory's family (the sampling UNet, a LoRA-adapted one, another
    checkpoint). ``chunk_size`` steps go through one batched forward pass; the result equals one step at a
    time. Non-stochastic steps return 0. See :func:`recompute_steps` (per-sample steps, the steps' means).
    """
    return recompute_steps(denoiser, trajectory, steps, chunk_size=chunk_size, scheduler=scheduler).log_prob
