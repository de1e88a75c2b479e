"""Run ``diffalign`` (as ``python -m diffalign`` would) with checks for multi-process tests.

Used as ``accelerate launch ... tests/mp_launch.py train CONFIG.yaml ...`` by tests/test_multiprocess.py.
Environment variables:

* ``DIFFALIGN_GUARD_DIRS`` (folders joined by ``os.pathsep``): on every rank but the main one, any write
  under these folders ends the process at once with exit code 86 and a stack trace on stderr. Writes are
  seen through Python's audit events (``open`` for writing, ``os.mkdir``, ``os.rename``/``os.replace``,
  ``os.remove``, ``shutil.rmtree``, ...) and through safetensors' Rust writer (``serialize_file``), which
  does not raise audit events.
* ``DIFFALIGN_TRACE_LOSS=1``: every rank prints ``TRACE {"rank": r, "loss": ..., <extra metrics>}`` on
  stderr for each objective call (its local, unreduced values), so a test can check what the trainer logs
  against the ranks.
* ``DIFFALIGN_COUNT_CHECKPOINTS=1``: every rank prints ``TRACE {"rank": r, "checkpointed": n}`` on stderr
  at exit: how many block forwards ran under ``torch.utils.checkpoint`` with gradients on (diffusers'
  gradient checkpointing), so a test sees that the setting reached the sharded model.
* ``DIFFALIGN_FAIL=RANK:WHAT:CALL``: on rank ``RANK`` only, make the ``CALL``-th (1-based) call of a real
  failure point fail, as a broken scorer or data would: ``reward`` (the brightness scorer raises),
  ``nan_reward`` (it returns NaN for every sample) or ``data`` (the unreadable-row counter raises its
  DataError). The other ranks run normally: a test checks that every rank stops, quickly, with one message.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

GUARD_EXIT_CODE = 86
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {  # audit event -> positions of its path arguments
    "os.mkdir": (0,), "os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "shutil.rmtree": (0,),
    "os.symlink": (1,), "os.link": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.utime": (0,),
    "shutil.copyfile": (1,), "shutil.move": (1,),
}


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _under(path, roots: list[Path]) -> bool:
    if isinstance(path, int):  # an already-open file descriptor
        return False
    try:
        resolved = Path(os.fsdecode(path)).resolve()
    except (TypeError, ValueError, OSError):
        return False
    return any(resolved == root or root in resolved.parents for root in roots)


def _violation(what: str) -> None:
    sys.stderr.write(f"GUARD: rank {_rank()} (not the main process) wrote {what}\n")
    traceback.print_stack(file=sys.stderr)
    sys.stderr.flush()
    os._exit(GUARD_EXIT_CODE)  # not an exception: library code could catch and hide one


def install_write_guard(roots: list[Path]) -> None:
    busy = False

    def hook(event: str, args: tuple) -> None:
        nonlocal busy
        if busy:
            return
        busy = True
        try:
            if event == "open":
                path, mode, flags = (list(args) + [None, None])[:3]
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & _WRITE_FLAGS)
                if writing and _under(path, roots):
                    _violation(f"{path} (open mode {mode!r}, flags {flags})")
            elif event in _PATH_EVENTS:
                for i in _PATH_EVENTS[event]:
                    if i < len(args) and _under(args[i], roots):
                        _violation(f"{args[i]} ({event})")
        finally:
            busy = False

    sys.addaudithook(hook)

    import safetensors.torch

    original = safetensors.torch.serialize_file

    def guarded_serialize_file(tensors, filename, *args, **kwargs):
        if _under(filename, roots):
            _violation(f"{filename} (safetensors)")
        return original(tensors, filename, *args, **kwargs)

    safetensors.torch.serialize_file = guarded_serialize_file


def install_loss_trace() -> None:
    from diffalign.objectives import OBJECTIVES

    for cls in OBJECTIVES.values():
        def traced(self, batch, _call=cls.__call__):
            out = _call(self, batch)
            extra = {k: float(v) for k, v in out.extra.items()}
            sys.stderr.write(
                "TRACE " + json.dumps({"rank": _rank(), "loss": float(out.loss.detach()), **extra}) + "\n"
            )
            return out

        cls.__call__ = traced


def install_checkpoint_count() -> None:
    import atexit

    import torch
    import torch.utils.checkpoint

    original, count = torch.utils.checkpoint.checkpoint, [0]

    def counted(*args, **kwargs):
        count[0] += torch.is_grad_enabled()
        return original(*args, **kwargs)

    torch.utils.checkpoint.checkpoint = counted  # diffusers looks it up at every call
    atexit.register(lambda: sys.stderr.write(
        "TRACE " + json.dumps({"rank": _rank(), "checkpointed": count[0]}) + "\n"))


def install_failure(what: str, call: int) -> None:
    import torch

    from diffalign import data
    from diffalign.scorers.simple import Brightness

    count = [0]

    def due() -> bool:
        count[0] += 1
        return count[0] >= call

    if what in ("reward", "nan_reward"):
        original = Brightness._score

        def score(self, images, prompts):
            if not due():
                return original(self, images, prompts)
            if what == "reward":
                raise OSError(f"injected scorer failure on rank {_rank()}")
            return torch.full((len(images),), float("nan"))

        Brightness._score = score
    elif what == "data":
        original_update = data.BadRowCounter.update

        def update(self, batch):
            if due():
                raise data.DataError(f"injected unreadable data on rank {_rank()}")
            return original_update(self, batch)

        data.BadRowCounter.update = update
    else:
        raise ValueError(f"DIFFALIGN_FAIL: unknown failure {what!r}")


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's diffalign, from any folder
    import torch

    torch.set_num_threads(1)  # two ranks on a 2-core machine
    roots = [Path(p).resolve() for p in os.environ.get("DIFFALIGN_GUARD_DIRS", "").split(os.pathsep) if p]
    if roots and _rank() != 0:
        install_write_guard(roots)
    if os.environ.get("DIFFALIGN_TRACE_LOSS") == "1":
        install_loss_trace()
    if os.environ.get("DIFFALIGN_COUNT_CHECKPOINTS") == "1":
        install_checkpoint_count()
    if os.environ.get("DIFFALIGN_FAIL"):
        rank, what, call = os.environ["DIFFALIGN_FAIL"].split(":")
        if int(rank) == _rank():
            install_failure(what, int(call))
    from diffalign.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
