"""SePPO's training pieces: winning images with prompts, the pool of earlier checkpoints, the objective.

The loss and its settings are in :mod:`diffalign.methods.seppo`. One step (``SePPOObjective.__call__``):

1. encode a batch of winners ``w`` (VAE latents, text conditioning, SDXL micro-conditioning);
2. draw a reference from the pool (``method.reference``); under it, sample ``x_ref`` for the same prompts
   with :func:`diffalign.sampler.sample` (latents, no decode) and compute the reference's denoising
   losses on ``w`` and ``x_ref``;
3. compute the policy's denoising losses on both (one batched forward, with gradients) and the loss.

The pool always holds the initial model (with LoRA: the same UNet with adapters disabled; with a full
fine-tune: the trainer's frozen copy, also written to disk) so an empty pool at the first step means
the initial model. Every ``pool_interval`` optimizer steps the policy is added: LoRA weights as CPU
tensors (a few MB), full UNets as safetensors files under ``output_dir/seppo_pool``. The pool is not
part of a checkpoint: a resumed run starts a new pool from the initial model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffalign.data import (
    DataError,
    Decoded,
    PairSource,
    fit_frames,
    media_file,
    open_image_file,
    open_pairs,
    read_video_frames,
    resize_crop,
)
from diffalign.jsonl import iter_jsonl

log = logging.getLogger("diffalign.seppo")


# ----------------------------------------------------------------------------------------------------
# Winners: from a preference set, or images with prompts
# ----------------------------------------------------------------------------------------------------
class ImagePrompts:
    """Images with their prompts: a JSONL file (``prompt`` and ``image`` path per line, relative to the
    file) or a folder with ``samples.jsonl`` (``prompt`` and ``file``, as ``diffalign sample`` writes)."""

    def __init__(self, path: Path, image_key: str):
        self.description = str(path)
        root = path.parent
        self.rows: list[tuple[str, Path]] = []
        for where, row in iter_jsonl(path, DataError):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get(image_key), str) \
                    or not row[image_key]:
                raise DataError(f"{where}: expected an object with a string 'prompt' and an image path {image_key!r}")
            self.rows.append((row["prompt"], media_file(root, row[image_key], where, "image")))
        if not self.rows:
            raise DataError(f"{path}: no images")

    def __len__(self):
        return len(self.rows)

    def caption(self, i: int) -> str:
        return self.rows[i][0]

    def winner(self, i: int, draft_size: int | None = None) -> Decoded:
        return open_image_file(self.rows[i][1], draft_size)

    def winner_video(self, i: int) -> list[Image.Image]:
        return read_video_frames(self.rows[i][1])


class PairWinners:
    """The winning image of each pair of a preference set (ties already dropped)."""

    def __init__(self, pairs: PairSource):
        self.pairs, self.description = pairs, f"winners of {pairs.description}"

    def __len__(self):
        return len(self.pairs)

    def caption(self, i: int) -> str:
        return self.pairs.caption(i)

    def winner(self, i: int, draft_size: int | None = None) -> Decoded:
        return self.pairs.images(i, draft_size)[0]

    def winner_video(self, i: int) -> list[Image.Image]:
        return self.pairs.videos(i)[0]


def _first_row(path: Path) -> dict:
    for _, row in iter_jsonl(path, DataError):
        return row if isinstance(row, dict) else {}
    raise DataError(f"{path}: empty file")


def open_winners(data_cfg):
    """The winners of ``data.source``; the schema is checked here, before any model loads."""
    path = Path(os.path.expanduser(data_cfg.source))
    if path.is_dir() and (path / "samples.jsonl").is_file() and not (path / "pairs.jsonl").is_file():
        return ImagePrompts(path / "samples.jsonl", "file")
    if path.is_file() and path.suffix == ".jsonl" and "chosen" not in _first_row(path):
        return ImagePrompts(path, "image")
    return PairWinners(open_pairs(data_cfg.source, data_cfg.format, data_cfg.split, data_cfg.max_pairs))


class WinnersDataset(torch.utils.data.Dataset):
    """Winners resized/cropped/flipped to ``resolution`` in [-1, 1], with SDXL micro-conditioning.

    With ``num_frames`` (video models) a winner is a clip ``pixels`` [F, 3, R, R], fitted to ``num_frames``
    by ``frame_policy`` (see :func:`diffalign.data.fit_frames`).
    """

    def __init__(self, source, resolution: int, random_flip: bool, seed: int, num_frames: int | None = None,
                 frame_policy: str = "resample"):
        self.source, self.resolution, self.random_flip, self.seed = source, resolution, random_flip, seed
        self.num_frames, self.frame_policy = num_frames, frame_policy

    def __len__(self):
        return len(self.source)

    def _video_item(self, index: int, rng: random.Random) -> dict:
        r = self.resolution
        try:
            frames = fit_frames(self.source.winner_video(index), self.num_frames, self.frame_policy, "winner video")
            frames = [resize_crop(frame, r, None)[0] for frame in frames]
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
            return {"bad": f"{self.source.description} item {index}: {type(err).__name__}: {err}", "index": index}
        if self.random_flip and rng.random() < 0.5:
            frames = [frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for frame in frames]
        pixels = torch.stack([torch.from_numpy(np.asarray(f, dtype=np.uint8).copy()).permute(2, 0, 1) for f in frames])
        return {"index": index, "caption": self.source.caption(index), "pixels": pixels.float() / 127.5 - 1.0,
                "time_ids": torch.tensor([r, r, 0, 0, r, r], dtype=torch.float32)}  # unused by video models

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(f"{self.seed}/{index}")
        if self.num_frames is not None:
            return self._video_item(index, rng)
        try:
            image, original = self.source.winner(index, draft_size=2 * self.resolution)
            image, (top, left) = resize_crop(image, self.resolution, None, original)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return {"bad": f"{self.source.description} item {index}: {type(err).__name__}: {err}", "index": index}
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        r = self.resolution
        return {"index": index, "caption": self.source.caption(index), "pixels": pixels.float() / 127.5 - 1.0,
                "time_ids": torch.tensor([*original, top, left, r, r], dtype=torch.float32)}


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

    def __init__(self, pipe, unet, ref_unet, finetune: str, directory: Path, size: int | None, accelerator=None,
                 denoiser_attr: str = "unet"):
        from diffalign.train import unwrap

        self.pipe, self.unet, self.ref_unet, self.denoiser_attr = pipe, unwrap(unet), ref_unet, denoiser_attr
        self.finetune, self.directory, self.size = finetune, directory, size
        self.accelerator = accelerator  # multi-process: the main process writes the files, every rank reads them
        self.entries = [PoolEntry(0)]
        self.loaded_step = 0  # which entry ref_unet holds (full fine-tune)
        if finetune != "lora":
            if ref_unet is None:
                raise RuntimeError("SePPO with a full fine-tune needs the trainer's frozen reference copy")
            self.entries[0].path = self._save(0, ref_unet)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.unet.named_parameters() if "lora_" in n}

    def _save(self, step: int, model) -> Path:
        from safetensors.torch import save_file

        path = self.directory / f"step-{step}.safetensors"
        if self._writes_files:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()  # the ranks' weights are the same: they all use the main's file
        return path

    @property
    def _writes_files(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def add(self, step: int) -> None:
        if self.finetune == "lora":
            entry = PoolEntry(step, lora={n: p.detach().to("cpu", copy=True) for n, p in self._trainable().items()})
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
                if self.loaded_step != entry.step:
                    from safetensors.torch import load_file

                    self.ref_unet.load_state_dict(load_file(str(entry.path)))
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
                current = {n: p.detach().clone() for n, p in params.items()}
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
    def __init__(self, ctx):
        from diffalign.data import EpochBatches

        self.ctx = ctx
        cfg, m = ctx.cfg, ctx.cfg.method
        self.m = m
        from diffalign.train import video_frames

        source = ctx.source if ctx.source is not None else open_winners(cfg.data)
        self.dataset = WinnersDataset(source, cfg.data.resolution, cfg.data.random_flip, cfg.train.seed,
                                      video_frames(cfg, ctx.pipe, ctx.family), cfg.data.frame_policy)
        self.batches_of = EpochBatches(self.dataset, ctx.accelerator, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                       num_workers=cfg.data.num_workers, max_bad_fraction=cfg.data.max_bad_fraction)
        self.pool = CheckpointPool(ctx.pipe, ctx.unet, ctx.ref_unet, cfg.model.finetune,
                                   Path(cfg.train.output_dir) / "seppo_pool", m.pool_size, ctx.accelerator,
                                   denoiser_attr=ctx.family.denoiser_attr)
        self.rng = random.Random(cfg.train.seed + 7919 * ctx.accelerator.process_index)
        log.info("seppo: %d winners from %s; reference %s, pool every %d steps (size %s), flip %s",
                 len(source), source.description, m.reference, m.pool_interval, m.pool_size, m.flip)

    def batches(self):
        return iter(self.batches_of)

    def state_dict(self) -> dict:
        return {"data": self.batches_of.state_dict(), "rng": self.rng.getstate(), "pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batches_of.load_state_dict(state["data"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.pool.load_state_dict(state["pool"])

    def on_step_end(self, step: int) -> None:
        if step % self.m.pool_interval == 0:
            self.pool.add(step)

    def __call__(self, batch):
        from diffalign.methods.seppo import seppo_loss
        from diffalign.sampler import sample
        from diffalign.train import denoising_losses, encode_images, encode_text, sample_latents

        ctx, m = self.ctx, self.m
        device, dtype, family, scheduler = ctx.device, ctx.weight_dtype, ctx.family, ctx.noise_scheduler
        captions, b = batch["caption"], batch["size"]
        latents_w = sample_latents(ctx.pipe.vae, encode_images(ctx.pipe.vae, batch["pixels"])).to(device, dtype)
        cond_w = encode_text(ctx.pipe, family, captions, device)
        if family.name == "sdxl":
            cond_w["time_ids"] = batch["time_ids"]
        entry = self.pool.choose(m.reference, self.rng)
        seeds = [self.rng.randrange(2**31) for _ in range(b)]
        r = ctx.cfg.data.resolution
        frames = {"num_frames": self.dataset.num_frames} if self.dataset.num_frames is not None else {}
        num_t = scheduler.config.num_train_timesteps
        noise_w = torch.randn_like(latents_w)
        t_w = torch.randint(0, num_t, (b,), device=device)
        with self.pool.use(entry) as reference:
            was_training = reference.training
            reference.eval()
            generated = sample(ctx.pipe, captions, seeds=seeds, num_steps=m.ref_num_inference_steps,
                               guidance_scale=m.ref_guidance_scale, eta=m.ref_eta, height=r, width=r, decode=False,
                               **frames)
            reference.train(was_training)
            trajectory = generated.trajectory
            latents_r = trajectory.latents[:, -1].to(device, dtype)
            noise_r, t_r = (noise_w, t_w) if m.share_noise else (torch.randn_like(latents_r),
                                                                 torch.randint(0, num_t, (b,), device=device))
            latents = torch.cat([latents_w, latents_r])
            noise, timesteps = torch.cat([noise_w, noise_r]), torch.cat([t_w, t_r])
            cond = {k: torch.cat([cond_w[k].to(device, dtype), trajectory.cond[k].to(device, dtype)]) for k in cond_w}
            ref_w, ref_r = denoising_losses(reference, family, scheduler, latents, noise, timesteps, cond).chunk(2)
        model_w, model_r = denoising_losses(ctx.unet, family, scheduler, latents, noise, timesteps, cond).chunk(2)
        out = seppo_loss(model_w, ref_w, model_r, ref_r, beta=m.beta, flip=m.flip)
        out.extra["reference_step"] = torch.tensor(float(entry.step))
        out.extra["pool_size"] = torch.tensor(float(len(self.pool.entries)))
        return out
