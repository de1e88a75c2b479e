"""The trainer's checkpoint glue (format and atomic writing: :mod:`diffalign.checkpoints`), its stop
signals (SIGTERM, too many non-finite steps) and the all-process agreement they need."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path

import torch

from diffalign.checkpoints import (
    load_checkpoint,
    read_trainer_state,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from diffalign.config import Config
from diffalign.export import save_lora
from diffalign.models import LORA_WEIGHTS_FILE
from diffalign.objectives.context import TrainContext, unwrap
from diffalign.parallel import is_sharded, whole_optimizer_state, whole_trainable

log = logging.getLogger("diffalign.train")


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def save_training_checkpoint(
    ctx: TrainContext, optimizer, lr_scheduler, objective, trainer_state: dict
) -> Path:
    """``checkpoints/checkpoint-<step>``: weights, optimizer, schedule, every process's RNG and objective
    state."""
    cfg = ctx.cfg
    folder = checkpoint_root(cfg) / f"checkpoint-{trainer_state['global_step']}"
    rank_state = {
        "rng": rng_state(),
        "objective": objective.state_dict() if hasattr(objective, "state_dict") else None,
    }
    model = unwrap(ctx.unet)
    # FSDP: the weights (as the shards hold them: fp32 masters under mixed precision) and the optimizer
    # state (by parameter name) gathered whole
    weights = whole_trainable(model)
    optimizer_state = whole_optimizer_state(model, optimizer) if is_sharded(model) else None
    lora = cfg.model.finetune == "lora"
    export = (lambda path: save_lora(ctx.pipe, ctx.unet, path, weights)) if lora else None
    save_checkpoint(
        folder,
        accelerator=ctx.accelerator,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        trainer_state=trainer_state,
        rank_state=rank_state,
        export_lora=export,
        keep_last=cfg.checkpoint.keep_last,
        weights=weights,
        optimizer_state=optimizer_state,
    )
    log.info("saved %s", folder)
    return folder


def finished_output(out: Path) -> Path | None:
    """The final weights a finished run wrote in ``out`` (they are written only at its very end)."""
    for name in (LORA_WEIGHTS_FILE, "model_index.json"):
        if (out / name).is_file():
            return out / name
    return None


def check_resume(cfg: Config) -> None:
    """What ``train.resume`` will do, said before anything loads.

    A checkpoint to continue from: continue (also past a finished run's end when ``train.max_steps`` was
    raised). ``latest`` with no checkpoint yet: start from scratch with a warning, so a requeued job
    script may always pass ``--resume latest``. A finished run with nothing left to train: refused, so its
    outputs are never retrained and overwritten by accident.
    """
    out = Path(cfg.train.output_dir)
    folder = resolve_resume(cfg.train.resume, checkpoint_root(cfg))
    finished = finished_output(out)
    step = read_trainer_state(folder)["global_step"] if folder is not None else None
    if finished is not None and (step is None or step >= cfg.train.max_steps):
        where = (
            f"its last checkpoint {folder} is at step {step}" if step is not None else "it has no checkpoint"
        )
        raise ValueError(
            f"--resume {cfg.train.resume}: {out} holds a finished run ({finished.name}) and {where} "
            f"of train.max_steps={cfg.train.max_steps}: nothing to continue. Raise train.max_steps to "
            "train on from its last checkpoint, or set another train.output_dir to start over"
        )
    if folder is None:
        never = (" (checkpoint.every_n_steps=0: this config saves a checkpoint only when stopped by SIGTERM)"
                 if not cfg.checkpoint.every_n_steps else "")
        log.warning("--resume %s: no complete checkpoint in %s yet, starting from scratch%s",
                    cfg.train.resume, checkpoint_root(cfg), never)


def resume_training(ctx: TrainContext, optimizer, lr_scheduler, objective) -> dict:
    """Restore the state ``train.resume`` names (exactly: weights, optimizer, schedule, RNG, data position,
    objective); returns the saved trainer state (``{}`` when starting from scratch)."""
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
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
