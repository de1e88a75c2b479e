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
* **FSDP2** (``distributed_type: FSDP`` with ``fsdp_version: 2``; configs/accelerate/fsdp*.yaml): every
  method, LoRA or full fine-tune. accelerate shards the denoiser block by block (and the
  trainer shards a full fine-tune's frozen reference copy the same way); sampling and validation read it
  whole through :func:`diffalign.parallel.gathered`, checkpoints and the outputs gather its shards, and
  the online objective pads its micro-batches so every process runs as many forwards. On a machine
  without GPUs (the tests) accelerate sets FSDP up only for GPUs; :func:`enable_fsdp_on_cpu` applies
  the same plugin to the CPU processes (gloo). SePPO's pool keeps whole LoRA weights (or files of the
  whole denoiser) and shards an entry back in when it is the reference, the same one on every process
  (:mod:`diffalign.objectives.winners`). FSDP1 is refused (use ``fsdp_version: 2``), as are accelerate's
  ``fsdp_activation_checkpointing`` (its wrapper renames the parameters; diffusers' own
  ``model.gradient_checkpointing`` works on the shards) and parameter offload on CPU processes (it pins
  host memory: GPUs only).
* **DeepSpeed ZeRO-3**: refused: it partitions the denoiser's parameters, which sampling, evaluation and
  saving read whole, and has no counterpart of FSDP2's explicit gather here. Use FSDP2.
"""

from __future__ import annotations

import os

import torch
from torch.distributed.fsdp import CPUOffloadPolicy

from diffalign.parallel import is_sharded, unsharded_copy

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
    fsdp = getattr(accelerator.state, "fsdp_plugin", None)
    offload = isinstance(getattr(fsdp, "cpu_offload", None), CPUOffloadPolicy)
    check_distributed(accelerator.distributed_type, stage, spec,
                      fsdp_version=fsdp.fsdp_version if fsdp is not None else None,
                      fsdp_activation_checkpointing=bool(getattr(fsdp, "activation_checkpointing", False)),
                      fsdp_offload_on_cpu=offload and accelerator.device.type == "cpu")


def check_distributed(kind, zero_stage: int | None, spec, fsdp_version: int | None = 2,
                      fsdp_activation_checkpointing: bool = False, fsdp_offload_on_cpu: bool = False) -> None:
    """Refuse a distributed type (DeepSpeed ZeRO stage, FSDP version and options) the trainer cannot run
    ``spec`` under."""
    from accelerate.utils import DistributedType

    if kind == DistributedType.FSDP:
        if fsdp_version != 2:
            raise NotImplementedError(
                f"FSDP version {fsdp_version} is not supported by the diffalign trainer: set "
                "fsdp_config.fsdp_version: 2 (FSDP2, fully_shard) in the accelerate config, as "
                "configs/accelerate/fsdp.yaml does."
            )
        if fsdp_activation_checkpointing:
            # accelerate's wrapper puts each block under a _checkpoint_wrapped_module, renaming every
            # parameter that checkpoints, SePPO's pool, NFT's old policy and the outputs are keyed by
            raise NotImplementedError(
                "fsdp_activation_checkpointing (and its _offload) is not supported by the diffalign "
                "trainer: it renames the denoiser's parameters. Set it to false in the accelerate config "
                "and model.gradient_checkpointing=true in the diffalign config (diffusers' checkpointing of "
                "the same blocks, which works under FSDP2).")
        if fsdp_offload_on_cpu:
            raise NotImplementedError(
                "fsdp_offload_params needs GPUs: FSDP2 offloads the shards to pinned host memory, and CPU "
                "processes hold them in host memory already; set fsdp_offload_params: false for a CPU run")
        return
    if kind == DistributedType.DEEPSPEED:
        if zero_stage == 3:
            raise NotImplementedError(
                "DeepSpeed ZeRO-3 is not supported by the diffalign trainer: it partitions the denoiser's "
                "parameters, which sampling, evaluation and saving read whole. Use FSDP2, which shards "
                "them too (configs/accelerate/fsdp.yaml), ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml) "
                "or DDP.")
        if spec.kind in ONLINE_KINDS:
            raise NotImplementedError(
                f"{spec.name} with DeepSpeed is not supported: it back-propagates each optimizer step in "
                "several pieces, and accelerate's DeepSpeed engine steps the optimizer at every backward. "
                "Use DDP (configs/accelerate/multi_gpu.yaml) or FSDP2 (configs/accelerate/fsdp.yaml)."
            )


def enable_fsdp_on_cpu(accelerator, mixed_precision: str) -> None:
    """Apply the launch's FSDP plugin to CPU processes (gloo), which accelerate sets up for GPUs only.

    ``accelerate launch`` with an FSDP config sets ``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` settings;
    on CPU processes accelerate builds the plugin from them but leaves the state ``MULTI_CPU``. The same
    plugin is then put in place, so ``prepare`` shards the denoiser with ``fully_shard`` as on GPUs.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment, as accelerate builds it
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    # both shared states: a later AcceleratorState() (set_seed makes one) copies PartialState's over its own
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def agree_on_initial_weights(accelerator, model) -> None:
    """FSDP: every process's trainable weights become the main process's, before sharding.

    DDP broadcasts the main process's weights when it wraps the model; FSDP2 keeps each process's shard of
    its own copy, so LoRA's random initialisation (seeded per process) would otherwise mix the processes'
    draws, and the run would train another model than the same run under DDP or on one process.
    """
    if not getattr(accelerator, "is_fsdp2", False):
        return
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                torch.distributed.broadcast(p.data, src=0)


def shard_frozen_copy(accelerator, model):
    """A full fine-tune's frozen reference, sharded by the launch's FSDP plugin like the denoiser (its
    forwards then gather block by block); as it is without FSDP."""
    if model is None or not getattr(accelerator, "is_fsdp2", False):
        return model
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, model)


def whole_denoiser_on_main(accelerator, pipe, denoiser_attr: str, denoiser):
    """The denoiser for the run's outputs (saved and evaluated by the main process alone): under FSDP an
    unsharded copy, put in the pipeline, on the main process (every process must call this); else as it
    is."""
    if not is_sharded(denoiser):
        return denoiser
    whole = unsharded_copy(denoiser, keep=accelerator.is_main_process)
    if whole is None:
        return denoiser
    setattr(pipe, denoiser_attr, whole)
    return whole


def configure_deepspeed(accelerator, cfg) -> None:
    """DeepSpeed needs the per-device batch size; accelerate infers it from prepared dataloaders, but the
    trainer prepares the model before its data."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
