"""Multi-process launches: what the trainer supports, checked before any model loads.

``accelerate launch`` starts one process per device and the trainer runs in each; accelerate wraps the
denoiser (DDP, DeepSpeed or FSDP) and shards the data. What each combination needs from the trainer:

* **DDP** (``--multi_gpu``, or a ``distributed_type: MULTI_GPU`` config): every method. On a machine
  without GPUs the same launch runs on the CPU with the gloo backend: the trainer asks accelerate for the
  CPU when ``train.device`` is ``cpu``, or unset and no accelerator is visible (accelerate alone would
  start independent single-process runs, each believing it is the main process).
* **DeepSpeed ZeRO-1/2**: DPO, MaPO, SePPO (LoRA or full fine-tune). The parameters stay whole on every
  device, so sampling and saving through the bare denoiser work. PRDP and DDPO are refused: they
  back-propagate one epoch in several pieces per optimizer step, and accelerate's DeepSpeed wrapper
  steps the optimizer at every ``backward`` (and ZeRO-2 has no ``no_sync``).
* **DeepSpeed ZeRO-3** and **FSDP**: refused. They shard the denoiser's parameters, while evaluation,
  SePPO's reference samples, the online methods' sampling and the LoRA/UNet outputs all call the bare
  denoiser, which would see its shards only.
"""

from __future__ import annotations

import os

import torch

ONLINE_KINDS = ("online", "nft")  # kinds that back-propagate one optimizer step in several pieces


def use_cpu(cfg) -> bool:
    """Whether to ask accelerate for the CPU: ``train.device=cpu``, or no device set and no accelerator."""

    if cfg.train.device == "cpu":
        return True
    return cfg.train.device is None and not torch.accelerator.is_available()


def check_launch(accelerator, cfg, spec) -> None:
    """Raise a clear error for a launch the trainer cannot run, before any model loads."""
    from accelerate.utils import DistributedType

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate set up "
            f"{accelerator.num_processes}: each would train alone and write the same files. On a machine "
            "without GPUs set train.device=cpu (or ACCELERATE_USE_CPU=1) for a CPU run with the gloo "
            "backend."
        )
    stage = (
        accelerator.state.deepspeed_plugin.zero_stage
        if accelerator.distributed_type == DistributedType.DEEPSPEED
        else None
    )
    check_distributed(accelerator.distributed_type, stage, spec)


def check_distributed(kind, zero_stage: int | None, spec) -> None:
    """Refuse a distributed type (and DeepSpeed ZeRO stage) the trainer cannot run ``spec`` under."""
    from accelerate.utils import DistributedType

    if kind == DistributedType.FSDP:
        raise NotImplementedError(
            "FSDP is not supported by the diffalign trainer: it shards the denoiser, while evaluation, "
            "SePPO's reference samples, PRDP/DDPO sampling and the saved LoRA/UNet use the bare denoiser. "
            "Use DDP (configs/accelerate/multi_gpu.yaml) or DeepSpeed ZeRO-2 "
            "(configs/accelerate/deepspeed_zero2.yaml)."
        )
    if kind == DistributedType.DEEPSPEED:
        if zero_stage == 3:
            raise NotImplementedError(
                "DeepSpeed ZeRO-3 is not supported by the diffalign trainer: it partitions the denoiser's "
                "parameters, which sampling, evaluation and saving read whole. Use ZeRO-2 "
                "(configs/accelerate/deepspeed_zero2.yaml) or DDP.")
        if spec.kind in ONLINE_KINDS:
            raise NotImplementedError(
                f"{spec.name} with DeepSpeed is not supported: it back-propagates each optimizer step in "
                "several pieces, and accelerate's DeepSpeed engine steps the optimizer at every backward. "
                "Use DDP (configs/accelerate/multi_gpu.yaml)."
            )


def configure_deepspeed(accelerator, cfg) -> None:
    """DeepSpeed needs the per-device batch size; accelerate infers it from prepared dataloaders, but the
    trainer prepares the model before its data."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
