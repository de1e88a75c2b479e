"""The winners objective (SePPO): the pool of earlier checkpoints and one step on a batch of winners.

The loss and its settings are in :mod:`diffalign.methods.seppo` (its ``winners_loss`` hook), the
winners' data in :mod:`diffalign.winners`. One step (``SePPOObjective.__call__``):

1. encode a batch of winners ``w`` (VAE latents, text conditioning, SDXL micro-conditioning);
2. draw a reference from the pool (``method.reference``); under it, sample ``x_ref`` for the same prompts
   with :func:`diffalign.sampler.sample` (latents, no decode) and compute the reference's denoising
   losses on ``w`` and ``x_ref``;
3. compute the policy's denoising losses on both (one batched forward, with gradients) and the loss.

The pool always holds the initial model (with LoRA: the same UNet with adapters disabled; with a full
fine-tune: the trainer's frozen copy, also written to disk) so an empty pool at the first step means
the initial model. Every ``pool_interval`` optimizer steps the policy is added: LoRA weights as CPU
tensors (a few MB), full UNets as safetensors files under ``output_dir/seppo_pool``. The pool is part of
a training checkpoint (LoRA entries as tensors, full-UNet files hard-linked into the checkpoint), so a
resumed run draws its references from the same pool as an uninterrupted one.

Several processes draw the same reference at every step (one stream seeded by ``train.seed`` alone; the
sampling seeds of ``x_ref`` stay per process): under FSDP2 the processes hold shards of one denoiser, so
they must swap in the same policy, and under DDP a step then has one reference, as on one process.
Under FSDP2 a LoRA entry is the whole LoRA weights on every process's CPU (gathered when added, sharded
back in when used): a few MB each, the same tensors as without FSDP, so a checkpoint holds whole tensors
whatever the launch; a full fine-tune's files are gathered whole by the main process, and a reference
is loaded into the sharded frozen copy from them. The reference then samples and gives its losses with
its weights gathered once (:func:`~diffalign.parallel.gathered`), as the online objectives sample.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffalign.data import EpochBatches
from diffalign.denoising import denoising_losses, encode_images, sample_latents
from diffalign.files import save_safetensors
from diffalign.methods.base import LossOutput
from diffalign.objectives.context import TrainContext, unwrap
from diffalign.parallel import gathered, is_sharded, load_whole_trainable, whole_state_dict, whole_trainable
from diffalign.sampler import sample
from diffalign.winners import WinnersDataset, open_winners

log = logging.getLogger("diffalign.seppo")


# ----------------------------------------------------------------------------------------------------
# The checkpoint pool
# ----------------------------------------------------------------------------------------------------
@dataclass
class PoolEntry:
    step: int  # 0 = the initial model
    lora: dict[str, torch.Tensor] | None = None  # LoRA weights (CPU), by parameter name
    path: Path | None = None  # a full UNet's weights on disk


class CheckpointPool:
    """Earlier policies to draw SePPO's reference from. ``use(entry)`` makes the pipeline's denoiser
    (``pipe.unet``, or ``pipe.transformer`` for Wan: ``denoiser_attr``) that policy."""

    def __init__(
        self,
        pipe,
        unet,
        ref_unet,
        finetune: str,
        directory: Path,
        size: int | None,
        accelerator=None,
        denoiser_attr: str = "unet",
    ):
        self.pipe, self.unet, self.ref_unet, self.denoiser_attr = pipe, unwrap(unet), ref_unet, denoiser_attr
        self.finetune, self.directory, self.size = finetune, directory, size
        # multi-process: the main process writes the files, every rank reads them
        self.accelerator = accelerator
        self.entries = [PoolEntry(0)]
        self.loaded_step = 0  # which entry ref_unet holds (full fine-tune)
        if finetune != "lora":
            if ref_unet is None:
                raise RuntimeError("SePPO with a full fine-tune needs the trainer's frozen reference copy")
            self.entries[0].path = self._save(0, ref_unet)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.unet.named_parameters() if "lora_" in n}

    def _save(self, step: int, model) -> Path:
        path = self.directory / f"step-{step}.safetensors"
        weights = whole_state_dict(model)  # FSDP: gathered on the main process (every process takes part)
        if self._writes_files:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_safetensors({k: v.detach().contiguous().cpu() for k, v in weights.items()}, path)
        if self.accelerator is not None:
            # the ranks' weights are the same: they all use the main's file
            self.accelerator.wait_for_everyone()
        return path

    @property
    def _writes_files(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def add(self, step: int) -> None:
        if self.finetune == "lora":
            weights = whole_trainable(self.unet)  # FSDP: every LoRA layer gathered whole
            entry = PoolEntry(step, lora={n: w.to("cpu", copy=True) for n, w in weights.items()})
        else:
            entry = PoolEntry(step, path=self._save(step, self.unet))
        self.entries.append(entry)
        if self.size is not None and len(self.entries) - 1 > self.size:
            dropped = self.entries.pop(1)  # the oldest saved policy; the initial model always stays
            if dropped.path is not None and self._writes_files:
                dropped.path.unlink(missing_ok=True)

    def state_dict(self) -> dict:
        # full fine-tunes: the files themselves go into the checkpoint (hard links), see diffalign.checkpoints
        return {"entries": [{"step": e.step, "lora": e.lora, "path": e.path} for e in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        entries = []
        for saved in state["entries"]:
            entry = PoolEntry(saved["step"], lora=saved["lora"])
            if saved["path"] is not None:  # back into the pool's folder: the checkpoint may be rotated away
                entry.path = self.directory / f"step-{entry.step}.safetensors"
                if self._writes_files:  # the main process restores the files every rank reads
                    self.directory.mkdir(parents=True, exist_ok=True)
                    if not entry.path.exists() or not entry.path.samefile(saved["path"]):
                        shutil.copy2(saved["path"], entry.path)
            entries.append(entry)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        self.entries = entries
        self.loaded_step = -1  # reload the reference copy from the restored entry when first used

    def choose(self, rule: str, rng: random.Random) -> PoolEntry:
        if rule == "uniform":
            return rng.choice(self.entries)
        if rule == "initial":
            return self.entries[0]
        if rule == "latest":
            return self.entries[-1]
        raise ValueError(f"unknown SePPO reference rule {rule!r}; expected uniform, initial or latest")

    @contextlib.contextmanager
    def use(self, entry: PoolEntry):
        """Yield the denoiser of ``entry`` and make it the pipeline's denoiser meanwhile (no gradients)."""
        with torch.no_grad():
            if self.finetune != "lora":
                if self.loaded_step != entry.step:  # every process alike: the same entries, the same draws
                    weights = load_file(str(entry.path))
                    if is_sharded(self.ref_unet):
                        load_whole_trainable(self.ref_unet, weights)
                    else:
                        self.ref_unet.load_state_dict(weights)
                    self.loaded_step = entry.step
                original = getattr(self.pipe, self.denoiser_attr)
                setattr(self.pipe, self.denoiser_attr, self.ref_unet)
                try:
                    yield self.ref_unet
                finally:
                    setattr(self.pipe, self.denoiser_attr, original)
            elif entry.lora is None:
                self.unet.disable_adapters()
                try:
                    yield self.unet
                finally:
                    self.unet.enable_adapters()
            else:
                params = self._trainable()
                current = {n: p.detach().clone() for n, p in params.items()}  # FSDP: this process's shards
                if is_sharded(self.unet):
                    load_whole_trainable(self.unet, entry.lora)
                else:
                    for n, p in params.items():
                        p.copy_(entry.lora[n])
                try:
                    yield self.unet
                finally:
                    for n, p in params.items():
                        p.copy_(current[n])


# ----------------------------------------------------------------------------------------------------
# The objective the trainer drives
# ----------------------------------------------------------------------------------------------------
class SePPOObjective:
    """Winners against the pooled reference's own samples; each call is one batch's SePPO loss."""

    def __init__(self, ctx: TrainContext):
        self.ctx = ctx
        cfg, m = ctx.cfg, ctx.cfg.method
        self.m = m
        source = ctx.source if ctx.source is not None else open_winners(cfg.data)
        frames = ctx.prep.num_frames if ctx.prep is not None else None
        self.dataset = WinnersDataset(source, cfg.data.resolution, cfg.data.random_flip, cfg.train.seed,
                                      frames, cfg.data.frame_policy)
        self.batches_of = EpochBatches(
            self.dataset,
            ctx.accelerator,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            num_workers=cfg.data.num_workers,
            max_bad_fraction=cfg.data.max_bad_fraction,
        )
        self.pool = CheckpointPool(ctx.pipe, ctx.unet, ctx.ref_unet, cfg.model.finetune,
                                   Path(cfg.train.output_dir) / "seppo_pool", m.pool_size, ctx.accelerator,
                                   denoiser_attr=ctx.family.denoiser_attr)
        # which reference: the same on every process; x_ref's sampling seeds: the process's own
        self.reference_rng = random.Random(cfg.train.seed)
        self.rng = random.Random(cfg.train.seed + 7919 * ctx.accelerator.process_index)
        log.info("seppo: %d winners from %s; reference %s, pool every %d steps (size %s), flip %s",
                 len(source), source.description, m.reference, m.pool_interval, m.pool_size, m.flip)

    def batches(self):
        return iter(self.batches_of)

    def state_dict(self) -> dict:
        return {
            "data": self.batches_of.state_dict(),
            "rng": self.rng.getstate(),
            "reference_rng": self.reference_rng.getstate(),
            "pool": self.pool.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.batches_of.load_state_dict(state["data"])
        # a checkpoint from before the shared reference stream drew the reference from the process's own
        reference = state.get("reference_rng", state["rng"])
        for rng, saved in ((self.rng, state["rng"]), (self.reference_rng, reference)):
            version, internal, gauss = saved
            rng.setstate((version, tuple(internal), gauss))
        self.pool.load_state_dict(state["pool"])

    def on_step_end(self, step: int) -> None:
        if step % self.m.pool_interval == 0:
            self.pool.add(step)

    def __call__(self, batch) -> LossOutput:
        ctx, m = self.ctx, self.m
        device, dtype, family, scheduler = ctx.device, ctx.weight_dtype, ctx.family, ctx.noise_scheduler
        captions, b = batch["caption"], batch["size"]
        latents_w = sample_latents(ctx.pipe.vae, encode_images(ctx.pipe.vae, batch["pixels"])).to(
            device, dtype
        )
        cond_w = family.encode_prompt(ctx.pipe, captions, device)
        for key in family.micro_conditioning:
            cond_w[key] = batch[key]
        entry = self.pool.choose(m.reference, self.reference_rng)
        seeds = [self.rng.randrange(2**31) for _ in range(b)]
        settings = m.reference_sampling(ctx.cfg.data.resolution, self.dataset.num_frames)
        num_t = scheduler.config.num_train_timesteps
        noise_w = torch.randn_like(latents_w)
        t_w = torch.randint(0, num_t, (b,), device=device)
        # FSDP: the reference's weights gathered once (after the swap) for its sampling and losses
        with self.pool.use(entry) as reference, gathered(reference):
            was_training = reference.training
            reference.eval()
            generated = sample(ctx.pipe, captions, seeds=seeds, decode=False, **settings.sample_kwargs())
            reference.train(was_training)
            trajectory = generated.trajectory
            latents_r = family.training_latents(ctx.pipe, trajectory.latents[:, -1], settings.height,
                                                settings.width).to(device, dtype)
            noise_r, t_r = (noise_w, t_w) if m.share_noise else (torch.randn_like(latents_r),
                                                                 torch.randint(0, num_t, (b,), device=device))
            latents = torch.cat([latents_w, latents_r])
            noise, timesteps = torch.cat([noise_w, noise_r]), torch.cat([t_w, t_r])
            cond = {
                k: torch.cat([cond_w[k].to(device, dtype), trajectory.cond[k].to(device, dtype)])
                for k in cond_w
            }
            ref_w, ref_r = denoising_losses(
                reference, family, scheduler, latents, noise, timesteps, cond
            ).chunk(2)
        model_w, model_r = denoising_losses(
            ctx.unet, family, scheduler, latents, noise, timesteps, cond
        ).chunk(2)
        out = ctx.spec.winners_loss(m, model_w, ref_w, model_r, ref_r)
        out.extra["reference_step"] = torch.tensor(float(entry.step))
        out.extra["pool_size"] = torch.tensor(float(len(self.pool.entries)))
        return out

