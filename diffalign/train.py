"""The trainer: ``diffalign train CONFIG.yaml [dotted.key=value ...]`` (also under ``accelerate launch``).

One loop for every method, top to bottom:

1. read and check the config and the dataset (nothing loads before both are valid);
2. load the pipeline, freeze everything but the UNet, add LoRA adapters (the reference is then the same
   UNet with adapters disabled) or keep a frozen copy for a full fine-tune when the method needs one;
3. score the base model on the held-out evaluation prompts (``eval``);
4. train: the method's *objective* turns a batch into a :class:`~diffalign.methods.LossOutput`;
   accelerate does mixed precision, accumulation, data parallelism, clipping and checkpoints;
5. write the output stock diffusers loads (LoRA folder or pipeline folder) with a model card, and the
   before/after evaluation (same prompts, same seeds) next to it.

An objective is anything with ``batches()`` (an endless iterator of batches) and ``__call__(batch)``
returning a ``LossOutput``. Offline preference methods (``kind="pairs"``) use :class:`PairObjective`;
a method whose :class:`~diffalign.methods.MethodSpec` has a ``build_objective`` (an online method that
samples with :func:`diffalign.sampler.sample` and recomputes log-probs) brings its own, and may also
define ``state_dict``/``load_state_dict`` (saved in checkpoints) and ``on_step_end(step)``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import PartialState

from diffalign.config import Config, load_config
from diffalign.data import (
    BadRowCounter,
    CachedPairs,
    PairSource,
    PreferenceDataset,
    Preprocessing,
    cache_key,
    collate_pairs,
    default_cache_dir,
    open_pairs,
)
from diffalign.distributed import check_launch, configure_deepspeed, use_cpu
from diffalign.methods import METHODS, LossOutput, MethodSpec, PairLosses
from diffalign.sampler import VIDEO_FAMILIES

log = logging.getLogger("diffalign.train")

#: The fixed-draw pair evaluation uses its own seed stream: with the training seed it would replay the
#: first training step's noise and report that step's memorised draws as learning.
EVAL_SEED_OFFSET = 10_007


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------
def unwrap(model):
    """The bare module under DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@dataclass
class TrainContext:
    """What an objective may use. ``reference()`` yields the frozen reference denoiser."""

    cfg: Config
    spec: MethodSpec
    accelerator: object
    pipe: object
    family: object
    unet: torch.nn.Module  # the trained UNet as prepared by accelerate (DDP-wrapped when multi-process)
    noise_scheduler: object
    weight_dtype: torch.dtype
    ref_unet: torch.nn.Module | None = None  # frozen copy (full fine-tune) or None (LoRA / no reference)
    source: PairSource | None = None
    extras: dict = field(default_factory=dict)

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
            raise RuntimeError("no reference model: full fine-tuning keeps a frozen copy only for methods that need one")
        bare = unwrap(self.unet)
        bare.disable_adapters()
        try:
            yield bare
        finally:
            bare.enable_adapters()


def encode_text(pipe, family, captions: list[str], device) -> dict[str, torch.Tensor]:
    """Denoiser text conditioning for ``captions`` (the pipeline's own ``encode_prompt``)."""
    with torch.no_grad():
        if family.name == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds, "text_embeds": pooled}
        if family.name == "wan":
            # 512 tokens as WanPipeline.__call__ (encode_prompt alone defaults to 226): the sampler's conditioning
            embeds, _ = pipe.encode_prompt(prompt=captions, do_classifier_free_guidance=False, max_sequence_length=512,
                                           device=device)
            return {"encoder_hidden_states": embeds}
        # SD 1.x/2.x and AnimateDiff (one embedding per video; the motion UNet call repeats it per frame)
        embeds, _ = pipe.encode_prompt(captions, device, 1, False)
        return {"encoder_hidden_states": embeds}


def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAE posterior parameters (mean and log-variance) of pixels in [-1, 1], in fp32.

    Images [N, 3, H, W] give [N, 2C, h, w]. Videos [N, F, 3, H, W] give [N, 2C, f, h, w]: an image VAE
    (AnimateDiff's) encodes frame by frame (f = F); a video VAE (Wan's causal 3D VAE) encodes the clip
    (f = its temporally compressed length).
    """
    from diffusers import AutoencoderKL

    with torch.no_grad():
        pixels = pixels.to(vae.device, vae.dtype)
        if pixels.ndim == 4:
            return vae.encode(pixels).latent_dist.parameters.float()
        n, f = pixels.shape[:2]
        if isinstance(vae, AutoencoderKL):
            params = vae.encode(pixels.flatten(0, 1)).latent_dist.parameters.float()
            return params.unflatten(0, (n, f)).transpose(1, 2)
        return vae.encode(pixels.transpose(1, 2)).latent_dist.parameters.float()


def sample_latents(vae, params: torch.Tensor, generator=None) -> torch.Tensor:
    """A posterior sample in the denoiser's latent space, normalised the way the pipeline un-normalises it:
    SD/SDXL ``(z - shift) * scaling_factor``; Wan ``(z - latents_mean) / latents_std`` per channel.
    ``generator``: one ``torch.Generator`` per row (or one for all, or None for the global RNG)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    latents = DiagonalGaussianDistribution(params).sample(generator=generator)
    if getattr(vae.config, "latents_mean", None) is not None and getattr(vae.config, "latents_std", None) is not None:
        view = (1, -1) + (1,) * (latents.ndim - 2)
        mean = torch.tensor(vae.config.latents_mean, dtype=latents.dtype, device=latents.device).view(view)
        std = torch.tensor(vae.config.latents_std, dtype=latents.dtype, device=latents.device).view(view)
        return (latents - mean) / std
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@dataclass
class FlowMatchingNoise:
    """The training noise of a flow-matching model (Wan): ``x_t = (1 - σ) x0 + σ ε``, target ``ε - x0``.

    It takes the same integer timestep draws as a DDPM scheduler (``0 <= index < num_train_timesteps``,
    so DPO's keyed per-pair draws stay as they are) and maps them to a sigma of the pipeline's own flow
    schedule (with its shift). ``timestep_sampling``: ``uniform`` takes the index as drawn (uniform over
    the shifted schedule); ``logit_normal`` maps it through the inverse CDF so that ``u = index / N`` is
    distributed as ``sigmoid(N(logit_mean, logit_std))`` (the SD3 training scripts' default).
    """

    scheduler: object  # FlowMatchEulerDiscreteScheduler with the pipeline's shift, full training table
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    @classmethod
    def from_pipeline_config(cls, config: dict, timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                             logit_std: float = 1.0) -> FlowMatchingNoise:
        from diffalign.steps import FlowSDEStep

        if timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown flow timestep sampling {timestep_sampling!r}; expected uniform or logit_normal")
        return cls(FlowSDEStep.make_scheduler(dict(config)), timestep_sampling, logit_mean, logit_std)

    @property
    def config(self):
        return self.scheduler.config

    def sigmas_and_timesteps(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row sigma [N] and the denoiser's timestep [N] (``sigma * num_train_timesteps``) for draws ``index``."""
        n = self.config.num_train_timesteps
        index = index.long().cpu()
        if self.timestep_sampling == "logit_normal":
            u = (index.double() + 0.5) / n
            u = torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(u))
            index = (u * n).long().clamp(0, n - 1)
        return self.scheduler.sigmas[index].float(), self.scheduler.timesteps[index].float()


def denoising_losses(unet, family, scheduler, latents, noise, timesteps, cond) -> torch.Tensor:
    """Per-sample ``mean over (C, [F,] H, W) of (pred - target)^2`` [N] in fp32.

    ``scheduler`` is a diffusers DDPM-family scheduler (epsilon or v-prediction) or a
    :class:`FlowMatchingNoise` (velocity target ``noise - latents``).
    """
    if isinstance(scheduler, FlowMatchingNoise):
        sigmas, model_t = scheduler.sigmas_and_timesteps(timesteps)
        sigmas = sigmas.to(latents.device, latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1 - sigmas) * latents + sigmas * noise
        target = noise.float() - latents.float()
        pred = family.call(unet, noisy, model_t.to(latents.device), cond)
        return (pred.float() - target).pow(2).flatten(1).mean(dim=1)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise NotImplementedError(f"training with prediction_type {scheduler.config.prediction_type!r} is not supported")
    pred = family.call(unet, noisy, timesteps, cond)
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def training_noise(pipe, cfg: Config):
    """The noise process the denoising losses use: the pipeline's flow schedule, or DDPM from its config."""
    from diffusers import DDPMScheduler

    config = dict(pipe.scheduler.config)
    # Wan ships FlowMatchEuler (tiny) or a UniPC config with flow sigmas (Wan-AI/Wan2.1-*-Diffusers).
    if type(pipe.scheduler).__name__.startswith("FlowMatch") or config.get("use_flow_sigmas") \
            or config.get("prediction_type") == "flow_prediction":
        return FlowMatchingNoise.from_pipeline_config(config, cfg.train.flow_timestep_sampling,
                                                      cfg.train.flow_logit_mean, cfg.train.flow_logit_std)
    return DDPMScheduler.from_config(config)


def video_frames(cfg: Config, pipe, family) -> int | None:
    """Frames per training video: ``data.num_frames``, else ``eval.num_frames``, else the pipeline's default
    ``num_frames``; None for image families."""
    import inspect

    if family.name not in VIDEO_FAMILIES:
        return None
    frames = cfg.data.num_frames or cfg.eval.num_frames
    if frames is None:
        frames = inspect.signature(type(pipe).__call__).parameters["num_frames"].default
    if family.name == "wan" and (frames - 1) % 4:
        raise ValueError(f"data.num_frames={frames}: Wan's VAE needs 4k+1 frames (e.g. 5, 9, 17, 81)")
    return frames


# ----------------------------------------------------------------------------------------------------
# The offline pair objective (DPO, MaPO)
# ----------------------------------------------------------------------------------------------------
class PairObjective:
    """Preference pairs ``[winners..., losers...]``; noise and timestep drawn once per pair and shared."""

    def __init__(self, ctx: TrainContext, dataset: torch.utils.data.Dataset):
        from diffalign.data import EpochBatches

        self.ctx = ctx
        cfg = ctx.cfg
        self.batches_of = EpochBatches(dataset, ctx.accelerator, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                       num_workers=cfg.data.num_workers, max_bad_fraction=cfg.data.max_bad_fraction)

    def batches(self):
        return iter(self.batches_of)

    def state_dict(self) -> dict:
        return self.batches_of.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches_of.load_state_dict(state)

    def __call__(self, batch) -> LossOutput:
        return pair_loss(self.ctx, batch, noise_key=f"train/{self.ctx.cfg.train.seed}/{self.batches_of.epoch}")


def encode_pairs(ctx: TrainContext, batch, noise_key: str | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Latents [2B, ...] (winners then losers) and conditioning [2B, ...] for a batch of pairs. With
    ``noise_key`` the VAE posterior samples are drawn from ``(noise_key, side, dataset index)`` (as
    :func:`pair_noise`), not from the global RNG, which every process seeds alike."""
    vae, device = ctx.pipe.vae, ctx.device
    if "latent_params" in batch:  # cached
        params = batch["latent_params"]
        cond = {k[5:]: v for k, v in batch.items() if k.startswith("cond.")}
    else:
        pixels = batch["pixels"]
        params = encode_images(vae, torch.cat([pixels[:, 0], pixels[:, 1]]))
        params = torch.stack(params.chunk(2), dim=1)
        cond = encode_text(ctx.pipe, ctx.family, batch["caption"], device)
    params = torch.cat([params[:, 0], params[:, 1]]).to(device)
    generators = None
    if noise_key is not None:
        generators = [keyed_generator(f"{noise_key}/posterior/{side}/{index}")
                      for side in ("winner", "loser") for index in batch["index"].tolist()]
    latents = sample_latents(vae, params, generators).to(ctx.weight_dtype)
    cond = {k: torch.cat([v, v]).to(device, ctx.weight_dtype) for k, v in cond.items()}
    if ctx.family.name == "sdxl":
        time_ids = batch["time_ids"]
        cond["time_ids"] = torch.cat([time_ids[:, 0], time_ids[:, 1]]).to(device, ctx.weight_dtype)
    return latents, cond


def keyed_generator(key: str) -> torch.Generator:
    """A CPU generator seeded from a hash of ``key``."""
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def pair_noise(indices: torch.Tensor, key: str, shape: tuple[int, ...], num_train_timesteps: int):
    """Noise [N, *shape] (fp32) and timesteps [N] drawn from ``(key, dataset index)`` for each pair.

    Keyed draws make a pair's noise independent of the batch it lands in: one process with batch 2b and
    two with batch b draw the same, and a resumed run draws what an uninterrupted one would.
    """
    noise, timesteps = [], []
    for index in indices.tolist():
        generator = keyed_generator(f"{key}/{index}")
        timesteps.append(int(torch.randint(0, num_train_timesteps, (1,), generator=generator)))
        noise.append(torch.randn(shape, generator=generator))
    return torch.stack(noise), torch.tensor(timesteps, dtype=torch.long)


def pair_loss(ctx: TrainContext, batch, noise_key: str) -> LossOutput:
    """The method's loss on one batch of pairs; noise and timestep drawn once per pair (see
    :func:`pair_noise`) and shared by its winner and loser."""
    latents, cond = encode_pairs(ctx, batch, noise_key)
    scheduler = ctx.noise_scheduler
    noise, timesteps = pair_noise(batch["index"], noise_key, tuple(latents.shape[1:]), scheduler.config.num_train_timesteps)
    noise = torch.cat([noise, noise]).to(latents.device, latents.dtype)
    timesteps = torch.cat([timesteps, timesteps]).to(latents.device)
    model_losses = denoising_losses(ctx.unet, ctx.family, scheduler, latents, noise, timesteps, cond)
    ref_w = ref_l = None
    if ctx.spec.needs_reference:
        with torch.no_grad(), ctx.reference() as ref:
            ref_losses = denoising_losses(ref, ctx.family, scheduler, latents, noise, timesteps, cond)
        ref_w, ref_l = ref_losses.chunk(2)
    model_w, model_l = model_losses.chunk(2)
    pair = PairLosses(model_w, model_l, ref_w, ref_l, scheduler.config.num_train_timesteps)
    return ctx.spec.pair_loss(ctx.cfg.method, pair)



@torch.no_grad()
def evaluate_pairs(ctx: TrainContext, dataset, *, max_pairs: int = 32, draws: int = 4, seed: int = 0,
                   batch_size: int = 16) -> dict[str, float]:
    """The method's loss, implicit accuracy and reward margin on the first ``max_pairs`` pairs of
    ``dataset`` at ``draws`` fixed noise/timestep draws: comparable before and after training."""
    items = [dataset[i] for i in range(min(max_pairs, len(dataset)))]
    totals: dict[str, float] = {}
    count = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the VAE posterior samples
        for draw in range(draws):
            for start in range(0, len(items), batch_size):
                batch = collate_pairs(items[start : start + batch_size])
                if not batch["size"]:
                    continue
                out = pair_loss(ctx, batch, noise_key=f"eval/{seed}/{draw}")
                n = batch["size"]
                for k, v in {"loss": out.loss, "implicit_acc": out.implicit_acc, "reward_margin": out.reward_margin}.items():
                    totals[k] = totals.get(k, 0.0) + float(v) * n
                count += n
    return {k: v / count for k, v in totals.items()} | {"pairs": len(items), "draws": draws}


def build_cache(ctx: TrainContext, source: PairSource, prep: Preprocessing) -> CachedPairs:
    """Encode every pair's text and images once (or load the cache written by an earlier run)."""
    from tqdm.auto import tqdm

    cfg = ctx.cfg
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    model_id = json.dumps([cfg.model.name, str(getattr(ctx.pipe, "name_or_path", "")), cfg.model.variant, cfg.model.vae])
    path = root / f"{cache_key(model_id, source, prep)}.safetensors"
    with ctx.accelerator.main_process_first():
        if path.is_file():
            log.info("using cached text embeddings and latents %s", path)
            return CachedPairs.load(path, prep)
        if not ctx.accelerator.is_main_process:
            raise RuntimeError(f"cache {path} was not written by the main process")
        raw = PreferenceDataset(source, Preprocessing(prep.resolution, False, False, 0.0, prep.seed))
        parts: dict[str, list[torch.Tensor]] = {}
        bad = BadRowCounter(cfg.data.max_bad_fraction)
        step = 16
        for start in tqdm(range(0, len(raw), step), desc="caching latents", unit="batch",
                          disable=not cfg.log.progress_bar):
            batch = collate_pairs([raw[i] for i in range(start, min(start + step, len(raw)))])
            bad.update(batch)
            if not batch["size"]:
                continue
            pixels = batch["pixels"]
            params = encode_images(ctx.pipe.vae, torch.cat([pixels[:, 0], pixels[:, 1]]))
            parts.setdefault("latent_params", []).append(torch.stack(params.chunk(2), dim=1).cpu())
            parts.setdefault("time_ids", []).append(batch["time_ids"])
            for k, v in encode_text(ctx.pipe, ctx.family, batch["caption"], ctx.device).items():
                parts.setdefault(f"cond.{k}", []).append(v.float().cpu())
        if not parts:
            raise ValueError(f"no readable pairs in {source.description}")
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        empty = {f"cond.{k}": v[0].float().cpu() for k, v in encode_text(ctx.pipe, ctx.family, [""], ctx.device).items()}
        CachedPairs.save(path, tensors, empty, {"model": model_id, "data": source.description, "prep": prep.key()})
        log.info("cached %d pairs to %s", len(tensors["latent_params"]), path)
        return CachedPairs(tensors, empty, prep)


# ----------------------------------------------------------------------------------------------------
# Evaluation: same prompts, same seeds, base vs tuned
# ----------------------------------------------------------------------------------------------------
def eval_prompts(cfg: Config) -> list[str]:
    from diffalign.prompts import read_prompts

    if cfg.eval.prompts:
        return list(cfg.eval.prompts)
    if cfg.eval.prompts_file:
        return read_prompts(cfg.eval.prompts_file)
    return list(cfg.log.validation_prompts)


def eval_frames(pipe, ev) -> int | None:
    """``eval.num_frames`` for a video pipeline; None for images or when unset (the pipeline's default)."""
    from diffalign.sampler import family_of

    return ev.num_frames if family_of(pipe).name in VIDEO_FAMILIES and getattr(ev, "num_frames", None) else None


def generate_and_score(pipe, prompts: list[str], seeds: list[int], scorers, ev, out_dir: Path | None) -> dict:
    """Sample every (prompt, seed), save PNGs (videos: animated WebPs) to ``out_dir`` when given, and
    score them (image scorers average over a video's frames)."""
    from diffalign.sampler import sample

    jobs = [(p, s) for p in prompts for s in seeds]
    frames = {} if eval_frames(pipe, ev) is None else {"num_frames": ev.num_frames}
    images = []
    for start in range(0, len(jobs), ev.batch_size):
        chunk = jobs[start : start + ev.batch_size]
        result = sample(pipe, [p for p, _ in chunk], seeds=[s for _, s in chunk], num_steps=ev.num_inference_steps,
                        guidance_scale=ev.guidance_scale, eta=ev.eta, height=ev.height, width=ev.width, **frames)
        images.append(result.images.cpu())
    images = torch.cat(images)
    scores = {s.name: s.score(images, [p for p, _ in jobs]).tolist() for s in scorers}
    if out_dir is not None:
        from diffalign.images import to_pil
        from diffalign.video import save_video

        out_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        media = images if images.ndim == 5 else to_pil(images)
        for i, ((prompt, seed), item) in enumerate(zip(jobs, media, strict=True)):
            if images.ndim == 5:
                file = save_video(item, out_dir / f"{i:04d}", formats=("webp",))[0].name
            else:
                file = f"{i:04d}.png"
                item.save(out_dir / file)
            rows.append({"file": file, "prompt": prompt, "seed": seed,
                         "scores": {name: values[i] for name, values in scores.items()}})
        (out_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"jobs": jobs, "images": images, "scores": scores}


def validation_gallery(pipe, cfg: Config, out_dir: Path, step: int) -> dict[str, float]:
    """A small gallery of the current model (page, scores.csv, summary.json); returns the mean scores to log."""
    from diffalign.gallery import run_gallery

    ev, name = cfg.eval, f"step-{step}"
    summary = run_gallery({name: pipe}, cfg.log.validation_prompts, ev.scorers, out_dir, images_per_prompt=len(ev.seeds),
                          seed=ev.seeds[0], steps=ev.num_inference_steps, guidance=ev.guidance_scale, eta=ev.eta,
                          height=ev.height, width=ev.width, num_frames=eval_frames(pipe, ev), batch_size=ev.batch_size,
                          progress=False)
    means = summary["stats"]["means"].get(name, {})
    return {f"validation/{scorer}": value["mean"] for scorer, value in means.items()}


def image_grid(rows: list[torch.Tensor], path: Path) -> None:
    """Save a grid: one row per tensor batch [N, 3, H, W] (videos [N, F, 3, H, W]: each clip's frames side by side)."""
    from diffalign.images import to_pil

    rows = [torch.cat(r.unbind(1), dim=3) if r.ndim == 5 else r for r in rows]
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    to_pil(grid.unsqueeze(0))[0].save(path)


# ----------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------
def denoiser_attr(pipe) -> str:
    """The pipeline attribute holding the trained denoiser: ``unet``, or ``transformer`` (Wan)."""
    from diffalign.sampler import family_of

    return family_of(pipe).denoiser_attr


def save_lora(pipe, unet, out: Path) -> None:
    """A folder that ``pipe.load_lora_weights(out)`` accepts (diffusers LoRA format, safetensors), written
    by the pipeline's own ``save_lora_weights`` (``unet_lora_layers``, or Wan's ``transformer_lora_layers``)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    bare = unwrap(unet)
    attr = denoiser_attr(pipe)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(bare))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    type(pipe).save_lora_weights(out, safe_serialization=True, **{
        f"{attr}_lora_layers": layers, f"{attr}_lora_adapter_metadata": bare.peft_config["default"].to_dict()})


def save_full(pipe, unet, out: Path) -> None:
    """A pipeline folder with the tuned denoiser (``from_pretrained(out)``; the denoiser alone is
    ``out/unet`` or ``out/transformer``)."""
    attr = denoiser_attr(pipe)
    original = getattr(pipe, attr)
    setattr(pipe, attr, unwrap(unet))
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        setattr(pipe, attr, original)


def write_model_card(out: Path, cfg: Config, metrics: dict, evaluation: dict | None, elapsed_s: float) -> None:
    kind = "LoRA adapters" if cfg.model.finetune == "lora" else "A fully fine-tuned denoiser"
    from diffalign.models import BUILTIN_MODELS

    # A built-in id is not a hub id: the card names the folder it lives in on this machine.
    base = str(BUILTIN_MODELS[cfg.model.name]()) if cfg.model.name in BUILTIN_MODELS else cfg.model.name
    here = str(out)
    if cfg.model.motion_adapter and cfg.model.finetune == "lora":
        imports = "from diffusers import AnimateDiffPipeline, MotionAdapter"
        load = (f"adapter = MotionAdapter.from_pretrained({cfg.model.motion_adapter!r})\n"
                f"pipe = AnimateDiffPipeline.from_pretrained({base!r}, motion_adapter=adapter)\n"
                f"pipe.load_lora_weights({here!r})")
    else:
        imports = "from diffusers import DiffusionPipeline"
        load = (f"pipe = DiffusionPipeline.from_pretrained({base!r})\npipe.load_lora_weights({here!r})"
                if cfg.model.finetune == "lora" else f"pipe = DiffusionPipeline.from_pretrained({here!r})")
    spec = f"{here}:lora" if cfg.model.finetune == "lora" else here
    lines = [
        "---",
        f"base_model: {cfg.model.name}",
        "library_name: diffusers",
        "tags: [diffalign, " + cfg.method.name + ("" if cfg.model.finetune != "lora" else ", lora") + "]",
        "---",
        f"# {cfg.method.name.upper()} on {cfg.model.name}",
        "",
        f"{kind} trained with **{cfg.method.name}** by diffalign on `{cfg.data.source}` "
        f"for {cfg.train.max_steps} steps ({elapsed_s / 60:.1f} min).",
        "",
        "```python",
        imports,
        load,
        "```",
        "",
        f"With diffalign: `diffalign sample --model {spec} --prompt \"...\" --out samples` "
        "(the same spec works for `gallery`, `pairs` and `toy eval`).",
        "",
        "## Final training metrics (mean of the last logging window)",
        "",
        *[f"- {k}: {v:.6g}" for k, v in metrics.items()],
        "",
    ]
    if evaluation:
        lines += ["## Held-out evaluation (same prompts, same seeds)", "",
                  "| scorer | base | tuned | change |", "|---|---|---|---|"]
        for name, row in evaluation["scorers"].items():
            lines.append(f"| {name} | {row['base_mean']:.5g} | {row['tuned_mean']:.5g} | {row['delta']:+.5g} |")
        lines += ["", f"{len(evaluation['prompts'])} prompts x {len(evaluation['seeds'])} seeds; images in `eval/`.", ""]
        pairs = evaluation.get("train_pairs") or {}
        if pairs.get("before") and pairs.get("after"):
            lines += ["## Method objective on training pairs (fixed noise draws)", "",
                      "| | loss | implicit accuracy | reward margin |", "|---|---|---|---|"]
            for when in ("before", "after"):
                m = pairs[when]
                lines.append(f"| {when} | {m['loss']:.5g} | {m['implicit_acc']:.3f} | {m['reward_margin']:.5g} |")
            lines.append("")
    lines += ["## Config", "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# Checkpoints (format and atomic writing: diffalign.checkpoints)
# ----------------------------------------------------------------------------------------------------
def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def save_training_checkpoint(ctx: TrainContext, optimizer, lr_scheduler, objective, trainer_state: dict) -> Path:
    """``checkpoints/checkpoint-<step>``: weights, optimizer, schedule, every process's RNG and objective state."""
    from diffalign.checkpoints import rng_state, save_checkpoint

    cfg = ctx.cfg
    folder = checkpoint_root(cfg) / f"checkpoint-{trainer_state['global_step']}"
    rank_state = {"rng": rng_state(), "objective": objective.state_dict() if hasattr(objective, "state_dict") else None}
    export = (lambda path: save_lora(ctx.pipe, ctx.unet, path)) if cfg.model.finetune == "lora" else None
    save_checkpoint(folder, accelerator=ctx.accelerator, model=unwrap(ctx.unet), optimizer=optimizer,
                    lr_scheduler=lr_scheduler, trainer_state=trainer_state, rank_state=rank_state, export_lora=export,
                    keep_last=cfg.checkpoint.keep_last)
    log.info("saved %s", folder)
    return folder


def resume_training(ctx: TrainContext, optimizer, lr_scheduler, objective) -> dict:
    """Restore the state ``train.resume`` names (exactly: weights, optimizer, schedule, RNG, data position,
    objective); returns the saved trainer state (``{}`` when starting from scratch)."""
    from diffalign.checkpoints import load_checkpoint, resolve_resume, set_rng_state

    folder = resolve_resume(ctx.cfg.train.resume, checkpoint_root(ctx.cfg))
    if folder is None:
        return {}
    trainer_state, rank_state = load_checkpoint(folder, accelerator=ctx.accelerator, model=unwrap(ctx.unet),
                                                optimizer=optimizer, lr_scheduler=lr_scheduler)
    if rank_state.get("objective") is not None and hasattr(objective, "load_state_dict"):
        objective.load_state_dict(rank_state["objective"])
    set_rng_state(rank_state["rng"])
    log.info("resumed from %s at step %d", folder, trainer_state["global_step"])
    return trainer_state


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM (e.g. preemption): a checkpoint was saved and the run stopped."""


def all_processes(accelerator, flag: bool) -> bool:
    """True only if ``flag`` holds on every process (one small all-reduce), so processes decide alike."""
    count = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum")
    return int(count.item()) == accelerator.num_processes


@contextlib.contextmanager
def sigterm_flag():
    """Yield a list that becomes non-empty when SIGTERM arrives (the handler only records it)."""
    import signal
    import threading

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------
def make_optimizer(cfg: Config, params, lr: float):
    o = cfg.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                                 weight_decay=o.weight_decay)
    if o.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                                   weight_decay=o.weight_decay)
    from transformers.optimization import Adafactor

    # The official SDXL Diffusion-DPO run: Adafactor with a fixed lr (no relative step, no scaling).
    return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                     weight_decay=o.weight_decay)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------
def train(cfg: Config) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from diffalign.models import load_pipeline
    from diffalign.sampler import family_of
    from diffalign.scorers import make_scorer

    start_time = time.time()
    spec = METHODS[cfg.method.name]
    out = Path(cfg.train.output_dir)
    # 1. the data is opened and checked before any model loads
    source = open_pairs(cfg.data.source, cfg.data.format, cfg.data.split, cfg.data.max_pairs) if spec.kind == "pairs" else None
    if spec.kind == "winners":  # SePPO: winning images only (a preference set, or images with prompts)
        from diffalign.seppo_pool import open_winners

        source = open_winners(cfg.data)
    prep = Preprocessing(cfg.data.resolution, cfg.data.random_crop, cfg.data.random_flip,
                         cfg.data.proportion_empty_prompts, cfg.train.seed)

    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=cfg.log.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        cpu=use_cpu(cfg),
    )
    check_launch(accelerator, cfg, spec)  # before any model loads
    # Our checkpoints hold the optimizer state of one process: DeepSpeed ZeRO partitions it across processes.
    can_checkpoint = accelerator.distributed_type != DistributedType.DEEPSPEED
    if not can_checkpoint and (cfg.checkpoint.every_n_steps or cfg.train.resume):
        raise NotImplementedError("checkpoints and resume under DeepSpeed are not supported yet (ZeRO partitions the "
                                  "optimizer state across processes): set checkpoint.every_n_steps=0 and "
                                  "train.resume=null, or use DDP (configs/accelerate/multi_gpu.yaml)")
    configure_deepspeed(accelerator, cfg)
    if not accelerator.is_main_process:  # one copy of the log, not one per process
        logging.getLogger("diffalign").setLevel(logging.WARNING)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        if source is not None:
            log.info("data: %d pairs from %s", len(source), source.description)

    # 2. models
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.mixed_precision]
    with accelerator.main_process_first():  # a built-in tiny model is built once, by the main process
        pipe = load_pipeline(cfg.model.name, dtype="float32", variant=cfg.model.variant, vae=cfg.model.vae,
                             motion_adapter=cfg.model.motion_adapter)
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    frames = video_frames(cfg, pipe, family)
    if frames is not None:  # video pairs / winners: every clip read as `frames` frames
        if cfg.data.cache:
            raise NotImplementedError("data.cache is not supported for video models yet; set data.cache=false")
        prep = replace(prep, num_frames=frames, frame_policy=cfg.data.frame_policy)
        log.info("video model (%s): %d frames per clip, frame policy %s", family.name, frames, cfg.data.frame_policy)
    for component in ("vae", "text_encoder", "text_encoder_2", "motion_adapter"):
        if getattr(pipe, component, None) is not None:
            getattr(pipe, component).requires_grad_(False)
    # The VAE stays fp32 (the SDXL VAE overflows in fp16); text encoders run in the compute dtype.
    pipe.to(accelerator.device)
    for component in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is not None:
            getattr(pipe, component).to(dtype=weight_dtype)
    noise_scheduler = training_noise(pipe, cfg)
    unet = getattr(pipe, family.denoiser_attr)  # the UNet, or Wan's transformer: "unet" names the denoiser below
    # Seeded after loading (building a built-in model on first use draws from the global RNG).
    # Seed + process index: draws from the global RNG (SePPO's noise, dropout) differ across processes; LoRA
    # initialisation needs no agreement (DDP copies the main process's weights), keyed draws ignore it.
    set_seed(cfg.train.seed, device_specific=True)
    ref_unet = None
    if cfg.model.finetune == "lora":
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(dtype=weight_dtype)
        unet.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                    init_lora_weights="gaussian" if cfg.lora.init == "gaussian" else True,
                                    target_modules=cfg.lora.target_modules))
        cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights stay fp32
    else:
        unet.requires_grad_(True)
        if spec.needs_reference:
            ref_unet = copy.deepcopy(unet).requires_grad_(False).eval().to(dtype=weight_dtype)
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no trainable parameters: lora.target_modules {cfg.lora.target_modules} matched nothing")

    # 3. the base model's held-out evaluation, before any update
    scorers = [make_scorer(name) for name in cfg.eval.scorers] if cfg.eval.enabled else []
    prompts = eval_prompts(cfg) if cfg.eval.enabled else []
    before = None
    if cfg.eval.enabled and accelerator.is_main_process:
        log.info("evaluating the base model on %d prompts x %d seeds", len(prompts), len(cfg.eval.seeds))
        unet.eval()
        before = generate_and_score(pipe, prompts, cfg.eval.seeds, scorers, cfg.eval, out / "eval" / "base")
        unet.train()

    # 4. optimizer, schedule, data, accelerate
    lr = cfg.optim.learning_rate
    if cfg.optim.scale_lr:
        lr *= cfg.train.batch_size * cfg.train.gradient_accumulation_steps * accelerator.num_processes
    optimizer = make_optimizer(cfg, params, lr)
    lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer,
                                 num_warmup_steps=cfg.optim.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.train.max_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ctx = TrainContext(cfg, spec, accelerator, pipe, family, unet, noise_scheduler, weight_dtype, ref_unet, source)
    if spec.kind == "pairs":
        dataset = build_cache(ctx, source, prep) if cfg.data.cache else PreferenceDataset(source, prep)
        objective = PairObjective(ctx, dataset)
    elif spec.build_objective is not None:
        objective = spec.build_objective(ctx)
    else:
        raise NotImplementedError(f"method {spec.name!r} (kind {spec.kind!r}) has no objective for the trainer")
    pairs_before = None
    if spec.kind == "pairs" and cfg.eval.enabled and cfg.eval.train_pairs:
        unet.eval()
        pairs_before = evaluate_pairs(ctx, dataset, max_pairs=cfg.eval.train_pairs, draws=cfg.eval.train_pair_draws,
                                      seed=cfg.train.seed + EVAL_SEED_OFFSET)
        unet.train()
        log.info("training pairs before: %s", _fmt(pairs_before))
    if accelerator.is_main_process and cfg.log.report_to:
        accelerator.init_trackers(cfg.log.project, config=_flat(cfg.to_dict()))

    resumed = resume_training(ctx, optimizer, lr_scheduler, objective)
    global_step = resumed.get("global_step", 0)
    skipped = resumed.get("nonfinite_skipped", 0)  # optimizer steps skipped for a NaN/inf loss or gradient
    in_a_row = resumed.get("nonfinite_in_a_row", 0)
    overflows = resumed.get("fp16_overflow_skipped", 0)  # fp16 loss-scale overflows (the scaler skips those)

    # 5. train
    total_batch = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * accelerator.num_processes
    log.info("training %s (%s) for %d steps, %d pairs per step, lr %.3g", spec.name, cfg.model.finetune,
             cfg.train.max_steps, total_batch, lr)
    bar = tqdm(total=cfg.train.max_steps, initial=global_step, desc=f"train {spec.name}", unit="step",
               disable=not (cfg.log.progress_bar and accelerator.is_local_main_process))
    window: dict[str, list[float]] = {}
    last_metrics: dict[str, float] = {}
    metrics_file = out / "metrics.jsonl"
    batches = objective.batches()
    max_norm = cfg.optim.max_grad_norm or float("inf")  # inf: measure the norm (to catch NaN/inf), clip nothing
    window_ok = True  # every micro-batch of the current accumulation window had a finite loss
    step_start = time.perf_counter()
    with sigterm_flag() as sigterm:
        while global_step < cfg.train.max_steps:
            batch = next(batches)
            with accelerator.accumulate(unet):
                result = objective(batch)
                # every process must take the same branch: a backward on some processes only would hang DDP
                if all_processes(accelerator, bool(torch.isfinite(result.loss.detach()).all())):
                    accelerator.backward(result.loss)
                else:
                    window_ok = False
                outcome = "ok"
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(params, max_norm) if window_ok else None
                    grads_ok = window_ok and all_processes(accelerator, norm is None or bool(torch.isfinite(norm)))
                    if grads_ok:
                        optimizer.step()
                        outcome = "ok"
                    elif window_ok and accelerator.scaler is not None:
                        optimizer.step()  # fp16: the loss scaler skips this update itself and lowers its scale
                        outcome = "fp16_overflow"
                    else:
                        outcome = "nonfinite"
                    window_ok = True
                lr_scheduler.step()  # a skipped update still advances the schedule: it counts as a step
                optimizer.zero_grad(set_to_none=True)
            values = {"loss": result.loss.detach(), "implicit_acc": result.implicit_acc,
                      "reward_margin": result.reward_margin, **result.extra}
            values = {k: accelerator.reduce(v.detach().float().reshape(()), "mean").item() for k, v in values.items()}
            for k, v in values.items():
                if math.isfinite(v):
                    window.setdefault(k, []).append(v)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if outcome == "fp16_overflow":  # expected while the loss scale settles: counted, never fatal
                overflows += 1
            elif outcome == "ok":
                in_a_row = 0
            else:
                skipped, in_a_row = skipped + 1, in_a_row + 1
                log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
                            global_step, in_a_row, skipped)
                if in_a_row >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"stopped at step {global_step}: {in_a_row} optimizer steps in a row had a NaN/inf loss or "
                        f"gradient (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}). The weights were never "
                        "updated with them; try a lower optim.learning_rate, bf16 instead of fp16, optim.max_grad_norm, "
                        "or check the data. Resume from the last checkpoint with --resume latest.")
            now = time.perf_counter()
            window.setdefault("step_time_s", []).append(now - step_start)  # data + forward + backward + update
            if hasattr(objective, "on_step_end"):
                objective.on_step_end(global_step)
            current_lr = lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['implicit_acc']:.2f}",
                            margin=f"{values['reward_margin']:.3g}", lr=f"{current_lr:.2e}")
            if global_step % cfg.log.every_n_steps == 0 or global_step == cfg.train.max_steps:
                last_metrics = {k: sum(v) / len(v) for k, v in window.items()} | {
                    "lr": current_lr, "nonfinite_skipped": skipped, "fp16_overflow_skipped": overflows}
                window = {}
                accelerator.log(last_metrics, step=global_step)
                if accelerator.is_main_process:
                    with metrics_file.open("a", encoding="utf-8") as f:
                        f.write(json.dumps({"step": global_step, **last_metrics}) + "\n")
            trainer_state = {"global_step": global_step, "nonfinite_skipped": skipped, "nonfinite_in_a_row": in_a_row,
                             "fp16_overflow_skipped": overflows}
            stop = cfg.checkpoint.on_sigterm and not all_processes(accelerator, not sigterm)
            if (stop and can_checkpoint) or (cfg.checkpoint.every_n_steps and global_step % cfg.checkpoint.every_n_steps == 0):
                folder = save_training_checkpoint(ctx, optimizer, lr_scheduler, objective, trainer_state)
            if stop:
                bar.close()
                saved = f"saved {folder}" if can_checkpoint else "no checkpoint (not supported under DeepSpeed)"
                raise TrainingInterrupted(f"SIGTERM received: {saved} at step {global_step} of "
                                          f"{cfg.train.max_steps}; continue with --resume latest")
            if cfg.log.validation_every_n_steps and global_step % cfg.log.validation_every_n_steps == 0 \
                    and accelerator.is_main_process:
                with torch.random.fork_rng(devices=[]):  # validation must not shift the training draws
                    unet.eval()
                    result_v = generate_and_score(pipe, cfg.log.validation_prompts, cfg.eval.seeds[:1], [], cfg.eval, None)
                    (out / "validation").mkdir(exist_ok=True)
                    image_grid([result_v["images"]], out / "validation" / f"step-{global_step:06d}.png")
                    if cfg.log.validation_gallery:
                        accelerator.log(validation_gallery(pipe, cfg, out / "validation" / f"gallery-step-{global_step:06d}",
                                                           global_step), step=global_step)
                    unet.train()
            step_start = time.perf_counter()  # logging, checkpoints and validation are not step time
    bar.close()
    bad_rows = getattr(getattr(objective, "batches_of", None), "bad_rows", None)
    if bad_rows is not None and bad_rows.bad:
        log.warning("%s", bad_rows.summary())
        last_metrics["skipped_rows"] = bad_rows.bad
    if skipped or overflows:
        log.warning("skipped %d updates for a non-finite loss or gradient and %d fp16 overflows", skipped, overflows)

    # 6. outputs
    accelerator.wait_for_everyone()
    evaluation = None
    pairs_after = None
    if pairs_before is not None:
        unet.eval()
        pairs_after = evaluate_pairs(ctx, dataset, max_pairs=cfg.eval.train_pairs, draws=cfg.eval.train_pair_draws,
                                     seed=cfg.train.seed + EVAL_SEED_OFFSET)
        log.info("training pairs after:  %s", _fmt(pairs_after))
    if accelerator.is_main_process:
        unet.eval()
        if cfg.model.finetune == "lora":
            save_lora(pipe, unet, out)
        else:
            save_full(pipe, unet, out)
        if before is not None:
            after = generate_and_score(pipe, prompts, cfg.eval.seeds, scorers, cfg.eval, out / "eval" / "tuned")
            evaluation = {"prompts": prompts, "seeds": cfg.eval.seeds, "scorers": {},
                          "train_pairs": {"before": pairs_before, "after": pairs_after}}
            for name in before["scores"]:
                b, a = before["scores"][name], after["scores"][name]
                evaluation["scorers"][name] = {"base_mean": sum(b) / len(b), "tuned_mean": sum(a) / len(a),
                                               "delta": (sum(a) - sum(b)) / len(a), "base": b, "tuned": a}
            (out / "eval" / "scores.json").write_text(json.dumps(evaluation, indent=1))
            image_grid([before["images"], after["images"]], out / "eval" / "base_vs_tuned.png")
            for name, row in evaluation["scorers"].items():
                log.info("held-out %s: base %.5g -> tuned %.5g (%+.5g)", name, row["base_mean"], row["tuned_mean"], row["delta"])
        write_model_card(out, cfg, last_metrics, evaluation, time.time() - start_time)
        log.info("wrote %s", out)
    accelerator.end_training()
    return out


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat |= _flat(v, f"{prefix}{k}.")
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return flat


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train with a YAML config (DPO, MaPO, ...)",
                              description="Train with a YAML config; override any key with dotted.key=value.")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.max_steps=10 optim.learning_rate=1e-5")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (same as train.resume=...)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_run)


def _run(args) -> None:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(cfg.to_yaml())
        return
    out = train(cfg)
    if PartialState().is_main_process:  # one line per run, not one per process
        print(f"wrote {out}")
