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
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
from diffalign.methods import METHODS, LossOutput, MethodSpec, PairLosses

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
        embeds, _ = pipe.encode_prompt(captions, device, 1, False)
        return {"encoder_hidden_states": embeds}


def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAE posterior parameters (mean and log-variance) [N, 2C, h, w] of pixels in [-1, 1], in fp32."""
    with torch.no_grad():
        return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters.float()


def sample_latents(vae, params: torch.Tensor) -> torch.Tensor:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    latents = DiagonalGaussianDistribution(params).sample()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def denoising_losses(unet, family, scheduler, latents, noise, timesteps, cond) -> torch.Tensor:
    """Per-sample ``mean over (C,H,W) of (pred - target)^2`` [N] in fp32."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise NotImplementedError(f"training with prediction_type {scheduler.config.prediction_type!r} is not supported")
    pred = family.call(unet, noisy, timesteps, cond)
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


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


def encode_pairs(ctx: TrainContext, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Latents [2B, ...] (winners then losers) and conditioning [2B, ...] for a batch of pairs."""
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
    latents = sample_latents(vae, params).to(ctx.weight_dtype)
    cond = {k: torch.cat([v, v]).to(device, ctx.weight_dtype) for k, v in cond.items()}
    if ctx.family.name == "sdxl":
        time_ids = batch["time_ids"]
        cond["time_ids"] = torch.cat([time_ids[:, 0], time_ids[:, 1]]).to(device, ctx.weight_dtype)
    return latents, cond


def pair_noise(indices: torch.Tensor, key: str, shape: tuple[int, ...], num_train_timesteps: int):
    """Noise [N, *shape] (fp32) and timesteps [N] drawn from ``(key, dataset index)`` for each pair.

    Keyed draws make a pair's noise independent of the batch it lands in: one process with batch 2b and
    two with batch b draw the same, and a resumed run draws what an uninterrupted one would.
    """
    noise, timesteps = [], []
    for index in indices.tolist():
        digest = hashlib.sha256(f"{key}/{index}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        timesteps.append(int(torch.randint(0, num_train_timesteps, (1,), generator=generator)))
        noise.append(torch.randn(shape, generator=generator))
    return torch.stack(noise), torch.tensor(timesteps, dtype=torch.long)


def pair_loss(ctx: TrainContext, batch, noise_key: str) -> LossOutput:
    """The method's loss on one batch of pairs; noise and timestep drawn once per pair (see
    :func:`pair_noise`) and shared by its winner and loser."""
    latents, cond = encode_pairs(ctx, batch)
    b = latents.shape[0] // 2
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


def generate_and_score(pipe, prompts: list[str], seeds: list[int], scorers, ev, out_dir: Path | None) -> dict:
    """Sample every (prompt, seed), save PNGs to ``out_dir`` (when given), and score them."""
    from diffalign.sampler import sample

    jobs = [(p, s) for p in prompts for s in seeds]
    images = []
    for start in range(0, len(jobs), ev.batch_size):
        chunk = jobs[start : start + ev.batch_size]
        result = sample(pipe, [p for p, _ in chunk], seeds=[s for _, s in chunk], num_steps=ev.num_inference_steps,
                        guidance_scale=ev.guidance_scale, eta=ev.eta, height=ev.height, width=ev.width)
        images.append(result.images.cpu())
    images = torch.cat(images)
    scores = {s.name: s.score(images, [p for p, _ in jobs]).tolist() for s in scorers}
    if out_dir is not None:
        from diffalign.images import to_pil

        out_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, ((prompt, seed), image) in enumerate(zip(jobs, to_pil(images), strict=True)):
            image.save(out_dir / f"{i:04d}.png")
            rows.append({"file": f"{i:04d}.png", "prompt": prompt, "seed": seed,
                         "scores": {name: values[i] for name, values in scores.items()}})
        (out_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"jobs": jobs, "images": images, "scores": scores}


def validation_gallery(pipe, cfg: Config, out_dir: Path, step: int) -> dict[str, float]:
    """A small gallery of the current model (page, scores.csv, summary.json); returns the mean scores to log."""
    from diffalign.gallery import run_gallery

    ev, name = cfg.eval, f"step-{step}"
    summary = run_gallery({name: pipe}, cfg.log.validation_prompts, ev.scorers, out_dir, images_per_prompt=len(ev.seeds),
                          seed=ev.seeds[0], steps=ev.num_inference_steps, guidance=ev.guidance_scale, eta=ev.eta,
                          height=ev.height, width=ev.width, batch_size=ev.batch_size, progress=False)
    means = summary["stats"]["means"].get(name, {})
    return {f"validation/{scorer}": value["mean"] for scorer, value in means.items()}


def image_grid(rows: list[torch.Tensor], path: Path) -> None:
    """Save a grid: one row per tensor batch [N, 3, H, W]."""
    from diffalign.images import to_pil

    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    to_pil(grid.unsqueeze(0))[0].save(path)


# ----------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------
def save_lora(pipe, unet, out: Path) -> None:
    """A folder that ``pipe.load_lora_weights(out)`` accepts (diffusers LoRA format, safetensors)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    bare = unwrap(unet)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(bare))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    type(pipe).save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True,
                                 unet_lora_adapter_metadata=bare.peft_config["default"].to_dict())


def save_full(pipe, unet, out: Path) -> None:
    """A pipeline folder with the tuned UNet (``from_pretrained(out)``; the UNet alone is ``out/unet``)."""
    trained = unwrap(unet)
    original = pipe.unet
    pipe.unet = trained
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        pipe.unet = original


def write_model_card(out: Path, cfg: Config, metrics: dict, evaluation: dict | None, elapsed_s: float) -> None:
    kind = "LoRA adapters" if cfg.model.finetune == "lora" else "A fully fine-tuned UNet"
    load = ("pipe = DiffusionPipeline.from_pretrained(BASE)\npipe.load_lora_weights(THIS_FOLDER)"
            if cfg.model.finetune == "lora" else "pipe = DiffusionPipeline.from_pretrained(THIS_FOLDER)")
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
        "from diffusers import DiffusionPipeline",
        load,
        "```",
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
# Checkpoints
# ----------------------------------------------------------------------------------------------------
def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def find_checkpoint(cfg: Config) -> Path | None:
    """The folder ``train.resume`` names: 'latest' is the highest-numbered complete checkpoint."""
    if cfg.train.resume is None:
        return None
    if cfg.train.resume != "latest":
        return Path(cfg.train.resume)
    done = [p for p in checkpoint_root(cfg).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    if not done:
        log.info("no checkpoint in %s: starting from scratch", checkpoint_root(cfg))
        return None
    return max(done, key=lambda p: int(p.name.split("-")[1]))


def _register_checkpoint_hooks(accelerator, cfg: Config, pipe) -> None:
    """Checkpoint the UNet as what it is: LoRA layers (diffusers format) or a UNet folder."""
    from diffusers import UNet2DConditionModel

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                if cfg.model.finetune == "lora":
                    save_lora(pipe, model, Path(output_dir))
                else:
                    unwrap(model).save_pretrained(Path(output_dir) / "unet", safe_serialization=True)
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        from peft.utils import set_peft_model_state_dict

        while models:
            model = unwrap(models.pop())
            if cfg.model.finetune == "lora":
                state, _ = type(pipe).lora_state_dict(input_dir)
                state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
                from diffusers.utils import convert_unet_state_dict_to_peft

                result = set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(state), adapter_name="default")
                if getattr(result, "unexpected_keys", None):
                    raise ValueError(f"checkpoint {input_dir} has unexpected LoRA keys: {result.unexpected_keys[:5]}")
            else:
                loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
                model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, cfg: Config, step: int, objective) -> Path:
    path = checkpoint_root(cfg) / f"checkpoint-{step}"
    accelerator.save_state(str(path), safe_serialization=True)
    if accelerator.is_main_process:
        state = {"global_step": step}
        if hasattr(objective, "state_dict"):
            state["objective"] = objective.state_dict()
        # Written last: its presence marks the checkpoint complete.
        (path / "trainer_state.json").write_text(json.dumps(state))
        if cfg.checkpoint.keep_last:
            done = sorted((p for p in checkpoint_root(cfg).glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                          key=lambda p: int(p.name.split("-")[1]))
            for old in done[: -cfg.checkpoint.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    return path


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
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
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
        cpu=cfg.train.device == "cpu",
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        if source is not None:
            log.info("data: %d pairs from %s", len(source), source.description)
    set_seed(cfg.train.seed)

    # 2. models
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.train.mixed_precision]
    pipe = load_pipeline(cfg.model.name, dtype="float32", variant=cfg.model.variant, vae=cfg.model.vae)
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    for component in ("vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is not None:
            getattr(pipe, component).requires_grad_(False)
    # The VAE stays fp32 (the SDXL VAE overflows in fp16); text encoders run in the compute dtype.
    pipe.to(accelerator.device)
    for component in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is not None:
            getattr(pipe, component).to(dtype=weight_dtype)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet = pipe.unet
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
    _register_checkpoint_hooks(accelerator, cfg, pipe)
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

    global_step = 0
    checkpoint = find_checkpoint(cfg)
    if checkpoint is not None:
        if not (checkpoint / "trainer_state.json").is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} is incomplete or not a diffalign checkpoint "
                                    "(no trainer_state.json)")
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        global_step = state["global_step"]
        if "objective" in state and hasattr(objective, "load_state_dict"):
            objective.load_state_dict(state["objective"])
        log.info("resumed from %s at step %d", checkpoint, global_step)

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
    step_start = time.perf_counter()
    while global_step < cfg.train.max_steps:
        batch = next(batches)
        with accelerator.accumulate(unet):
            result = objective(batch)
            accelerator.backward(result.loss)
            if accelerator.sync_gradients and cfg.optim.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        values = {"loss": result.loss.detach(), "implicit_acc": result.implicit_acc, "reward_margin": result.reward_margin,
                  **result.extra}
        values = {k: accelerator.reduce(v.detach().float().reshape(()), "mean").item() for k, v in values.items()}
        for k, v in values.items():
            window.setdefault(k, []).append(v)
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        now = time.perf_counter()
        window.setdefault("step_time_s", []).append(now - step_start)  # data + forward + backward + update
        if hasattr(objective, "on_step_end"):
            objective.on_step_end(global_step)
        current_lr = lr_scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['implicit_acc']:.2f}",
                        margin=f"{values['reward_margin']:.3g}", lr=f"{current_lr:.2e}")
        if global_step % cfg.log.every_n_steps == 0 or global_step == cfg.train.max_steps:
            last_metrics = {k: sum(v) / len(v) for k, v in window.items()} | {"lr": current_lr}
            window = {}
            accelerator.log(last_metrics, step=global_step)
            if accelerator.is_main_process:
                with metrics_file.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": global_step, **last_metrics}) + "\n")
        if cfg.checkpoint.every_n_steps and global_step % cfg.checkpoint.every_n_steps == 0:
            save_checkpoint(accelerator, cfg, global_step, objective)
        if cfg.log.validation_every_n_steps and global_step % cfg.log.validation_every_n_steps == 0 \
                and accelerator.is_main_process:
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
    print(f"wrote {out}")
