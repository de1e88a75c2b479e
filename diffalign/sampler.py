"""The denoising-trajectory sampler shared by every method, scorer and evaluation.

``sample`` runs a *stock* diffusers pipeline. It swaps in a scheduler that draws ``x_{t-1}`` with a step
rule from :mod:`diffalign.steps` and records ``(x_t, t, x_{t-1}, log p)``, and it captures the
conditioning tensors the denoiser saw through ``callback_on_step_end``. The result is a
:class:`Trajectory`: everything needed to recompute any step later, under any denoiser of the same
family, with :func:`recompute_log_probs`.

Pipeline families differ only in which callback tensors hold the conditioning and how the denoiser is
called; each is one small :class:`Family` entry (video families add theirs the same way).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from safetensors.torch import load_file, save_file

from diffalign.steps import LOG_PROB_REDUCTION, DDIMStep, make_step_rule


# ----------------------------------------------------------------------------------------------------
# Pipeline families
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """How one pipeline family exposes its conditioning and calls its denoiser.

    ``captured`` maps pipeline callback tensor names to the names stored in the trajectory; under CFG
    those callback tensors are ``[negative; positive]`` along dim 0.
    """

    name: str
    pipeline_classes: tuple[str, ...]
    denoiser_attr: str
    captured: dict[str, str]
    call: Callable[..., torch.Tensor]


def _call_unet(unet, x, t, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    return unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                added_cond_kwargs=added or None, return_dict=False)[0]


FAMILIES: dict[str, Family] = {
    "sd": Family("sd", ("StableDiffusionPipeline",), "unet", {"prompt_embeds": "encoder_hidden_states"}, _call_unet),
    "sdxl": Family(
        "sdxl",
        ("StableDiffusionXLPipeline",),
        "unet",
        {"prompt_embeds": "encoder_hidden_states", "add_text_embeds": "text_embeds", "add_time_ids": "time_ids"},
        _call_unet,
    ),
}


def family_of(pipe) -> Family:
    for cls in type(pipe).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.pipeline_classes:
                return family
    known = ", ".join(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise NotImplementedError(f"the trajectory sampler does not support {type(pipe).__name__}; supported: {known}")


# ----------------------------------------------------------------------------------------------------
# The trajectory record
# ----------------------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """B sampled denoising trajectories of T steps.

    latents      [B, T+1, *latent_shape]  x_T ... x_0 as the pipeline held them
    log_probs    [B, T] fp32              log p(x_{t-1} | x_t) of the step rule (mean over elements)
    timesteps    [T] long                 the timestep of each step
    stochastic   [T] bool                 steps with noise (only these have a density)
    cond/uncond  name -> [B, ...]         denoiser conditioning (uncond empty without CFG)
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

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def do_cfg(self) -> bool:
        return bool(self.uncond)

    def __len__(self) -> int:
        return self.latents.shape[0]

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
            if not torch.equal(other.timesteps, first.timesteps) or other.step_rule != first.step_rule:
                raise ValueError("can only join trajectories sampled with the same steps and step rule")
        join = lambda name: {k: torch.cat([getattr(p, name)[k] for p in parts]) for k in getattr(first, name)}  # noqa: E731
        return replace(first, latents=torch.cat([p.latents for p in parts]),
                       log_probs=torch.cat([p.log_probs for p in parts]), cond=join("cond"), uncond=join("uncond"),
                       prompts=[q for p in parts for q in p.prompts])

    def make_step_rule(self):
        settings = {k: v for k, v in self.step_rule.items() if k != "kind"}
        return make_step_rule(self.step_rule["kind"], **settings)

    def make_scheduler(self):
        """A fresh scheduler set to this trajectory's steps, for recomputation."""
        scheduler = self.make_step_rule().make_scheduler(self.scheduler_config)
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
        tensors |= {f"cond.{k}": v for k, v in self.cond.items()}
        tensors |= {f"uncond.{k}": v for k, v in self.uncond.items()}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=self.metadata())

    @classmethod
    def load(cls, path) -> Trajectory:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "diffalign.trajectory/1":
            raise ValueError(f"{path} is not a diffalign trajectory file (metadata 'format' is {meta.get('format')!r})")
        t = load_file(str(path))
        return cls(
            latents=t["latents"], log_probs=t["log_probs"], timesteps=t["timesteps"],
            stochastic=t["stochastic"].bool(),
            cond={k[5:]: v for k, v in t.items() if k.startswith("cond.")},
            uncond={k[7:]: v for k, v in t.items() if k.startswith("uncond.")},
            prompts=json.loads(meta["prompts"]), family=meta["family"], step_rule=json.loads(meta["step_rule"]),
            scheduler_config=json.loads(meta["scheduler_config"]), guidance_scale=float(meta["guidance_scale"]),
            guidance_rescale=float(meta["guidance_rescale"]), model=meta["model"], extra=json.loads(meta["extra"]),
        )


@dataclass
class SampleOutput:
    images: torch.Tensor  # [B, 3, H, W] float in [0, 1]
    trajectory: Trajectory

    def pil_images(self):
        from diffalign.images import to_pil

        return to_pil(self.images)


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------
class _RecordingMixin:
    """Makes a diffusers scheduler draw each step with ``step_rule`` and record it."""

    step_rule = None
    records: list

    def step(self, model_output, timestep, sample, *args, generator=None, return_dict=True, **kwargs):
        result = self.step_rule(self, model_output, timestep, sample, generator=generator)
        self.records.append((sample, result.prev_sample, result.log_prob, bool(result.stochastic[0])))
        return (result.prev_sample,) if not return_dict else _StepOutput(result.prev_sample)


@dataclass
class _StepOutput:
    prev_sample: torch.Tensor


def recording_scheduler(step_rule, config: dict):
    base = step_rule.make_scheduler(config)
    cls = type(f"Recording{type(base).__name__}", (_RecordingMixin, type(base)), {})
    scheduler = cls.from_config(base.config)
    scheduler.step_rule, scheduler.records = step_rule, []
    return scheduler


@torch.no_grad()
def sample(
    pipe,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] | None = None,
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

    Per-sample ``seeds`` (one per prompt) make each image reproducible whatever the batch; ``eta``
    sets the DDIM step's noise (``step_rule`` replaces the DDIM rule, e.g. for flow-matching models).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    step_rule = step_rule or DDIMStep(eta=eta)
    if seeds is not None:
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        generator = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    family = family_of(pipe)
    original = pipe.scheduler
    recorder = recording_scheduler(step_rule, dict(original.config))
    captured: dict[str, torch.Tensor] = {}
    wanted = [name for name in family.captured if name in pipe._callback_tensor_inputs]

    def capture(_pipe, i, _t, callback_kwargs):
        if i == 0:
            captured.update({k: callback_kwargs[k].detach() for k in wanted})
        return callback_kwargs

    pipe.scheduler = recorder
    try:
        out = pipe(
            prompt=prompts,
            negative_prompt=negative_prompt,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            generator=generator,
            latents=latents,
            height=height,
            width=width,
            output_type="pt" if decode else "latent",
            callback_on_step_end=capture,
            callback_on_step_end_tensor_inputs=wanted,
            **pipeline_kwargs,
        )
    finally:
        pipe.scheduler = original

    records = recorder.records
    b = len(prompts)
    do_cfg = guidance_scale > 1 and captured[wanted[0]].shape[0] == 2 * b
    cond, uncond = {}, {}
    for pipe_name, name in family.captured.items():
        if pipe_name in captured:
            value = captured[pipe_name]
            cond[name] = value[b:] if do_cfg else value
            if do_cfg:
                uncond[name] = value[:b]
    trajectory = Trajectory(
        latents=torch.stack([records[0][0]] + [r[1] for r in records], dim=1),
        log_probs=torch.stack([r[2] for r in records], dim=1),
        timesteps=torch.stack([torch.as_tensor(t) for t in recorder.timesteps[: len(records)]]).long().cpu(),
        stochastic=torch.tensor([r[3] for r in records]),
        cond=cond,
        uncond=uncond,
        prompts=prompts,
        family=family.name,
        step_rule={"kind": step_rule.kind, **{k: v for k, v in vars(step_rule).items()}},
        scheduler_config=dict(original.config),
        guidance_scale=float(guidance_scale),
        guidance_rescale=float(guidance_rescale),
        model=model_name or getattr(pipe, "name_or_path", "") or "",
    )
    images = out.images if decode else None
    return SampleOutput(images=images.float().clamp(0, 1) if images is not None else None, trajectory=trajectory)


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
    time. Non-stochastic steps return 0.
    """
    family = FAMILIES[trajectory.family]
    steps = torch.arange(trajectory.num_steps) if steps is None else torch.as_tensor(steps, dtype=torch.long)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scheduler = scheduler or trajectory.make_scheduler()
    rule = trajectory.make_step_rule()
    param = next(denoiser.parameters())
    device, dtype = param.device, param.dtype
    b = len(trajectory)
    to = lambda d: {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in d.items()}  # noqa: E731
    cond, uncond = to(trajectory.cond), to(trajectory.uncond)
    out = []
    for chunk in steps.split(chunk_size):
        k = len(chunk)
        x_t = trajectory.latents[:, chunk].transpose(0, 1).reshape(k * b, *trajectory.latents.shape[2:])
        x_prev = trajectory.latents[:, chunk + 1].transpose(0, 1).reshape(k * b, *trajectory.latents.shape[2:])
        t = trajectory.timesteps[chunk].repeat_interleave(b).to(device)
        model_output = predict(denoiser, family, x_t.to(device, dtype), t, _tile(cond, k), _tile(uncond, k),
                               trajectory.guidance_scale, trajectory.guidance_rescale)
        result = rule(scheduler, model_output, t, x_t.to(device, dtype), prev_sample=x_prev.to(device, dtype))
        out.append(result.log_prob.view(k, b).transpose(0, 1))
    return torch.cat(out, dim=1)
