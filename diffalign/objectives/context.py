"""What an objective is handed by the trainer (:class:`TrainContext`), and how to reach the bare model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from diffalign.data import PairSource, Preprocessing
from diffalign.families import Family
from diffalign.methods.base import MethodSpec


def unwrap(model):
    """The bare module under DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@dataclass
class TrainContext:
    """What an objective may use. ``reference()`` yields the frozen reference denoiser.

    ``prep`` is the data preprocessing (resolution, flips, ``num_frames`` for video models); ``source``
    the opened pairs or winners (None for online methods).
    """

    cfg: object  # diffalign.config.Config
    spec: MethodSpec
    accelerator: object
    pipe: object
    family: Family
    unet: torch.nn.Module  # the trained UNet as prepared by accelerate (DDP-wrapped when multi-process)
    noise_scheduler: object  # the family's training noise (diffalign.denoising.DDPMNoise / FlowMatchingNoise)
    weight_dtype: torch.dtype
    ref_unet: torch.nn.Module | None = None  # frozen copy (full fine-tune) or None (LoRA / no reference)
    source: PairSource | None = None
    prep: Preprocessing | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @contextlib.contextmanager
    def reference(self):
        """The reference model: the same UNet with LoRA adapters disabled, or the frozen copy."""
        if self.ref_unet is not None:
            yield self.ref_unet
            return
        if self.cfg.model.finetune != "lora":
            raise RuntimeError("no reference model: full fine-tuning keeps a frozen copy only for methods "
                               "that need one")
        bare = unwrap(self.unet)
        bare.disable_adapters()
        try:
            yield bare
        finally:
            bare.enable_adapters()
