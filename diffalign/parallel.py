"""What several processes need beyond accelerate's wrappers: failing together, and FSDP2's sharded denoiser
read whole where the trainer reads it whole.

**Failing together.** A process that raises while the others go on leaves them waiting in the next
collective (a gradient all-reduce, an FSDP all-gather) until the backend's timeout, or dying on a closed
connection with a traceback that names nothing of the cause. :func:`together` runs one piece of work on
every process and then agrees on its outcome with one all-reduce of a failure flag: if any process raised,
every process raises :class:`ProcessFailed` with the same one-line message (the first failing process's
error, which it also logs with its traceback when it is not one of ours). The trainer calls it where a
user's data, scorer or reward can fail (the next batch, the objective's call), before any later collective.

**Gathering.** :func:`gather_values` gives every process all processes' values of one epoch (GRPO's
global std of the rewards), after the agreement on the epoch's sampling and scoring (``together``).

**FSDP2** (``torch.distributed.fsdp.fully_shard``, applied by accelerate's FSDP plugin): every wrapped
block holds a shard of its parameters and all-gathers them for its forward. Two things follow:

* every process must run the same number of forwards (each is a collective); :func:`common_count` lets a
  process with fewer micro-batches pad with zero-weighted ones;
* forwards on the main process alone (validation) or a number of forwards that differs across processes
  (sampling that retries, reference log-probs of the samples a process kept) run inside
  :func:`gathered`: every process all-gathers the full parameters once and keeps them (no collective
  inside), then frees them. Peak memory there is the full denoiser, as under DDP; the training steps,
  gradients and optimizer states stay sharded.
* checkpoints and the outputs read the shards' own values (fp32 masters under mixed precision, not the
  bf16 a forward gathers): :func:`whole_trainable`, :func:`whole_optimizer_state`, :func:`unsharded_copy`,
  :func:`whole_state_dict` (SePPO's pool files of a full fine-tune).

Outside FSDP these helpers do nothing (one process) or only the agreement (DDP).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

log = logging.getLogger("diffalign.parallel")

T = TypeVar("T")

#: Errors a user's input causes (bad config, data, missing file): the CLI's exit status 2; others exit 1.
USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError)


class ProcessFailed(RuntimeError):
    """One process of a multi-process run raised; every process raises this, with the same message."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


def expected(error: BaseException) -> bool:
    """Our own errors and a user's mistakes, whose message says it all (no traceback needed)."""
    return type(error).__module__.startswith("diffalign") or isinstance(error, USER_ERRORS)


def describe(error: BaseException) -> str:
    """One line for ``error``: an expected one by its message, others with their type (a bug's KeyError
    says more with its name)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if expected(error) else f"{type(error).__name__}: {text}"


def together(accelerator, work: Callable[..., T], *args) -> T:
    """``work(*args)`` on every process, then one all-reduce: its value when no process raised; otherwise
    every process raises :class:`ProcessFailed` with the first failing process's message. One process:
    ``work(*args)`` as it is (its own error unchanged). Nested: an inner agreement's
    :class:`ProcessFailed` passes through unchanged."""
    if accelerator.num_processes == 1:
        return work(*args)
    error: Exception | None = None
    value = None
    try:
        value = work(*args)
    except ProcessFailed:  # a nested ``together`` agreed already: every process raises it here
        raise
    except Exception as err:  # noqa: BLE001 - every error must reach the agreement, or the others hang
        error = err
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
    if int(failed.item()) == 0:
        return value
    from accelerate.utils import gather_object  # heavy: loaded when a process failed

    report = None
    if error is not None:
        report = (describe(error), 2 if isinstance(error, USER_ERRORS) else 1)
        if not expected(error):
            log.error("process %d raised", accelerator.process_index, exc_info=error)
    reports = gather_object([report])
    rank, (message, status) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)
    others = int(failed.item()) - 1
    also = f", {others} other(s) failed too" if others else ""
    raise ProcessFailed(f"{message} (process {rank} of {accelerator.num_processes}{also}; every process "
                        "stopped)", status) from error


def gather_values(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Every process's 1-D ``values`` (their lengths may differ), concatenated in process order, on the
    CPU of every process; every process must call it. One process: ``values`` itself."""
    if accelerator.num_processes == 1:
        return values
    device = accelerator.device
    counts = accelerator.gather(torch.tensor([len(values)], device=device)).tolist()
    padded = torch.zeros(max(counts), dtype=values.dtype, device=device)
    padded[: len(values)] = values.to(device)
    rows = accelerator.gather(padded).view(len(counts), -1).cpu()
    return torch.cat([row[:count] for row, count in zip(rows, counts, strict=True)])


# ----------------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------------
def fsdp_blocks(*models) -> list[FSDPModule]:
    """The FSDP2-wrapped modules (blocks and roots) of ``models`` (None entries skipped)."""
    return [m for model in models if model is not None for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    return bool(fsdp_blocks(model))


def _reshards_after_forward(block: FSDPModule) -> bool:
    # FSDP2 keeps no public getter: a group frees its gathered parameters after forward exactly when it
    # has a post-forward mesh
    group = block._get_fsdp_state()._fsdp_param_group
    return group is not None and group.post_forward_mesh_info is not None


@contextlib.contextmanager
def gathered(*models):
    """FSDP2: every process gathers the full parameters of ``models`` (every process must enter), keeps
    them for the block, so forwards inside run without collectives, on any number of processes or the
    main one alone, and frees them at the end. Anything else: nothing. Parameters read inside are whole;
    anything written to them inside is lost (the shards are the parameters)."""
    blocks = fsdp_blocks(*models)
    if not blocks:
        yield
        return
    before = [_reshards_after_forward(b) for b in blocks]
    for block in blocks:
        block.set_reshard_after_forward(False, recurse=False)
        block.unshard()
    try:
        yield
    finally:
        for block, reshard in zip(blocks, before, strict=True):
            block.reshard()
            block.set_reshard_after_forward(reshard, recurse=False)


def common_count(accelerator, model, count: int) -> int:
    """The largest ``count`` over the processes when ``model`` is sharded (one all-reduce); ``count`` itself
    otherwise (without FSDP processes may run different numbers of forwards)."""
    if not is_sharded(model):
        return count
    return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "max").item())


def whole_trainable(model) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, whole on every process (FSDP2: all-gathered, on the CPU)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = p.full_tensor().cpu() if hasattr(p, "full_tensor") else p.detach()
    return out


def whole_optimizer_state(model, optimizer) -> dict:
    """The optimizer state of a sharded ``model``, whole and keyed by parameter name, on the main process
    (``{}`` on the others); every process must call it."""
    return get_optimizer_state_dict(model, _bare_optimizer(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_whole_optimizer_state(model, optimizer, state: dict) -> None:
    """Shard a whole optimizer state (:func:`whole_optimizer_state`, read by every process) into
    ``optimizer``."""
    set_optimizer_state_dict(model, _bare_optimizer(optimizer), state,
                             options=StateDictOptions(full_state_dict=True))


def load_whole_trainable(model, weights: dict[str, torch.Tensor]) -> None:
    """Shard whole tensors (trainable parameters, or a frozen copy's :func:`whole_state_dict`; read by every
    process) into a sharded ``model``; ``weights`` is left as it is."""
    # set_model_state_dict fills the dict it is handed with the model's own entries: a copy keeps the caller's
    set_model_state_dict(model, dict(weights), options=StateDictOptions(full_state_dict=True, strict=False))


def whole_state_dict(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by name; of a sharded one, gathered whole on the main
    process's CPU (``{}`` on the others; every process must call it)."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _bare_optimizer(optimizer):
    while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer
        optimizer = optimizer.optimizer
    return optimizer


def unsharded_copy(model, keep: bool):
    """An unsharded copy of an FSDP2 ``model`` where ``keep`` (the main process; every process must call
    this, each parameter is all-gathered): the same class without FSDP, the same LoRA adapters, the
    parameters as the shards hold them (fp32 masters, not the bf16 a mixed-precision forward gathers) and
    the buffers, for code that runs on one process (saving the output, the final evaluation). None where
    not ``keep``."""
    whole = {}
    for name, p in model.named_parameters():  # one parameter at a time on the device, kept on the host
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        if keep:
            whole[name] = full.cpu()
    if not keep:
        return None
    device = next(model.parameters()).device
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    copy = cls.from_config(model.config)
    if getattr(model, "peft_config", None):
        for name, config in model.peft_config.items():
            copy.add_adapter(config, adapter_name=name)
    theirs = whole | {name: b.detach() for name, b in model.named_buffers()}
    mine = dict(copy.named_parameters()) | dict(copy.named_buffers())
    if mine.keys() != theirs.keys():
        raise RuntimeError(f"unsharded copy of {cls.__name__}: {len(mine.keys() ^ theirs.keys())} "
                           "parameter names differ from the sharded model's")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, target in mine.items():
            target.data = theirs[name].detach().clone()
            if isinstance(target, torch.nn.Parameter):
                target.requires_grad_(name in trainable)
    return copy.to(device)
