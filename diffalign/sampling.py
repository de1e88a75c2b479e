"""Sampling settings, one type for every caller, and the helper that samples many prompts in batches.

:class:`SamplingSettings` is what evaluation, the online methods, SePPO's reference samples, the
gallery, ``diffalign pairs`` and ``diffalign sample`` hand to :func:`sample_many` (which calls
:func:`diffalign.sampler.sample` batch by batch). A field left ``None`` takes the model's own default:
a built-in model's (``toy-sdxl`` samples at 20 steps, guidance 3; ``tiny-wan`` at 32x32, 5 frames), else
the pipeline's (its ``__call__`` defaults and its denoiser's ``sample_size``), else the caller's fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace

import torch

from diffalign.families import family_of
from diffalign.models import builtin_sampling_defaults
from diffalign.sampler import SampleOutput, Trajectory, sample

#: Used when neither the call nor the model says.
FALLBACK_NUM_STEPS = 50
FALLBACK_GUIDANCE = 5.0


@dataclass
class SamplingSettings:
    """How samples are drawn. ``None``: the model's default (see the module docstring)."""

    num_steps: int | None = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    eta: float = 1.0  # DDIM's eta (0 deterministic, 1 DDPM ancestral), or the flow SDE's noise level
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None  # video models only
    negative_prompt: str | None = None

    def problems(self) -> list[tuple[str, object, str]]:
        """``(field, value, what was expected)`` for every out-of-range field (nothing loads)."""
        out = []
        if self.num_steps is not None and self.num_steps < 1:
            out.append(("num_steps", self.num_steps, ">= 1"))
        if self.guidance_scale is not None and self.guidance_scale < 0:
            out.append(("guidance_scale", self.guidance_scale, ">= 0"))
        if not self.eta >= 0:
            out.append(("eta", self.eta, ">= 0"))
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                out.append((name, value, "a positive multiple of 8"))
        if self.num_frames is not None and self.num_frames < 1:
            out.append(("num_frames", self.num_frames, ">= 1 (or unset for the model's default)"))
        return out

    def check(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        for name, value, expected in self.problems():
            raise ValueError(f"{name} must be {expected}, got {value}")

    def with_defaults(self, defaults: dict) -> SamplingSettings:
        """These settings with every unset field that ``defaults`` names filled from it."""
        unset = {f.name: defaults[f.name] for f in fields(self)
                 if getattr(self, f.name) is None and f.name in defaults}
        return replace(self, **unset)

    def for_model_name(self, model_name: str, *, num_steps: int = FALLBACK_NUM_STEPS,
                       guidance_scale: float = FALLBACK_GUIDANCE) -> SamplingSettings:
        """Unset fields from built-in model ``model_name``'s own defaults, else ``num_steps`` /
        ``guidance_scale`` (nothing loads; sizes left unset take the pipeline's defaults when sampling)."""
        fallback = {"num_steps": num_steps, "guidance_scale": guidance_scale}
        return self.with_defaults(fallback | builtin_sampling_defaults(model_name))

    def for_model(self, pipe, model_name: str = "", *, num_steps: int = FALLBACK_NUM_STEPS,
                  guidance_scale: float = FALLBACK_GUIDANCE) -> SamplingSettings:
        """Every unset field filled: the built-in model's defaults, else the pipeline's own sizes (and frame
        count, for video models), else ``num_steps`` / ``guidance_scale``."""
        family = family_of(pipe)
        sizes = family.default_size(pipe)
        if not family.video:
            sizes.pop("num_frames", None)
        named = self.for_model_name(model_name, num_steps=num_steps, guidance_scale=guidance_scale)
        return named.with_defaults(sizes)

    def sample_kwargs(self) -> dict:
        """Keyword arguments for :func:`diffalign.sampler.sample`."""
        guidance = self.guidance_scale if self.guidance_scale is not None else FALLBACK_GUIDANCE
        kwargs = {"num_steps": self.num_steps if self.num_steps is not None else FALLBACK_NUM_STEPS,
                  "guidance_scale": guidance,
                  "guidance_rescale": self.guidance_rescale, "eta": self.eta, "height": self.height,
                  "width": self.width, "negative_prompt": self.negative_prompt}
        if self.num_frames is not None:
            kwargs["num_frames"] = self.num_frames
        return kwargs


def sampling_from_flags(args) -> SamplingSettings:
    """The settings the ``sample`` / ``gallery`` command-line flags ask for (``--steps``, ``--guidance``,
    ``--guidance-rescale``, ``--eta``, ``--height``, ``--width``, ``--num-frames``, ``--negative-prompt``)."""
    return SamplingSettings(num_steps=args.steps, guidance_scale=args.guidance,
                            guidance_rescale=args.guidance_rescale, eta=args.eta, height=args.height,
                            width=args.width, num_frames=args.num_frames,
                            negative_prompt=args.negative_prompt)


def settings_of(section) -> SamplingSettings:
    """The sampling settings a config section holds under the same field names (``eval``, an online
    method's section)."""
    return SamplingSettings(**{f.name: getattr(section, f.name) for f in fields(SamplingSettings)
                               if hasattr(section, f.name)})


def sample_batches(pipe, prompts: Sequence[str], seeds: Sequence[int], settings: SamplingSettings, *,
                   batch_size: int, decode: bool = True, model_name: str = "", step_rule=None,
                   step_seeds: Sequence[int] | None = None) -> Iterator[tuple[int, SampleOutput]]:
    """``(start, output)`` for each batch of ``batch_size`` prompts; prompt ``i`` is drawn with ``seeds[i]``
    (and ``step_seeds[i]``, see :func:`~diffalign.sampler.sample`), so a sample does not depend on the batch
    it lands in. ``step_rule``: the sampler's rule instead of the family's. Images and trajectories come back
    on the CPU."""
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    kwargs = settings.sample_kwargs()
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        out = sample(pipe, list(prompts[start:stop]), seeds=list(seeds[start:stop]), decode=decode,
                     model_name=model_name, step_rule=step_rule,
                     step_seeds=None if step_seeds is None else list(step_seeds[start:stop]), **kwargs)
        yield start, SampleOutput(None if out.images is None else out.images.cpu(), _on_cpu(out.trajectory))


def sample_many(pipe, prompts: Sequence[str], seeds: Sequence[int], settings: SamplingSettings, *,
                batch_size: int, decode: bool = True, trajectories: bool = False, model_name: str = "",
                on_batch: Callable[[int, SampleOutput], None] | None = None, step_rule=None,
                step_seeds: Sequence[int] | None = None) -> SampleOutput:
    """Every prompt sampled (see :func:`sample_batches`), the batches joined into one output. The joined
    trajectory is kept only when asked for (``trajectory`` is None otherwise: they are large).
    ``on_batch(start, batch)`` sees each batch as it comes (e.g. to score it while the next one samples)."""
    images, parts = [], []
    for start, out in sample_batches(pipe, prompts, seeds, settings, batch_size=batch_size, decode=decode,
                                     model_name=model_name, step_rule=step_rule, step_seeds=step_seeds):
        if on_batch is not None:
            on_batch(start, out)
        images.append(out.images)
        if trajectories:
            parts.append(out.trajectory)
    joined = Trajectory.cat(parts) if trajectories else None
    return SampleOutput(torch.cat(images) if decode else None, joined)


def _on_cpu(trajectory: Trajectory) -> Trajectory:
    cpu = lambda d: {k: v.cpu() for k, v in d.items()}  # noqa: E731
    return replace(trajectory, latents=trajectory.latents.cpu(), log_probs=trajectory.log_probs.cpu(),
                   cond=cpu(trajectory.cond), uncond=cpu(trajectory.uncond))
