"""The offline pair objective (DPO, MaPO): preference pairs ``[winners..., losers...]``, noise and timestep
drawn once per pair from ``(key, dataset index)`` and shared by its winner and loser; the method's
``pair_loss`` hook turns the per-sample denoising losses into its loss."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffalign.data import (
    BadRowCounter,
    EpochBatches,
    PairSource,
    PreferenceDataset,
    Preprocessing,
    collate_pairs,
)
from diffalign.denoising import denoising_losses, encode_images, keyed_generator, pair_noise, sample_latents
from diffalign.latent_cache import CachedPairs, cache_key, default_cache_dir
from diffalign.methods.base import LossOutput, PairLosses
from diffalign.objectives.context import TrainContext

log = logging.getLogger("diffalign.train")

#: The fixed-draw pair evaluation uses its own seed stream: with the training seed it would replay the
#: first training step's noise and report that step's memorised draws as learning.
EVAL_SEED_OFFSET = 10_007


class PairObjective:
    """Preference pairs ``[winners..., losers...]``; noise and timestep drawn once per pair and shared."""

    def __init__(self, ctx: TrainContext):
        self.ctx = ctx
        cfg = ctx.cfg
        self.dataset = dataset = build_cache(ctx, ctx.source, ctx.prep) if cfg.data.cache \
            else PreferenceDataset(ctx.source, ctx.prep)
        self.batches_of = EpochBatches(
            dataset,
            ctx.accelerator,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            num_workers=cfg.data.num_workers,
            max_bad_fraction=cfg.data.max_bad_fraction,
        )

    def batches(self):
        return iter(self.batches_of)

    def state_dict(self) -> dict:
        return self.batches_of.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches_of.load_state_dict(state)

    def __call__(self, batch) -> LossOutput:
        return pair_loss(
            self.ctx, batch, noise_key=f"train/{self.ctx.cfg.train.seed}/{self.batches_of.epoch}"
        )

    def evaluate(self) -> dict[str, float] | None:
        """The method's objective on the first ``eval.train_pairs`` pairs at fixed draws (None: skipped)."""
        ev, seed = self.ctx.cfg.eval, self.ctx.cfg.train.seed + EVAL_SEED_OFFSET
        if not (ev.enabled and ev.train_pairs):
            return None
        return evaluate_pairs(
            self.ctx, self.dataset, max_pairs=ev.train_pairs, draws=ev.train_pair_draws, seed=seed
        )


def encode_pairs(
    ctx: TrainContext, batch, noise_key: str | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        cond = ctx.family.encode_prompt(ctx.pipe, batch["caption"], device)
    params = torch.cat([params[:, 0], params[:, 1]]).to(device)
    generators = None
    if noise_key is not None:
        generators = [keyed_generator(f"{noise_key}/posterior/{side}/{index}")
                      for side in ("winner", "loser") for index in batch["index"].tolist()]
    latents = sample_latents(vae, params, generators).to(ctx.weight_dtype)
    cond = {k: torch.cat([v, v]).to(device, ctx.weight_dtype) for k, v in cond.items()}
    for key in ctx.family.micro_conditioning:  # SDXL: original size, crop offsets, target size per image
        cond[key] = torch.cat([batch[key][:, 0], batch[key][:, 1]]).to(device, ctx.weight_dtype)
    return latents, cond


def pair_loss(ctx: TrainContext, batch, noise_key: str) -> LossOutput:
    """The method's loss on one batch of pairs; noise and timestep drawn once per pair (see
    :func:`pair_noise`) and shared by its winner and loser."""
    latents, cond = encode_pairs(ctx, batch, noise_key)
    scheduler = ctx.noise_scheduler
    noise, timesteps = pair_noise(
        batch["index"], noise_key, tuple(latents.shape[1:]), scheduler.config.num_train_timesteps
    )
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
                for k, v in {
                    "loss": out.loss,
                    "implicit_acc": out.implicit_acc,
                    "reward_margin": out.reward_margin,
                }.items():
                    totals[k] = totals.get(k, 0.0) + float(v) * n
                count += n
    return {k: v / count for k, v in totals.items()} | {"pairs": len(items), "draws": draws}


def build_cache(ctx: TrainContext, source: PairSource, prep: Preprocessing) -> CachedPairs:
    """Encode every pair's text and images once (or load the cache written by an earlier run)."""
    cfg = ctx.cfg
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    model_id = json.dumps(
        [cfg.model.name, str(getattr(ctx.pipe, "name_or_path", "")), cfg.model.variant, cfg.model.vae]
    )
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
            for k, v in ctx.family.encode_prompt(ctx.pipe, batch["caption"], ctx.device).items():
                parts.setdefault(f"cond.{k}", []).append(v.float().cpu())
        if not parts:
            raise ValueError(f"no readable pairs in {source.description}")
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        empty = {
            f"cond.{k}": v[0].float().cpu()
            for k, v in ctx.family.encode_prompt(ctx.pipe, [""], ctx.device).items()
        }
        CachedPairs.save(
            path, tensors, empty, {"model": model_id, "data": source.description, "prep": prep.key()}
        )
        log.info("cached %d pairs to %s", len(tensors["latent_params"]), path)
        return CachedPairs(tensors, empty, prep)
