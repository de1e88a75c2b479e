"""Pretrain ``toy-animatediff``'s motion UNet from scratch on moving-shape clips (toy-sdxl's VAE, frozen).

Everything follows from ``VideoPretrainConfig`` (one seed): the clips, the initial weights, every batch
(batch ``i`` is drawn from a generator seeded with ``(seed, i)``), so a resumed run takes exactly the steps
an uninterrupted one would. A run folder holds::

    OUT/checkpoint/   the latest training state (safetensors + state.json), replaced atomically
    OUT/pipeline/     the finished AnimateDiffPipeline folder (what ships as toy-animatediff)
    OUT/train.log     loss and periodic caption/motion-accuracy lines
    OUT/samples.png   rows of sampled clips of the finished model (one clip per row, frames left to right)

The unconditional branch is AnimateDiff's: the encoded empty prompt, trained by dropping captions, so
classifier-free guidance works with the stock pipeline.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffalign.images import to_pil
from diffalign.sampler import sample
from diffalign.toy import video_data
from diffalign.toy.pretrain import (
    _batch_generator,
    _load_optimizer,
    _lr_factor,
    _optimizer_tensors,
    encode_images,
    load_checkpoint,
    min_snr_loss,
    open_run,
    save_checkpoint,
    update_with_ema,
    write_pipeline,
)
from diffalign.toy.video_evaluate import video_caption_accuracy
from diffalign.toy.video_model import (
    DEFAULT_GUIDANCE,
    DEFAULT_NUM_STEPS,
    assemble_video_pipeline,
    build_video_pipeline,
)

log = logging.getLogger("diffalign.toy")


@dataclass
class VideoPretrainConfig:
    seed: int = 0
    num_clips: int = 2000
    num_frames: int = video_data.NUM_FRAMES
    # The motion UNet: epsilon prediction, min-SNR weighting, EMA weights are what ships.
    steps: int = 1800
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 100
    snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    eval_every: int = 600
    eval_prompts: int = 16
    #: Continue pretraining: a toy-animatediff pipeline folder whose UNet starts this run ("" = random init).
    init_from: str = ""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name == "warmup_steps" else 2 if f.name == "num_frames" else 1
            if f.name.endswith(("steps", "size", "every", "clips", "prompts", "frames")) and value < low:
                raise ValueError(f"VideoPretrainConfig.{f.name} must be >= {low}, got {value}")
        if self.init_from and not (Path(self.init_from) / "unet" / "config.json").is_file():
            raise FileNotFoundError(
                f"VideoPretrainConfig.init_from: {self.init_from} is not a pipeline folder "
                "with a unet/ (e.g. a 'pretrain-video' run's pipeline/)"
            )
        if self.num_frames > 32:
            raise ValueError(
                f"VideoPretrainConfig.num_frames must be <= 32 (the motion modules' max length), "
                f"got {self.num_frames}"
            )


@torch.no_grad()
def _encode_clips(
    vae, clips: torch.Tensor, device, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean/std of every frame: [N, C, F, h, w] each (the motion UNet's layout)."""
    n, f = clips.shape[:2]
    means, stds = encode_images(vae, clips.flatten(0, 1), device, batch_size)
    to_video = lambda x: x.view(n, f, *x.shape[1:]).transpose(1, 2).contiguous()  # noqa: E731
    return to_video(means), to_video(stds)


@torch.no_grad()
def _encode_captions(pipe, captions: list[str]) -> torch.Tensor:
    """The pipeline's own prompt encoding (token states [N, 77, hidden]), as sampling computes it."""
    embeds, _ = pipe.encode_prompt(captions, pipe.device, 1, do_classifier_free_guidance=False)
    return embeds


def train_motion_unet(pipe, ema_unet, latent_mean, latent_std, caption_ids, embeds, empty, config, ckpt: Path,
                      device, resume, stop_after: int | None = None) -> int:
    """Train ``pipe.unet`` (EMA into ``ema_unet``) from the resumed step; returns the step reached."""
    from diffusers import DDPMScheduler

    unet = pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = 0
    if resume is not None:
        unet.load_state_dict(resume[1]["unet"])
        ema_unet.load_state_dict(resume[1]["ema_unet"])
        _load_optimizer(optimizer, resume[1]["optimizer"])
        start = resume[0]["step"]
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    scale = pipe.vae.config.scaling_factor
    frames = config.num_frames
    unet.train()
    bar = tqdm(range(start, end), desc="toy motion unet", initial=start, total=config.steps)
    smoothed = None
    for step in bar:
        g = _batch_generator(config.seed, 3, step)
        b = config.batch_size
        index = torch.randint(len(latent_mean), (b,), generator=g)
        z0 = (
            latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=g)
        ) * scale
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        keep = (torch.rand(b, generator=g) >= config.caption_dropout).view(-1, 1, 1)
        z0, noise, t, keep = z0.to(device), noise.to(device), t.to(device), keep.to(device)
        # Dropped captions get the pipeline's unconditional input: the encoded empty prompt.
        e = torch.where(keep, embeds[caption_ids[index].to(device)], empty)
        zt = noise_scheduler.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=e.repeat_interleave(frames, dim=0)).sample
        loss = min_snr_loss(pred, noise, alphas_cumprod[t], config.snr_gamma)
        update_with_ema(optimizer, unet, ema_unet, loss, step, config.lr * _lr_factor(step, config.steps,
                        config.warmup_steps), config.grad_clip, config.ema_decay)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}")
        done = step + 1
        if done % 25 == 0 or done == config.steps:
            log.info(f"motion unet step {done}/{config.steps} loss {smoothed:.5f} "
                     f"lr {optimizer.param_groups[0]['lr']:.2e}")
        if done % config.checkpoint_every == 0 or done in (end, config.steps):
            save_checkpoint(ckpt, {"stage": "unet" if done < config.steps else "done", "step": done,
                                   "config": asdict(config)},
                            {"unet": unet.state_dict(), "ema_unet": ema_unet.state_dict(),
                             "optimizer": _optimizer_tensors(optimizer)})
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            unet.eval()
            _log_accuracy(pipe, ema_unet, config, f"step {done}")
            unet.train()
    unet.eval()
    return end


def _log_accuracy(pipe, ema_unet, config: VideoPretrainConfig, label: str) -> dict:
    live = pipe.unet
    pipe.unet = ema_unet
    try:
        result = video_caption_accuracy(pipe, video_data.video_prompts("train", config.eval_prompts, seed=1),
                                        num_frames=config.num_frames, num_steps=DEFAULT_NUM_STEPS,
                                        guidance_scale=DEFAULT_GUIDANCE)
    finally:
        pipe.unet = live
    log.info(f"eval {label}: " + json.dumps({k: round(v, 3) for k, v in result["accuracy"].items()}))
    return result


def pretrain_video(out: str | os.PathLike, config: VideoPretrainConfig | None = None, device: str = "cpu",
                   final_samples: bool = True, stop_after: int | None = None) -> Path | None:
    """Train toy-animatediff into ``out`` (resuming from ``out/checkpoint``); returns the pipeline folder.

    ``stop_after`` ends this process after that many steps with a checkpoint (returns None unless that
    finishes training); ``final_samples`` measures the finished model and writes ``samples.png``.
    """
    config = config or VideoPretrainConfig()
    out = Path(out)
    ckpt, resume = open_run(out, config)
    if resume is not None:
        log.info(f"resuming from {ckpt}: step {resume[0]['step']}")
    started = time.time()

    pipe = build_video_pipeline(seed=config.seed).to(device)
    pipe.set_progress_bar_config(disable=True)
    log.info(f"toy-animatediff motion unet: {sum(p.numel() for p in pipe.unet.parameters()):,} parameters "
             f"(toy-sdxl's VAE and text encoder, frozen)")
    if config.init_from:
        from diffusers import UNetMotionModel

        pipe.unet.load_state_dict(
            UNetMotionModel.from_pretrained(Path(config.init_from) / "unet").state_dict()
        )
        log.info(f"motion unet initialised from {config.init_from}")
    clips, captions = video_data.make_video_dataset(config.num_clips, seed=config.seed, split="train",
                                                    num_frames=config.num_frames)
    log.info(
        f"dataset: {len(clips)} clips of {config.num_frames} frames, {len(set(captions))} distinct captions"
    )
    latent_mean, latent_std = _encode_clips(pipe.vae, clips, device)
    unique = sorted(set(captions))
    lookup = {c: i for i, c in enumerate(unique)}
    caption_ids = torch.tensor([lookup[c] for c in captions])
    embeds, empty = _encode_captions(pipe, unique), _encode_captions(pipe, [""])

    ema_unet = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
    if resume is None or resume[0]["stage"] != "done":
        reached = train_motion_unet(
            pipe,
            ema_unet,
            latent_mean,
            latent_std,
            caption_ids,
            embeds,
            empty,
            config,
            ckpt,
            device,
            resume,
            stop_after=stop_after,
        )
        if reached < config.steps:
            log.info(f"stopped at step {reached}/{config.steps}; run again to resume")
            return None
    else:
        ema_unet.load_state_dict(resume[1]["ema_unet"])
    log.info(f"training finished ({(time.time() - started) / 60:.1f} min in this process)")

    final = write_video_pipeline(pipe, ema_unet, out, config)
    if final_samples:
        _log_accuracy(pipe, ema_unet, config, "final")
        save_clip_grid(pipe, out / "samples.png", num_frames=config.num_frames)
    return final


def write_video_pipeline(pipe, ema_unet, out: Path, config: VideoPretrainConfig) -> Path:
    return write_pipeline(
        assemble_video_pipeline(ema_unet, pipe.vae, pipe.text_encoder, pipe.tokenizer), out, config
    )


def export_video_checkpoint(out: str | os.PathLike, device: str = "cpu") -> Path:
    """Write ``out/pipeline`` from the latest checkpoint's EMA weights (e.g. of a run stopped early)."""
    out = Path(out)
    resume = load_checkpoint(out / "checkpoint")
    if resume is None or "ema_unet" not in resume[1]:
        raise FileNotFoundError(f"{out / 'checkpoint'} holds no toy-animatediff checkpoint to export")
    state, tensors = resume
    config = VideoPretrainConfig(**state["config"])
    pipe = build_video_pipeline(seed=config.seed).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.load_state_dict(tensors["ema_unet"])
    pipe.unet.eval()
    log.info(f"exporting {out / 'checkpoint'} (step {state['step']})")
    final = write_video_pipeline(pipe, pipe.unet, out, config)
    _log_accuracy(pipe, pipe.unet, config, f"export of step {state['step']}")
    save_clip_grid(pipe, out / "samples.png", num_frames=config.num_frames)
    return final


def save_clip_grid(pipe, path: Path, rows: int = 8, num_frames: int = video_data.NUM_FRAMES) -> None:
    """One sampled clip per row (frames left to right) for ``rows`` training captions; captions in
    ``.txt``."""
    prompts = video_data.video_prompts("train", rows, seed=2)
    videos = sample(pipe, prompts, seeds=list(range(rows)), num_steps=DEFAULT_NUM_STEPS,
                    guidance_scale=DEFAULT_GUIDANCE, eta=1.0, num_frames=num_frames).images  # [R, F, 3, H, W]
    r, f, c, h, w = videos.shape
    grid = videos.permute(2, 0, 3, 1, 4).reshape(c, r * h, f * w)
    to_pil(grid.unsqueeze(0))[0].resize((f * w * 4, r * h * 4), 0).save(path)
    path.with_suffix(".txt").write_text("\n".join(prompts) + "\n")
