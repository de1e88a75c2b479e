"""Pretrain ``toy-sdxl`` from scratch on the procedural dataset: VAE first, then the UNet on its latents.

Everything follows from ``PretrainConfig`` (one seed): the dataset, the initial weights, every batch
(batch ``i`` of a stage is drawn from a generator seeded with ``(seed, stage, i)``), so a resumed run
takes exactly the steps an uninterrupted one would. A run folder holds::

    OUT/checkpoint/   the latest training state (safetensors + state.json), replaced atomically
    OUT/pipeline/     the finished diffusers pipeline (what ships as toy-sdxl)
    OUT/train.log     loss and periodic caption-accuracy lines
    OUT/samples.png   a grid of samples of the finished model

The text encoders stay frozen at their random initialisation: the UNet learns to read their token
states. The unconditional branch is SDXL's zeroed embedding (``force_zeros_for_empty_prompt``), trained
by dropping captions, so classifier-free guidance works.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffalign.files import apply_umask
from diffalign.images import to_pil
from diffalign.sampler import sample
from diffalign.tiny import save_pipeline
from diffalign.toy import data
from diffalign.toy.evaluate import caption_accuracy
from diffalign.toy.model import DEFAULT_GUIDANCE, DEFAULT_NUM_STEPS, build_toy_pipeline, count_parameters

log = logging.getLogger("diffalign.toy")


@dataclass
class PretrainConfig:
    seed: int = 0
    num_images: int = 20000
    # Stage 1: the VAE (reconstruction MSE + a small KL term keeps the latent space smooth).
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # Stage 2: the UNet (epsilon prediction, min-SNR weighting, EMA weights are what ships).
    unet_steps: int = 6000
    unet_batch_size: int = 32
    unet_lr: float = 8e-4
    warmup_steps: int = 200
    snr_gamma: float = 5.0
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
            if f.name.endswith(("steps", "size", "every", "images", "prompts")) and value < low:
                raise ValueError(f"PretrainConfig.{f.name} must be >= {low}, got {value}")


# ----------------------------------------------------------------------------------------------------
# Checkpoints: a folder of safetensors files + state.json, written next to the old one and swapped in.
# ----------------------------------------------------------------------------------------------------
def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for pid, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{pid}.{key}"] = torch.as_tensor(value).clone()
    return out


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


def save_checkpoint(folder: Path, state: dict, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write ``tensors`` (file stem -> tensors) and ``state`` (JSON) as ``folder``, atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    for stem, group in tensors.items():
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{stem}.safetensors")
        )
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    apply_umask(tmp)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]] | None:
    if not (folder / "state.json").exists():
        old = folder.with_name(folder.name + ".old")  # interrupted between the two renames
        if not (old / "state.json").exists():
            return None
        folder = old
    state = json.loads((folder / "state.json").read_text())
    return state, {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def _batch_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_003 + step)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def encode_captions(pipe, captions: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning of each caption: token states [N, 77, 2*hidden] and pooled [N, projection]."""
    embeds, pooled = [], []
    for i in range(0, len(captions), batch_size):
        e, _, p, _ = pipe.encode_prompt(
            captions[i : i + batch_size], device=pipe.device, do_classifier_free_guidance=False
        )
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def _setup_logging(out: Path) -> None:
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


# ----------------------------------------------------------------------------------------------------
# The two stages
# ----------------------------------------------------------------------------------------------------
def train_vae(vae, images: torch.Tensor, config: PretrainConfig, ckpt: Path, device, resume) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    start = 0
    if resume is not None and resume[0]["stage"] == "vae":
        vae.load_state_dict(resume[1]["vae"])
        _load_optimizer(optimizer, resume[1]["optimizer"])
        start = resume[0]["step"]
    vae.train()
    bar = tqdm(range(start, config.vae_steps), desc="toy vae", initial=start, total=config.vae_steps)
    for step in bar:
        g = _batch_generator(config.seed, 1, step)
        index = torch.randint(len(images), (config.vae_batch_size,), generator=g)
        x = images[index].to(device).float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + config.vae_kl_weight * posterior.kl().mean()
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * _lr_factor(step, config.vae_steps, 50)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        optimizer.step()
        psnr = -10 * math.log10(mse.item() / 4)  # images span 2 units ([-1, 1])
        bar.set_postfix(mse=f"{mse.item():.5f}", psnr=f"{psnr:.1f}")
        done = step + 1
        if done % 50 == 0 or done == config.vae_steps:
            log.info(f"vae step {done}/{config.vae_steps} mse {mse.item():.5f} psnr {psnr:.2f} dB")
        if done % config.checkpoint_every == 0 or done == config.vae_steps:
            stage = "vae" if done < config.vae_steps else "unet"
            save_checkpoint(
                ckpt,
                {"stage": stage, "step": done if stage == "vae" else 0, "config": asdict(config)},
                {"vae": vae.state_dict(), "optimizer": _optimizer_tensors(optimizer)},
            )
    vae.eval()


@torch.no_grad()
def encode_images(
    vae, images: torch.Tensor, device, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean/std of uint8 images [N, 3, H, W] (on the CPU, for drawing batches from)."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="encode latents", leave=False):
        posterior = vae.encode(images[i : i + batch_size].to(device).float() / 127.5 - 1).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def min_snr_loss(pred: torch.Tensor, noise: torch.Tensor, alphas_cumprod_t: torch.Tensor, snr_gamma: float):
    """Epsilon-prediction MSE per sample, min-SNR weighted (Hang et al. 2023), averaged over the batch."""
    per_sample = F.mse_loss(pred, noise, reduction="none").flatten(1).mean(1)
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    return (torch.clamp(snr, max=snr_gamma) / snr * per_sample).mean()


def update_with_ema(
    optimizer, model, ema_model, loss, step: int, lr: float, grad_clip: float, ema_decay: float
):
    """One clipped optimizer step at ``lr``, then the EMA copy follows (decay warms up over the first
    steps)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    with torch.no_grad():
        decay = min(ema_decay, (1 + step) / (10 + step))
        for pe, pm in zip(ema_model.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1 - decay)


def train_unet(pipe, ema_unet, latent_mean, latent_std, caption_ids, cond, config: PretrainConfig,
               ckpt: Path, device, resume, vae_state, evaluate_every=None) -> None:
    from diffusers import DDPMScheduler

    unet = pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=config.weight_decay)
    start = 0
    if resume is not None and resume[0]["stage"] == "unet" and "unet" in resume[1]:
        unet.load_state_dict(resume[1]["unet"])
        ema_unet.load_state_dict(resume[1]["ema_unet"])
        _load_optimizer(optimizer, resume[1]["optimizer"])
        start = resume[0]["step"]
    embeds, pooled = cond
    scale = pipe.vae.config.scaling_factor
    size = data.IMAGE_SIZE
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device)
    unet.train()
    bar = tqdm(range(start, config.unet_steps), desc="toy unet", initial=start, total=config.unet_steps)
    smoothed = None
    for step in bar:
        g = _batch_generator(config.seed, 2, step)
        b = config.unet_batch_size
        index = torch.randint(len(latent_mean), (b,), generator=g)
        z0 = (
            latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=g)
        ) * scale
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        keep = (torch.rand(b, generator=g) >= config.caption_dropout).float()
        z0, noise, t, keep = z0.to(device), noise.to(device), t.to(device), keep.to(device)
        ids = caption_ids[index].to(device)
        # Dropped captions get SDXL's unconditional input: all-zero token states and pooled embedding.
        e = embeds[ids] * keep.view(-1, 1, 1)
        p = pooled[ids] * keep.view(-1, 1)
        zt = noise_scheduler.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=e,
                    added_cond_kwargs={"text_embeds": p, "time_ids": time_ids.expand(b, -1)}).sample
        loss = min_snr_loss(pred, noise, alphas_cumprod[t], config.snr_gamma)
        update_with_ema(
            optimizer,
            unet,
            ema_unet,
            loss,
            step,
            config.unet_lr * _lr_factor(step, config.unet_steps, config.warmup_steps),
            config.grad_clip,
            config.ema_decay,
        )
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}")
        done = step + 1
        if done % 50 == 0 or done == config.unet_steps:
            log.info(
                f"unet step {done}/{config.unet_steps} loss {smoothed:.5f} lr "
                f"{optimizer.param_groups[0]['lr']:.2e}"
            )
        if done % config.checkpoint_every == 0 or done == config.unet_steps:
            save_checkpoint(ckpt, {"stage": "unet" if done < config.unet_steps else "done", "step": done,
                                   "config": asdict(config)},
                            {"vae": vae_state, "unet": unet.state_dict(), "ema_unet": ema_unet.state_dict(),
                             "optimizer": _optimizer_tensors(optimizer)})
        if evaluate_every and done % evaluate_every == 0 and done < config.unet_steps:
            unet.eval()
            _log_accuracy(pipe, ema_unet, config, f"step {done}")
            unet.train()
    unet.eval()


def _log_accuracy(pipe, ema_unet, config: PretrainConfig, label: str) -> dict:
    live = pipe.unet
    pipe.unet = ema_unet
    try:
        result = caption_accuracy(pipe, data.toy_prompts("train", config.eval_prompts, seed=1),
                                  num_steps=DEFAULT_NUM_STEPS, guidance_scale=DEFAULT_GUIDANCE)
    finally:
        pipe.unet = live
    log.info(f"eval {label}: " + json.dumps({k: round(v, 3) for k, v in result["accuracy"].items()}))
    return result


#: Settings a resumed run may change: when it checkpoints and evaluates, not which steps it takes.
BOOKKEEPING_SETTINGS = ("checkpoint_every", "eval_every", "eval_prompts")


def open_run(out: Path, config) -> tuple[Path, tuple[dict, dict] | None]:
    """Create the run folder and its log; return ``(checkpoint folder, saved checkpoint or None)``, refusing a
    checkpoint written with other settings (a resume must take the steps an uninterrupted run would;
    ``BOOKKEEPING_SETTINGS`` may change)."""
    out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out)
    ckpt = out / "checkpoint"
    resume = load_checkpoint(ckpt)
    if resume is not None:
        saved = resume[0]["config"]
        diff = {k: (saved.get(k), v) for k, v in asdict(config).items()
                if saved.get(k) != v and k not in BOOKKEEPING_SETTINGS}
        if diff or saved.keys() != asdict(config).keys():
            raise ValueError(f"{ckpt} was written with other settings (saved, now): {diff}; "
                             "use the same settings or a new --out folder")
    return ckpt, resume


def pretrain(out: str | os.PathLike, config: PretrainConfig | None = None, device: str = "cpu",
             final_samples: bool = True) -> Path:
    """Train toy-sdxl into ``out`` (resuming from ``out/checkpoint`` if present); returns the pipeline folder.

    ``final_samples`` measures the finished model's caption accuracy and writes ``samples.png``.
    """
    config = config or PretrainConfig()
    out = Path(out)
    ckpt, resume = open_run(out, config)
    if resume is not None:
        log.info(f"resuming from {ckpt}: stage {resume[0]['stage']} step {resume[0]['step']}")
    started = time.time()

    pipe = build_toy_pipeline(seed=config.seed).to(device)
    pipe.set_progress_bar_config(disable=True)
    log.info(
        f"toy-sdxl parameters: unet {count_parameters(pipe.unet):,} vae {count_parameters(pipe.vae):,} "
        f"text encoders {count_parameters(pipe.text_encoder):,} + {count_parameters(pipe.text_encoder_2):,}"
    )
    images, captions = data.make_dataset(config.num_images, seed=config.seed, split="train")
    log.info(f"dataset: {len(images)} images, {len(set(captions))} distinct captions")

    if resume is None or resume[0]["stage"] == "vae":
        train_vae(pipe.vae, images, config, ckpt, device, resume)
        resume = load_checkpoint(ckpt)
    else:
        pipe.vae.load_state_dict(resume[1]["vae"])
    pipe.vae.eval()
    vae_state = {k: v.clone() for k, v in pipe.vae.state_dict().items()}

    latent_mean, latent_std = encode_images(pipe.vae, images, device)
    # Unit-variance latents for the UNet, as SD's scaling_factor gives the real VAEs' latents.
    scaling_factor = float(1.0 / latent_mean.std())
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    log.info(f"vae latents {tuple(latent_mean.shape[1:])}, scaling_factor {scaling_factor:.4f}")

    unique = sorted(set(captions))
    lookup = {c: i for i, c in enumerate(unique)}
    caption_ids = torch.tensor([lookup[c] for c in captions])
    cond = encode_captions(pipe, unique)

    ema_unet = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
    if resume[0]["stage"] != "done":
        train_unet(pipe, ema_unet, latent_mean, latent_std, caption_ids, cond, config, ckpt, device, resume,
                   vae_state, evaluate_every=config.eval_every)
    else:
        ema_unet.load_state_dict(resume[1]["ema_unet"])
    elapsed = time.time() - started
    log.info(f"training finished ({elapsed / 60:.1f} min in this process)")

    pipe.unet = ema_unet
    final = write_pipeline(pipe, out, config)
    if final_samples:
        _log_accuracy(pipe, ema_unet, config, "final")
        _save_sample_grid(pipe, out / "samples.png")
    return final


def write_pipeline(pipe, out: Path, config) -> Path:
    """The finished pipeline as ``out/pipeline`` and its settings as ``out/pretrain_config.json``."""
    device = pipe.device
    final = save_pipeline(pipe.to("cpu"), out / "pipeline")
    pipe.to(
        device
    )  # its modules are shared with the caller's pipeline, which goes on sampling on that device
    (out / "pretrain_config.json").write_text(json.dumps(asdict(config), indent=2))
    log.info(f"wrote {final}")
    return final


def export_checkpoint(out: str | os.PathLike, device: str = "cpu") -> Path:
    """Write ``out/pipeline`` from the latest UNet-stage checkpoint's EMA weights (e.g. of a run stopped
    early)."""
    out = Path(out)
    resume = load_checkpoint(out / "checkpoint")
    if resume is None or "ema_unet" not in resume[1]:
        raise FileNotFoundError(f"{out / 'checkpoint'} holds no UNet-stage checkpoint to export")
    state, tensors = resume
    config = PretrainConfig(**state["config"])
    pipe = build_toy_pipeline(seed=config.seed).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.load_state_dict(tensors["vae"])
    pipe.vae.eval()
    images, _ = data.make_dataset(config.num_images, seed=config.seed, split="train")
    latent_mean, _ = encode_images(pipe.vae, images, device)
    pipe.vae.register_to_config(scaling_factor=float(1.0 / latent_mean.std()))
    pipe.unet.load_state_dict(tensors["ema_unet"])
    pipe.unet.eval()
    log.info(f"exporting {out / 'checkpoint'} (stage {state['stage']}, step {state['step']})")
    final = write_pipeline(pipe, out, config)
    _log_accuracy(pipe, pipe.unet, config, f"export of step {state['step']}")
    _save_sample_grid(pipe, out / "samples.png")
    return final


def _save_sample_grid(pipe, path: Path, rows: int = 4, cols: int = 8) -> None:
    prompts = data.toy_prompts("train", rows * cols, seed=2)
    images = sample(pipe, prompts, seeds=list(range(len(prompts))), num_steps=DEFAULT_NUM_STEPS,
                    guidance_scale=DEFAULT_GUIDANCE, eta=1.0).images
    grid = (
        images.view(rows, cols, 3, *images.shape[2:])
        .permute(2, 0, 3, 1, 4)
        .reshape(3, rows * images.shape[2], -1)
    )
    to_pil(grid.unsqueeze(0))[0].resize((grid.shape[2] * 4, grid.shape[1] * 4), 0).save(path)
    (path.with_suffix(".txt")).write_text("\n".join(prompts) + "\n")
