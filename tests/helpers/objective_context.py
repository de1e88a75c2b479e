"""A trainer context for an objective on a built-in tiny model, without the trainer (for objective tests)."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from diffalign.families import family_of
from diffalign.methods import METHODS
from diffalign.models import load_pipeline
from diffalign.objectives import OBJECTIVES, TrainContext
from diffalign.train import lora_config


def objective_on_tiny_model(cfg, dtype: torch.dtype = torch.float32):
    """``(ctx, objective)`` for ``cfg`` (its model, LoRA and method) on the CPU. LoRA B is drawn non-zero so
    the adapters change the output and every LoRA tensor carries gradient."""
    pipe = load_pipeline(cfg.model.name)
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    denoiser = getattr(pipe, family.denoiser_attr)
    denoiser.requires_grad_(False)
    denoiser.add_adapter(lora_config(denoiser, cfg.lora))
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    pipe.to(dtype=dtype)
    spec = METHODS[cfg.method.name]
    noise = family.make_training_noise(pipe.scheduler.config)  # the trainer's (default flow settings)
    ctx = TrainContext(cfg, spec, Accelerator(cpu=True), pipe, family, denoiser, noise, dtype)
    return ctx, OBJECTIVES[spec.kind](ctx)
