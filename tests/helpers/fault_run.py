"""Run ``diffalign`` with a fault injected, for the reliability tests (never used by the package).

    DIFFALIGN_TEST_FAULT='{"kill_during_save": 4}' python tests/helpers/fault_run.py train CFG ...

Faults (JSON object in ``DIFFALIGN_TEST_FAULT``; ``rank`` limits a fault to one process):
- ``kill_during_save``: N   SIGKILL this process while it writes checkpoint-N (after the weights file)
- ``nan_loss_calls``: [i..] the pair objective's loss is NaN on these calls (1-based micro-batches)
"""

import json
import os
import signal
import sys

import torch


def main() -> int:
    fault = json.loads(os.environ.get("DIFFALIGN_TEST_FAULT", "{}"))
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    if "rank" not in fault or fault["rank"] == rank:
        install(fault)
    from diffalign.cli import main as cli_main

    return cli_main(sys.argv[1:])


def install(fault: dict) -> None:
    import diffalign.checkpoints as checkpoints
    import diffalign.objectives.pairs as pairs

    if "kill_during_save" in fault:
        original_write_tree = checkpoints.write_tree

        def write_tree(folder, name, tree):
            if (
                folder.name == f"checkpoint-{fault['kill_during_save']}{checkpoints.PARTIAL_SUFFIX}"
                and name == "optimizer"
            ):
                os.kill(os.getpid(), signal.SIGKILL)
            return original_write_tree(folder, name, tree)

        checkpoints.write_tree = write_tree

    if "nan_loss_calls" in fault:
        original_call = pairs.PairObjective.__call__
        calls = [0]

        def call(self, batch):
            calls[0] += 1
            out = original_call(self, batch)
            if calls[0] in fault["nan_loss_calls"]:
                out = out._replace(loss=out.loss * torch.tensor(float("nan")))
            return out

        pairs.PairObjective.__call__ = call


if __name__ == "__main__":
    sys.exit(main())
