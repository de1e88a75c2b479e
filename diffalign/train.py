"""The trainer: one loop for every method (``diffalign train CONFIG.yaml``, also under ``accelerate launch``).

Top to bottom, :func:`train`:

1. opens and checks the data (nothing loads before the config and the dataset are valid);
2. loads the pipeline, freezes everything but the denoiser and adds LoRA adapters (the reference is
   then the same denoiser with adapters disabled) or keeps a frozen copy for a full fine-tune when the
   method needs one (:func:`load_models`);
3. scores the base model on the held-out evaluation prompts (:mod:`diffalign.evaluation`);
4. trains: the objective of the method's kind (:mod:`diffalign.objectives`) turns a batch into a
   :class:`~diffalign.methods.base.LossOutput`; accelerate does mixed precision, accumulation, data
   parallelism and clipping; :class:`StepCounter` counts skipped (non-finite) updates; checkpoints and
   stop signals are in :mod:`diffalign.run_state`;
5. writes the output stock diffusers loads with a model card (:mod:`diffalign.export`) and the
   before/after evaluation (same prompts, same seeds) next to it.

What differs between model families (prompt encoding, micro-conditioning, frame rules, training noise)
is asked of the family entry (:mod:`diffalign.families`); nothing here branches on the model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from diffalign.config import Config
from diffalign.data import Preprocessing, open_pairs
from diffalign.denoising import FLOW_DEFAULTS
from diffalign.distributed import (
    agree_on_initial_weights,
    check_launch,
    configure_deepspeed,
    enable_fsdp_on_cpu,
    shard_frozen_copy,
    use_cpu,
    whole_denoiser_on_main,
)
from diffalign.evaluation import (
    HeldOutCurve,
    compare_before_after,
    eval_prompts,
    gallery_base_vs_tuned,
    gallery_of_base,
    generate_and_score,
    validate,
)
from diffalign.export import reload_exported_lora, save_full, save_lora, write_model_card
from diffalign.families import family_of
from diffalign.methods import METHODS
from diffalign.models import load_pipeline
from diffalign.objectives import OBJECTIVES, TrainContext
from diffalign.objectives.reward_gradient import open_pretraining_data
from diffalign.parallel import fsdp_blocks, gathered, is_sharded, together
from diffalign.run_state import (
    NonFiniteError,
    TrainingInterrupted,
    all_processes,
    check_resume,
    resume_training,
    save_training_checkpoint,
    sigterm_flag,
)
from diffalign.scorers import make_scorer
from diffalign.winners import open_winners

log = logging.getLogger("diffalign.train")


def train(cfg: Config) -> Path:
    start_time = time.time()
    spec = METHODS[cfg.method.name]
    out = Path(cfg.train.output_dir)
    # 1. the data is opened and checked before any model loads
    source = open_training_data(cfg, spec)
    prep = Preprocessing(cfg.data.resolution, cfg.data.random_crop, cfg.data.random_flip,
                         cfg.data.proportion_empty_prompts, cfg.train.seed)
    if cfg.train.resume:
        check_resume(cfg)
    accelerator, can_checkpoint = make_accelerator(cfg, spec, out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        if source is not None:
            log.info("data: %d pairs from %s", len(source), source.description)

    # 2. models
    pipe, unet, ref_unet, noise, weight_dtype, frames = load_models(cfg, spec, accelerator)
    if frames is not None:  # video pairs / winners: every clip read as `frames` frames
        prep = replace(prep, num_frames=frames, frame_policy=cfg.data.frame_policy)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no trainable parameters: lora.target_modules {cfg.lora.target_modules} "
                         "matched nothing")

    # 3. the base model's held-out evaluation, before any update
    scorers = [make_scorer(name) for name in cfg.eval.scorers] if cfg.eval.enabled else []
    prompts = eval_prompts(cfg) if cfg.eval.enabled else []
    before = None
    if cfg.eval.enabled and accelerator.is_main_process:
        log.info("evaluating the base model on %d prompts x %d seeds", len(prompts), len(cfg.eval.seeds))
        unet.eval()
        before = generate_and_score(pipe, prompts, cfg.eval.seeds, scorers, cfg.eval, out / "eval" / "base")
        if cfg.eval.gallery:
            gallery_of_base(pipe, prompts, scorers, cfg.eval, out / "eval" / "gallery")
        unet.train()

    # 4. optimizer, schedule, objective, accelerate
    lr = cfg.optim.learning_rate
    if cfg.optim.scale_lr:
        lr *= cfg.train.batch_size * cfg.train.gradient_accumulation_steps * accelerator.num_processes
    optimizer = make_optimizer(cfg, params, lr)
    lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer,
                                 num_warmup_steps=cfg.optim.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.train.max_steps * accelerator.num_processes)
    agree_on_initial_weights(accelerator, unet)  # FSDP: LoRA's initialisation, the main process's
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    params = [p for p in unet.parameters() if p.requires_grad]  # FSDP2 replaced them by their shards
    ref_unet = shard_frozen_copy(accelerator, ref_unet)
    if is_sharded(unet):
        log.info("FSDP2: the denoiser is sharded over %d processes in %d blocks%s",
                 accelerator.num_processes, len(fsdp_blocks(unet)),
                 ", and its frozen reference copy too" if ref_unet is not None else "")
    ctx = TrainContext(cfg, spec, accelerator, pipe, family_of(pipe), unet, noise, weight_dtype, ref_unet,
                       source, prep)
    objective = OBJECTIVES[spec.kind](ctx)
    objective_before = evaluate_objective(objective, unet, "before")
    if accelerator.is_main_process and cfg.log.report_to:
        accelerator.init_trackers(cfg.log.project, config=_flat(cfg.to_dict()))
    counter = StepCounter.from_state(resume_training(ctx, optimizer, lr_scheduler, objective))
    curve = HeldOutCurve(out / "eval", before, counter.global_step) \
        if before is not None and cfg.eval.every_n_steps else None

    # 5. train
    log.info("training %s (%s) for %d optimizer steps, lr %.3g; %s", spec.name, cfg.model.finetune,
             cfg.train.max_steps, lr, describe_step(cfg, spec, accelerator.num_processes))
    bar = tqdm(total=cfg.train.max_steps, initial=counter.global_step, desc=f"train {spec.name}", unit="step",
               disable=not (cfg.log.progress_bar and accelerator.is_local_main_process))
    window: dict[str, list[float]] = {}
    last_metrics: dict[str, float] = {}
    batches = objective.batches()
    max_norm = cfg.optim.max_grad_norm or float("inf")  # inf: measure the norm (NaN/inf), clip nothing
    window_ok = True  # every micro-batch of the current accumulation window had a finite loss
    step_start = time.perf_counter()
    with sigterm_flag() as sigterm:
        while counter.global_step < cfg.train.max_steps:
            with accelerator.accumulate(unet):
                # a data, scorer or reward error on one process stops every process, with one message
                batch = together(accelerator, next, batches)
                result = together(accelerator, objective, batch)
                # every process must take the same branch: a backward on some processes only would hang DDP
                if all_processes(accelerator, bool(torch.isfinite(result.loss.detach()).all())):
                    accelerator.backward(result.loss)
                else:
                    window_ok = False
                outcome = "ok"
                if accelerator.sync_gradients:
                    outcome = optimizer_step(accelerator, optimizer, params, max_norm, window_ok)
                    window_ok = True
                lr_scheduler.step()  # a skipped update still advances the schedule: it counts as a step
                optimizer.zero_grad(set_to_none=True)
            values = {"loss": result.loss.detach(), "implicit_acc": result.implicit_acc,
                      "reward_margin": result.reward_margin, **result.extra}
            values = {k: accelerator.reduce(v.detach().float().reshape(()), "mean").item()
                      for k, v in values.items()}
            for k, v in values.items():
                if math.isfinite(v):
                    window.setdefault(k, []).append(v)
            if not accelerator.sync_gradients:
                continue
            step = counter.count(outcome, cfg.train.max_nonfinite_steps)
            # data + forward + backward + update
            window.setdefault("step_time_s", []).append(time.perf_counter() - step_start)
            if hasattr(objective, "on_step_end"):
                objective.on_step_end(step)
            current_lr = lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['implicit_acc']:.2f}",
                            margin=f"{values['reward_margin']:.3g}", lr=f"{current_lr:.2e}")
            if step % cfg.log.every_n_steps == 0 or step == cfg.train.max_steps:
                last_metrics = {k: sum(v) / len(v) for k, v in window.items()}
                last_metrics |= {"lr": current_lr, **counter.skips()}
                window = {}
                log_metrics(accelerator, out, step, last_metrics)
            stop = cfg.checkpoint.on_sigterm and not all_processes(accelerator, not sigterm)
            every = cfg.checkpoint.every_n_steps
            if (stop and can_checkpoint) or (every and step % every == 0):
                folder = save_training_checkpoint(ctx, optimizer, lr_scheduler, objective, counter.state())
            if stop:
                bar.close()
                saved = f"saved {folder}" if can_checkpoint else \
                    "no checkpoint (not supported under DeepSpeed)"
                raise TrainingInterrupted(f"SIGTERM received: {saved} at step {step} of "
                                          f"{cfg.train.max_steps}; continue with --resume latest")
            if cfg.log.validation_every_n_steps and step % cfg.log.validation_every_n_steps == 0:
                # FSDP: every process gathers the weights, the main one samples alone
                with gathered(unet), torch.random.fork_rng(devices=[]):  # no shift of the training draws
                    if accelerator.is_main_process:
                        unet.eval()
                        gallery_means = validate(pipe, cfg, out, step)
                        if gallery_means:
                            accelerator.log(gallery_means, step=step)
                        unet.train()
            if cfg.eval.enabled and cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 \
                    and step < cfg.train.max_steps:
                with gathered(unet), torch.random.fork_rng(devices=[]):  # nor the held-out evaluation
                    if curve is not None:  # the main process's
                        unet.eval()
                        result = generate_and_score(pipe, prompts, cfg.eval.seeds, scorers, cfg.eval, None)
                        log_metrics(accelerator, out, step, curve.add(step, result))
                        unet.train()
            step_start = time.perf_counter()  # logging, checkpoints and evaluations are not step time
    bar.close()
    last_metrics |= report_skips(objective, counter)

    # 6. outputs
    accelerator.wait_for_everyone()
    if hasattr(objective, "final_weights"):
        objective.final_weights()  # e.g. GRPO's EMA of the weights: evaluated and exported, never trained
    objective_after = evaluate_objective(objective, unet, "after") if objective_before is not None else None
    unet = whole_denoiser_on_main(accelerator, pipe, family_of(pipe).denoiser_attr, unet)  # FSDP: unsharded
    if accelerator.is_main_process:
        unet.eval()
        if cfg.model.finetune == "lora":
            save_lora(pipe, unet, out)
            reload_exported_lora(pipe, unet, out)  # the tuned evaluation samples what a user loads
        else:
            save_full(pipe, unet, out)
        evaluation = None
        if before is not None:
            after = generate_and_score(pipe, prompts, cfg.eval.seeds, scorers, cfg.eval,
                                       out / "eval" / "tuned")
            evaluation = compare_before_after(out, prompts, cfg.eval.seeds, before, after,
                                              {"before": objective_before, "after": objective_after})
            if curve is not None:
                log_metrics(accelerator, out, cfg.train.max_steps, curve.add(cfg.train.max_steps, after))
            if cfg.eval.gallery:
                gallery_base_vs_tuned(pipe, prompts, scorers, cfg.eval, out / "eval" / "gallery")
        write_model_card(out, cfg, last_metrics, evaluation, time.time() - start_time)
        log.info("wrote %s", out)
    accelerator.end_training()
    return out


# ----------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------
def open_training_data(cfg: Config, spec):
    """The method's data, opened and checked before any model loads: pairs, winners, or None (online)."""
    if spec.kind == "pairs":
        return open_pairs(cfg.data.source, cfg.data.format, cfg.data.split, cfg.data.max_pairs)
    if spec.kind == "winners":  # SePPO: winning images only (a preference set, or images with prompts)
        return open_winners(cfg.data)
    if spec.kind == "reward_gradient":  # ReFL's pretraining images with captions, or None
        return open_pretraining_data(cfg)
    return None


def make_accelerator(cfg: Config, spec, out: Path) -> tuple[Accelerator, bool]:
    """The run's Accelerator (checked against the launch) and whether our checkpoints work under it."""
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=cfg.log.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        cpu=use_cpu(cfg),
    )
    enable_fsdp_on_cpu(accelerator, cfg.train.mixed_precision)
    check_launch(accelerator, cfg, spec)  # before any model loads
    # Our checkpoints hold the optimizer state of one process: DeepSpeed ZeRO partitions it across processes.
    can_checkpoint = accelerator.distributed_type != DistributedType.DEEPSPEED
    if not can_checkpoint and (cfg.checkpoint.every_n_steps or cfg.train.resume):
        raise NotImplementedError("checkpoints and resume under DeepSpeed are not supported yet (ZeRO "
                                  "partitions the optimizer state across processes): set "
                                  "checkpoint.every_n_steps=0 and train.resume=null, or use DDP "
                                  "(configs/accelerate/multi_gpu.yaml)")
    configure_deepspeed(accelerator, cfg)
    if not accelerator.is_main_process:  # one copy of the log, not one per process
        logging.getLogger("diffalign").setLevel(logging.WARNING)
    return accelerator, can_checkpoint


def load_models(cfg: Config, spec, accelerator):
    """``(pipe, denoiser, frozen reference or None, training noise, weight dtype, frames per clip or None)``.

    Everything but the denoiser is frozen; LoRA adapters are added (trainable weights in fp32), or the
    whole denoiser trains, with a frozen copy when the method needs a reference.
    """
    dtypes = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    weight_dtype = dtypes[cfg.train.mixed_precision]
    with accelerator.main_process_first():  # a built-in tiny model is built once, by the main process
        pipe = load_pipeline(cfg.model.name, dtype="float32", variant=cfg.model.variant, vae=cfg.model.vae,
                             motion_adapter=cfg.model.motion_adapter)
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    frames = video_frames(cfg, pipe, family)
    if frames is not None:
        if cfg.data.cache:
            raise NotImplementedError("data.cache is not supported for video models yet; "
                                      "set data.cache=false")
        log.info("video model (%s): %d frames per clip, frame policy %s", family.name, frames,
                 cfg.data.frame_policy)
    for component in ("vae", "text_encoder", "text_encoder_2", "motion_adapter"):
        if getattr(pipe, component, None) is not None:
            getattr(pipe, component).requires_grad_(False)
    # The VAE stays fp32 (the SDXL VAE overflows in fp16); text encoders run in the compute dtype.
    pipe.to(accelerator.device)
    for component in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is not None:
            getattr(pipe, component).to(dtype=weight_dtype)
    noise = family.make_training_noise(pipe.scheduler.config, **flow_settings(cfg.train))
    unet = getattr(pipe, family.denoiser_attr)  # the UNet or Wan's transformer: "unet" names the denoiser
    # Seeded after loading (building a built-in model on first use draws from the global RNG).
    # Seed + process index: draws from the global RNG (SePPO's noise, dropout) differ across processes; LoRA
    # initialisation needs no agreement (DDP copies the main process's weights), keyed draws ignore it.
    set_seed(cfg.train.seed, device_specific=True)
    ref_unet = None
    if cfg.model.finetune == "lora":
        from diffusers.training_utils import cast_training_params  # heavy: loaded for LoRA runs only

        unet.requires_grad_(False)
        unet.to(dtype=weight_dtype)
        unet.add_adapter(lora_config(unet, cfg.lora))
        cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights stay fp32
    else:
        unet.requires_grad_(True)
        if spec.needs_reference:
            ref_unet = copy.deepcopy(unet).requires_grad_(False).eval().to(dtype=weight_dtype)
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return pipe, unet, ref_unet, noise, weight_dtype, frames


def flow_settings(train) -> dict:
    """The ``train.flow_*`` keys as the noise processes' keywords."""
    return {key: getattr(train, f"flow_{key}") for key in FLOW_DEFAULTS}


def lora_config(denoiser: torch.nn.Module, settings):
    """The peft ``LoraConfig`` for ``settings`` (the config's ``lora`` section) on ``denoiser``.

    AnimateDiff's motion modules call their ``proj_in`` / ``proj_out`` as ``proj_in(input=...)``, which a
    PEFT LoRA layer (``forward(x)``) cannot take: those layers are left out (and said so), whatever the
    target list, so "attention + projections" and all-linear target sets still run.
    """
    from peft import LoraConfig  # heavy: loaded for LoRA runs only

    unusable = [name for name, module in denoiser.named_modules()
                if ".motion_modules." in f".{name}" and name.rsplit(".", 1)[-1] in ("proj_in", "proj_out")
                and isinstance(module, torch.nn.Linear)]
    excluded = [name for name in unusable
                if any(name == t or name.endswith("." + t) for t in settings.target_modules)]
    if excluded:
        log.warning("lora: leaving out %d motion-module proj_in/proj_out layers (diffusers calls them with a "
                    "keyword PEFT's LoRA layer does not take)", len(excluded))
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      init_lora_weights="gaussian" if settings.init == "gaussian" else True,
                      target_modules=list(settings.target_modules), exclude_modules=excluded or None)


def video_frames(cfg: Config, pipe, family) -> int | None:
    """Frames per training video: ``data.num_frames``, else ``eval.num_frames``, else the pipeline's default
    ``num_frames``; None for image families."""
    if not family.video:
        return None
    frames = cfg.data.num_frames or cfg.eval.num_frames or family.default_size(pipe)["num_frames"]
    problem = family.check_frames(frames)
    if problem is not None:
        raise ValueError(f"data.num_frames={frames}: {family.name} needs {problem}")
    return frames


def make_optimizer(cfg: Config, params, lr: float):
    o = cfg.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                                 weight_decay=o.weight_decay)
    if o.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # optional

        return bnb.optim.AdamW8bit(params, lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                                   weight_decay=o.weight_decay)
    from transformers.optimization import Adafactor  # heavy: loaded when asked for

    # The official SDXL Diffusion-DPO run: Adafactor with a fixed lr (no relative step, no scaling).
    return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                     weight_decay=o.weight_decay)


def describe_step(cfg: Config, spec, num_processes: int) -> str:
    """What one optimizer step is, in the method's own terms (for the start-of-run log line)."""
    if spec.kind in ("online", "nft"):
        m = cfg.method
        return (f"each epoch samples {m.num_prompts} prompts x {m.samples_per_prompt} samples per process "
                f"({num_processes} process(es)) and takes {m.gradient_steps_per_epoch} gradient steps on "
                f"them, "
                f"so {math.ceil(cfg.train.max_steps / m.gradient_steps_per_epoch)} epoch(s)")
    total = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * num_processes
    if spec.kind == "reward_gradient":
        return f"{total} prompts (one deterministic chain each) per optimizer step"
    unit = "winning images" if spec.kind == "winners" else "pairs"
    return f"{total} {unit} per optimizer step"


# ----------------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------------
def optimizer_step(accelerator, optimizer, params, max_norm: float, window_ok: bool) -> str:
    """Clip and step at the end of an accumulation window: ``ok``, ``fp16_overflow`` (the loss scaler skips
    the update itself and lowers its scale) or ``nonfinite`` (a NaN/inf loss or gradient: no update)."""
    norm = accelerator.clip_grad_norm_(params, max_norm) if window_ok else None
    grads_ok = window_ok and all_processes(accelerator, norm is None or bool(torch.isfinite(norm)))
    if grads_ok:
        optimizer.step()
        return "ok"
    if window_ok and accelerator.scaler is not None:
        optimizer.step()
        return "fp16_overflow"
    return "nonfinite"


@dataclass
class StepCounter:
    """Optimizer steps taken, and updates skipped for a NaN/inf loss or gradient (all of them, and in a row)
    or for an fp16 loss-scale overflow. Saved in checkpoints as the trainer state."""

    global_step: int = 0
    nonfinite_skipped: int = 0
    nonfinite_in_a_row: int = 0
    fp16_overflow_skipped: int = 0

    @classmethod
    def from_state(cls, state: dict) -> StepCounter:
        return cls(**{k: state.get(k, 0) for k in ("global_step", "nonfinite_skipped", "nonfinite_in_a_row",
                                                   "fp16_overflow_skipped")})

    def state(self) -> dict:
        return dict(vars(self))

    def skips(self) -> dict:
        return {"nonfinite_skipped": self.nonfinite_skipped,
                "fp16_overflow_skipped": self.fp16_overflow_skipped}

    def count(self, outcome: str, max_in_a_row: int) -> int:
        """Count one optimizer step with ``outcome``; raise :class:`NonFiniteError` after ``max_in_a_row``
        non-finite steps in a row. Returns the new step number."""
        self.global_step += 1
        if outcome == "fp16_overflow":  # expected while the loss scale settles: counted, never fatal
            self.fp16_overflow_skipped += 1
        elif outcome == "ok":
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_skipped += 1
            self.nonfinite_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
                        self.global_step, self.nonfinite_in_a_row, self.nonfinite_skipped)
            if self.nonfinite_in_a_row >= max_in_a_row:
                raise NonFiniteError(
                    f"stopped at step {self.global_step}: {self.nonfinite_in_a_row} optimizer steps in a row "
                    f"had a NaN/inf loss or gradient (train.max_nonfinite_steps={max_in_a_row}). The weights "
                    "were never updated with them; try a lower optim.learning_rate, bf16 instead of fp16, "
                    "optim.max_grad_norm, or check the data. Resume from the last checkpoint with "
                    "--resume latest.")
        return self.global_step


def log_metrics(accelerator, out: Path, step: int, metrics: dict) -> None:
    """To the trackers and, from the main process, one line of ``metrics.jsonl``."""
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        with (out / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def evaluate_objective(objective, unet, when: str) -> dict | None:
    """The objective's own evaluation on fixed training data (pair objectives; None for the others)."""
    if not hasattr(objective, "evaluate"):
        return None
    unet.eval()
    result = objective.evaluate()
    unet.train()
    if result is not None:
        log.info("training pairs %s: %s", when, ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    return result


def report_skips(objective, counter: StepCounter) -> dict:
    """Warn about skipped rows and updates at the end of the run; the rows skipped, as a metric."""
    metrics = {}
    bad_rows = getattr(getattr(objective, "batches_of", None), "bad_rows", None)
    if bad_rows is not None and bad_rows.bad:
        log.warning("%s", bad_rows.summary())
        metrics["skipped_rows"] = bad_rows.bad
    if counter.nonfinite_skipped or counter.fp16_overflow_skipped:
        log.warning("skipped %d updates for a non-finite loss or gradient and %d fp16 overflows",
                    counter.nonfinite_skipped, counter.fp16_overflow_skipped)
    return metrics


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat |= _flat(v, f"{prefix}{k}.")
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return flat
