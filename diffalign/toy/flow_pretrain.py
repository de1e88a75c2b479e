"""Pretrain ``toy-sd3``'s MMDiT with the flow-matching objective on the toy scenes (toy-sdxl's VAE and text
encoders, frozen).

Everything follows from ``FlowPretrainConfig`` (one seed): the dataset, the initial weights, every batch
(batch ``i`` is drawn from a generator seeded with ``(seed, 3, i)``), so a resumed run takes exactly the
steps an uninterrupted one would. A run folder holds::

    OUT/checkpoint/   the latest training state (safetensors + state.json), replaced atomically
    OUT/pipeline/     the finished StableDiffusion3Pipeline folder (what ships as toy-sd3)
    OUT/train.log     loss and periodic caption-accuracy lines
    OUT/samples.png   a grid of samples of the finished model

The loss is SD3's: ``x_t = (1 - s) x0 + s e``, the transformer predicts ``e - x0`` at timestep ``1000 s``,
``s`` logit-normal (then shifted by the scheduler's shift). The unconditional branch is SD3's: the encoded
empty prompt, trained by dropping captions, so classifier-free guidance works with the stock pipeline.

toy-sd3's T5 gives 256 zero token states after the 77 CLIP ones (``flow_model``). They stay identical
through every block (each token is processed alone except in attention, where identical queries get
identical outputs), so training sees one such token whose attention key counts 256 times
(:class:`~diffalign.flow_matching.RepeatedContextAttnProcessor`): the same function at a third of the
tokens, as the SD3 family samples and trains it; the shipped model has the stock processors.
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
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffalign.families import FAMILIES
from diffalign.flow_matching import use_repeated_context
from diffalign.toy import data
from diffalign.toy.data import IMAGE_SIZE
from diffalign.toy.evaluate import caption_accuracy
from diffalign.toy.flow_model import (
    CLIP_TOKENS,
    DEFAULT_GUIDANCE,
    DEFAULT_NUM_STEPS,
    NUM_HEADS,
    NUM_LAYERS,
    PATCH_SIZE,
    build_flow_pipeline,
)
from diffalign.toy.model import VAE_DOWNSAMPLE, count_parameters
from diffalign.toy.pretrain import (
    _batch_generator,
    _load_optimizer,
    _lr_factor,
    _optimizer_tensors,
    _save_sample_grid,
    encode_images,
    load_checkpoint,
    open_run,
    save_checkpoint,
    update_with_ema,
    write_pipeline,
)

log = logging.getLogger("diffalign.toy")

#: Zero token states of the T5 in a stock call (``max_sequence_length`` of StableDiffusion3Pipeline.__call__).
T5_ZERO_TOKENS = 256


@dataclass
class FlowPretrainConfig:
    seed: int = 0
    num_images: int = 20000
    # The MMDiT (flow_model's NUM_LAYERS x NUM_HEADS of 16 wide heads on PATCH_SIZE patches by default)
    # and the CLIP tokens it reads.
    num_layers: int = NUM_LAYERS
    num_heads: int = NUM_HEADS
    patch_size: int = PATCH_SIZE
    clip_tokens: int = CLIP_TOKENS
    # Flow matching: logit-normal timesteps (SD3's default weighting), EMA weights are what ships.
    steps: int = 8000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    logit_mean: float = 0.0
    logit_std: float = 1.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    checkpoint_every: int = 250
    eval_every: int = 1000
    eval_prompts: int = 48

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name == "warmup_steps" else 1
            counted = f.name.endswith(
                ("steps", "size", "every", "images", "prompts", "layers", "heads", "tokens"))
            if counted and value < low:
                raise ValueError(f"FlowPretrainConfig.{f.name} must be >= {low}, got {value}")
        if (IMAGE_SIZE // VAE_DOWNSAMPLE) % self.patch_size:
            raise ValueError(
                f"FlowPretrainConfig.patch_size must divide the latent side, got {self.patch_size}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(
                f"FlowPretrainConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}")


@torch.no_grad()
def encode_captions(pipe, captions: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 conditioning of each caption as the ``sd3`` family encodes training captions, the T5 zeros as one
    token (see the module docstring): [N, CLIP tokens + 1, 32] token states and [N, 32] pooled."""
    embeds, pooled = [], []
    processors = pipe.transformer.attn_processors  # the family sets its own; the pipe keeps stock ones
    try:
        for i in range(0, len(captions), batch_size):
            cond = FAMILIES["sd3"].encode_prompt(pipe, captions[i : i + batch_size], pipe.device)
            if "context_repeats" not in cond:
                raise RuntimeError("toy-sd3's T5 must give zero token states (they train as one token)")
            embeds.append(cond["encoder_hidden_states"])
            pooled.append(cond["pooled_projections"])
    finally:
        pipe.transformer.set_attn_processor(processors)
    return torch.cat(embeds), torch.cat(pooled)


def sample_sigmas(config: FlowPretrainConfig, shift: float, b: int, g: torch.Generator) -> torch.Tensor:
    """Noise levels: logit-normal, then the scheduler's shift ``k s / (1 + (k - 1) s)``."""
    u = torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(b, generator=g))
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(transformer, z0, noise, sigmas, embeds, pooled) -> torch.Tensor:
    s = sigmas.view(-1, 1, 1, 1)
    zt = (1 - s) * z0 + s * noise
    pred = transformer(hidden_states=zt, timestep=sigmas * 1000, encoder_hidden_states=embeds,
                       pooled_projections=pooled,
                       joint_attention_kwargs={"context_repeats": T5_ZERO_TOKENS}).sample
    return F.mse_loss(pred.float(), (noise - z0).float())


def train_transformer(pipe, ema, latent_mean, latent_std, caption_ids, cond, uncond,
                      config: FlowPretrainConfig, ckpt: Path, device, resume) -> None:
    transformer = pipe.transformer
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = 0
    if resume is not None:
        transformer.load_state_dict(resume[1]["transformer"])
        ema.load_state_dict(resume[1]["ema_transformer"])
        _load_optimizer(optimizer, resume[1]["optimizer"])
        start = resume[0]["step"]
    stock = transformer.attn_processors
    use_repeated_context(transformer)
    embeds, pooled = cond
    scale, shift = pipe.vae.config.scaling_factor, pipe.scheduler.config.shift
    transformer.train()
    bar = tqdm(range(start, config.steps), desc="toy-sd3 transformer", initial=start, total=config.steps)
    smoothed = None
    for step in bar:
        g = _batch_generator(config.seed, 3, step)
        b = config.batch_size
        index = torch.randint(len(latent_mean), (b,), generator=g)
        mean, std = latent_mean[index], latent_std[index]
        z0 = (mean + std * torch.randn(mean.shape, generator=g)) * scale
        noise = torch.randn(z0.shape, generator=g)
        sigmas = sample_sigmas(config, shift, b, g)
        keep = torch.rand(b, generator=g) >= config.caption_dropout
        ids = caption_ids[index]
        # dropped captions get SD3's unconditional input: the encoded empty prompt
        e = torch.where(keep.view(-1, 1, 1), embeds[ids], uncond[0])
        p = torch.where(keep.view(-1, 1), pooled[ids], uncond[1])
        loss = flow_matching_loss(transformer, z0.to(device), noise.to(device), sigmas.to(device),
                                  e.to(device), p.to(device))
        lr = config.lr * _lr_factor(step, config.steps, config.warmup_steps)
        update_with_ema(optimizer, transformer, ema, loss, step, lr, config.grad_clip, config.ema_decay)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}")
        done = step + 1
        if done % 50 == 0 or done == config.steps:
            log.info(f"transformer step {done}/{config.steps} loss {smoothed:.5f} lr {lr:.2e}")
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_checkpoint(ckpt, {"stage": "transformer" if done < config.steps else "done", "step": done,
                                   "config": asdict(config)},
                            {"transformer": transformer.state_dict(), "ema_transformer": ema.state_dict(),
                             "optimizer": _optimizer_tensors(optimizer)})
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            _log_accuracy(pipe, ema, config, f"step {done}")
    transformer.set_attn_processor(stock)
    transformer.eval()


def _log_accuracy(pipe, ema, config: FlowPretrainConfig, label: str) -> dict:
    live = pipe.transformer
    pipe.transformer = ema
    try:
        result = caption_accuracy(pipe, data.toy_prompts("train", config.eval_prompts, seed=1),
                                  num_steps=DEFAULT_NUM_STEPS, guidance_scale=DEFAULT_GUIDANCE, eta=0.0)
    finally:
        pipe.transformer = live
    log.info(f"eval {label}: " + json.dumps({k: round(v, 3) for k, v in result["accuracy"].items()}))
    return result


def _pipeline(config: FlowPretrainConfig, device):
    pipe = build_flow_pipeline(seed=config.seed, num_layers=config.num_layers, num_heads=config.num_heads,
                               patch_size=config.patch_size, clip_tokens=config.clip_tokens)
    pipe.to(device).set_progress_bar_config(disable=True)
    return pipe


def _prepare(config: FlowPretrainConfig, device):
    """The pipeline (random transformer), and the training latents of the dataset's images."""
    pipe = _pipeline(config, device)
    images, captions = data.make_dataset(config.num_images, seed=config.seed, split="train")
    return pipe, images, captions


def pretrain_flow(out: str | os.PathLike, config: FlowPretrainConfig | None = None, device: str = "cpu",
                  final_samples: bool = True) -> Path:
    """Train toy-sd3 into ``out`` (resuming from ``out/checkpoint`` if present); returns the pipeline folder.

    ``final_samples`` measures the finished model's caption accuracy and writes ``samples.png``.
    """
    config = config or FlowPretrainConfig()
    out = Path(out)
    ckpt, resume = open_run(out, config)
    if resume is not None:
        log.info(f"resuming from {ckpt}: stage {resume[0]['stage']} step {resume[0]['step']}")
    started = time.time()
    pipe, images, captions = _prepare(config, device)
    log.info(f"toy-sd3 parameters: transformer {count_parameters(pipe.transformer):,} (trained); vae "
             f"{count_parameters(pipe.vae):,}, text encoders {count_parameters(pipe.text_encoder):,} + "
             f"{count_parameters(pipe.text_encoder_2):,} (toy-sdxl's, frozen)")
    log.info(f"dataset: {len(images)} images, {len(set(captions))} distinct captions")
    ema = copy.deepcopy(pipe.transformer).requires_grad_(False).eval()
    if resume is None or resume[0]["stage"] != "done":
        latent_mean, latent_std = encode_images(pipe.vae, images, device)
        unique = sorted(set(captions))
        lookup = {c: i for i, c in enumerate(unique)}
        caption_ids = torch.tensor([lookup[c] for c in captions])
        cond = encode_captions(pipe, unique)
        uncond = encode_captions(pipe, [""])
        train_transformer(pipe, ema, latent_mean, latent_std, caption_ids, cond, uncond, config, ckpt, device,
                          resume)
        resume = load_checkpoint(ckpt)
    ema.load_state_dict(resume[1]["ema_transformer"])
    log.info(f"training finished ({(time.time() - started) / 60:.1f} min in this process)")
    pipe.transformer = ema
    final = write_pipeline(pipe, out, config)
    if final_samples:
        _log_accuracy(pipe, ema, config, "final")
        _save_sample_grid(pipe, out / "samples.png")
    return final


def export_flow_checkpoint(out: str | os.PathLike, device: str = "cpu") -> Path:
    """Write ``out/pipeline`` from the latest checkpoint's EMA weights (e.g. of a run stopped early)."""
    out = Path(out)
    resume = load_checkpoint(out / "checkpoint")
    if resume is None or "ema_transformer" not in resume[1]:
        raise FileNotFoundError(f"{out / 'checkpoint'} holds no toy-sd3 checkpoint to export")
    state, tensors = resume
    config = FlowPretrainConfig(**state["config"])
    pipe = _pipeline(config, device)
    pipe.transformer.load_state_dict(tensors["ema_transformer"])
    pipe.transformer.eval()
    log.info(f"exporting {out / 'checkpoint'} (step {state['step']})")
    final = write_pipeline(pipe, out, config)
    _log_accuracy(pipe, pipe.transformer, config, f"export of step {state['step']}")
    _save_sample_grid(pipe, out / "samples.png")
    return final
