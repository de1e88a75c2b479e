"""Training checkpoints: safetensors and JSON only, written atomically, resumed exactly.

A checkpoint is a folder ``OUT/checkpoints/checkpoint-N``::

    trainable.safetensors     the trained parameters (LoRA layers, or the whole denoiser), by name
    lora/                     LoRA runs: the same layers in diffusers format (``pipe.load_lora_weights``)
    optimizer.{json,safetensors}, lr_scheduler.json
    rank-R.{json,safetensors} per process: RNG states (python, numpy, torch, CUDA) and the objective's state
                              (data position, SePPO's checkpoint pool, an online method's current epoch)
    trainer_state.json        step and counters; written last

Under FSDP2 the files are the same: the trainer hands the sharded parameters and the optimizer state
gathered whole (``weights``, ``optimizer_state``, keyed by parameter name); loading shards both again.
``trainer_state.json`` records ``sharded``, since the two optimizer layouts (by index, by name) do not
load into each other.

Everything is written into ``checkpoint-N.partial`` by the main process (other processes send their state
to it) and renamed to ``checkpoint-N`` once complete, so a process killed mid-save leaves the previous
checkpoint as the newest complete one, and ``latest`` never picks a half-written folder. Accelerate's own
``save_state`` pickles the optimizer and RNG states; these files are safetensors and JSON instead.

State trees (nested dicts/lists of numbers, strings and tensors) are stored as a JSON file whose tensors
are replaced by ``{"__tensor__": key}`` and a safetensors file holding them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from diffalign.files import apply_umask
from diffalign.parallel import is_sharded, load_whole_optimizer_state, load_whole_trainable

log = logging.getLogger("diffalign.checkpoints")

PARTIAL_SUFFIX = ".partial"
COMPLETE_MARKER = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the folder or file."""


# ----------------------------------------------------------------------------------------------------
# State trees <-> JSON + safetensors
# ----------------------------------------------------------------------------------------------------
def split_tensors(tree, prefix: str = "") -> tuple[object, dict[str, torch.Tensor], dict[str, Path]]:
    """``tree`` with every tensor (and :class:`~pathlib.Path`) replaced by a reference, the tensors by
    reference key, and the files by the name they get in the checkpoint folder."""
    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, Path] = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": path}
        if isinstance(node, Path):  # a file to keep with the checkpoint (hard-linked when possible)
            name = "file" + path.replace("/", "-") + node.suffix
            files[name] = node
            return {"__file__": name}
        if isinstance(node, np.ndarray):
            tensors[path] = torch.from_numpy(node.copy())
            return {"__ndarray__": path}
        if isinstance(node, dict):
            for key in node:
                if not isinstance(key, str | int):
                    raise TypeError(f"state key {key!r} at {path or '/'} is neither a string nor an integer")
            # integer keys (optimizer state) are kept apart so they come back as integers
            return {"__dict__": [[k, walk(v, f"{path}/{k}")] for k, v in node.items()]}
        if isinstance(node, list | tuple):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {path or '/'} in a checkpoint")

    return walk(tree, prefix), tensors, files


def join_tensors(tree, tensors: dict[str, torch.Tensor], folder: Path | None = None):
    """The inverse of :func:`split_tensors` (tuples come back as lists, files as paths in ``folder``)."""

    def walk(node):
        if isinstance(node, dict):
            if "__file__" in node:
                return folder / node["__file__"]
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            if "__ndarray__" in node:
                return tensors[node["__ndarray__"]].numpy()
            return {k: walk(v) for k, v in node["__dict__"]}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(tree)


def write_tree(folder: Path, name: str, tree) -> None:
    skeleton, tensors, files = split_tensors(tree, prefix=name)
    if tensors:
        safetensors.torch.save_file(tensors, str(folder / f"{name}.safetensors"))
    for file_name, source in files.items():
        target = folder / file_name
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def read_tree(folder: Path, name: str):
    json_path, tensor_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    skeleton = _read(json_path, lambda path: json.loads(path.read_text()))
    tensors = _read(tensor_path, load_safetensors) if tensor_path.exists() else {}
    try:
        return join_tensors(skeleton, tensors, folder)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint files {json_path} and {tensor_path.name} do not match ({err!r})"
        ) from err


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def _read(path: Path, reader):
    """``reader(path)``, with a missing or damaged file reported by name."""
    try:
        return reader(path)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path.parent} is missing {path.name}") from err
    except Exception as err:  # truncated or corrupt: json, OS and safetensors' own errors
        raise CheckpointError(
            f"checkpoint file {path} is unreadable or corrupt ({type(err).__name__}: {err})"
        ) from err


# ----------------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# Finding checkpoints
# ----------------------------------------------------------------------------------------------------
def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (partial folders are ignored)."""
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX)
             and p.name.split("-")[1].isdigit() and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=checkpoint_step)


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """The checkpoint ``train.resume`` names: 'latest' is the newest complete one under ``root`` (None
    when there is none yet); a folder must be a complete checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        done = complete_checkpoints(root)
        if not done:
            return None
        return done[-1]
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete or not a diffalign checkpoint (no {COMPLETE_MARKER}: "
            "a save was interrupted, or this is another tool's folder)"
        )
    return path


# ----------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, *, accelerator, model, optimizer, lr_scheduler, trainer_state: dict,
                    rank_state: dict, export_lora=None, keep_last: int | None = None,
                    weights: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write ``folder`` atomically (see the module docstring); every process must call this.

    ``rank_state`` is this process's state tree (RNG and objective); ``export_lora(path)``, when given,
    writes the diffusers-format LoRA folder; ``weights`` and ``optimizer_state`` replace the model's
    trainable parameters and ``optimizer.state_dict()`` (FSDP: gathered whole). Raises
    :class:`CheckpointError` (the previous checkpoints
    untouched) when the disk is full or the folder unwritable.
    """
    from accelerate.utils import gather_object
    weights = trainable_state(model) if weights is None else weights
    bad = [name for name, value in weights.items() if not bool(torch.isfinite(value).all())]
    if bad:  # never write a checkpoint a resume would carry NaN from
        raise CheckpointError(
            f"refusing to write {folder}: {len(bad)} parameters are not finite (first: {bad[0]})"
        )
    rank_states = gather_object([rank_state])  # every process's state, in rank order, on every process
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    error = None
    if accelerator.is_main_process:
        try:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
            safetensors.torch.save_file({k: v.to("cpu").contiguous() for k, v in weights.items()},
                                        str(partial / "trainable.safetensors"))
            if export_lora is not None:
                export_lora(partial / "lora")
            write_tree(partial, "optimizer", optimizer.state_dict() if optimizer_state is None
                       else optimizer_state)
            (partial / "lr_scheduler.json").write_text(json.dumps(lr_scheduler.state_dict()))
            for rank, state in enumerate(rank_states):
                write_tree(partial, f"rank-{rank}", state)
            (partial / COMPLETE_MARKER).write_text(
                json.dumps(trainer_state | {"num_processes": len(rank_states), "sharded": is_sharded(model)})
            )
            apply_umask(partial)
            _fsync_folder(partial)
            if folder.exists():  # re-saving a step (after a resume): replace the old folder
                shutil.rmtree(folder)
            os.replace(partial, folder)
            if keep_last:
                for old in complete_checkpoints(folder.parent)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            shutil.rmtree(partial, ignore_errors=True)
            previous = complete_checkpoints(folder.parent)
            error = f"could not write checkpoint {folder} ({type(err).__name__}: {err}); " + (
                f"the previous checkpoint {previous[-1]} is intact"
                if previous
                else "no earlier checkpoint exists"
            )
    error = gather_object([error])[0]  # the main process's outcome, on every process
    if error:
        raise CheckpointError(error)
    return folder


def _fsync_folder(folder: Path) -> None:
    """Flush the files and the folder entry, so a power cut after the rename cannot leave empty files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_trainer_state(folder: Path) -> dict:
    """The trainer counters a complete checkpoint holds (``global_step``, ``num_processes``, ...)."""
    return _read(folder / COMPLETE_MARKER, lambda path: json.loads(path.read_text()))


def load_checkpoint(folder: Path, *, accelerator, model, optimizer, lr_scheduler) -> tuple[dict, dict]:
    """Restore the model, optimizer and schedule from ``folder``; return ``(trainer_state, rank_state)``
    (this process's RNG and objective state, to be applied by the caller)."""
    trainer_state = read_trainer_state(folder)
    saved_processes = trainer_state.get("num_processes", 1)
    if saved_processes != accelerator.num_processes:
        raise CheckpointError(f"checkpoint {folder} was written by {saved_processes} processes; this run has "
                              f"{accelerator.num_processes}: an exact resume needs the same number (each "
                              "process's RNG, data position and online samples belong to its rank)")
    sharded = is_sharded(model)
    if trainer_state.get("sharded", False) != sharded:
        saved, now = ("FSDP", "without") if not sharded else ("without FSDP", "under")
        raise CheckpointError(f"checkpoint {folder} was written {saved}; this run is {now} FSDP: resume "
                              "with the accelerate config that wrote it")
    weights_path = folder / "trainable.safetensors"
    weights = _read(weights_path, load_safetensors)
    expected = trainable_state(model)
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise CheckpointError(
            f"checkpoint {weights_path} does not match this model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {extra[:3]}): same model and LoRA settings?"
        )
    for name, param in model.named_parameters():
        if name in weights and weights[name].shape != param.shape:
            raise CheckpointError(
                f"checkpoint {weights_path}: {name} has shape {tuple(weights[name].shape)}, "
                f"the model {tuple(param.shape)}"
            )
    if sharded:  # every process reads the whole tensors and keeps its shards
        load_whole_trainable(model, weights)
        load_whole_optimizer_state(model, optimizer, read_tree(folder, "optimizer"))
    else:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in weights:
                    param.copy_(weights[name])
        optimizer.load_state_dict(read_tree(folder, "optimizer"))
    lr_scheduler.load_state_dict(
        _read(folder / "lr_scheduler.json", lambda path: json.loads(path.read_text()))
    )
    rank_state = read_tree(folder, f"rank-{accelerator.process_index}")
    return trainer_state, rank_state
