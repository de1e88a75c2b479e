"""One rank of tests/test_global_std.py, under ``accelerate launch`` (2 processes, gloo; never used by the
package): GRPO's and DiffusionNFT's real ``next_epoch`` on the tiny SD3, each rank sampling its own epoch.

    accelerate launch --config_file configs/accelerate/cpu.yaml tests/helpers/global_std_run.py OUT_DIR

Writes ``OUT_DIR/rank-R.json``: per case (``grpo-global``, ``grpo-group``, ``nft-global``), the epoch's
rewards and groups (every sample's for GRPO, the kept ones' for NFT), the kept indices, and what the
objective computed from them (advantages; NFT's optimality probabilities); and ``gather`` (what
:func:`~diffalign.parallel.gather_values` gave for uneven lengths) and ``nested_failure`` (the message a
failure in a nested ``together`` reached the outer one with).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers.objective_context import objective_on_tiny_model  # noqa: E402

from diffalign.config import load_config  # noqa: E402
from diffalign.parallel import ProcessFailed, gather_values, together  # noqa: E402

SMALL = ["method.num_prompts=2", "method.samples_per_prompt=3", "method.num_steps=2",
         "method.sample_batch_size=6"]


def grpo_epoch(objective, global_std: bool) -> dict:
    """One epoch through ``next_epoch``, with the rewards ``collect`` gave it (recorded on the way)."""
    objective.settings = dataclasses.replace(objective.settings, global_std=global_std)
    seen = {}
    collect = objective.collect

    def recorded():
        out = collect()
        if out is not None:
            _, seen["rewards"], seen["groups"], seen["kept"] = out
        return out

    objective.collect = recorded
    batch = objective.next_epoch()
    objective.collect = collect
    return {"rewards": seen["rewards"].tolist(), "groups": seen["groups"].tolist(),
            "kept": seen["kept"].tolist(), "advantages": batch.advantages.tolist(),
            "reward_std_global": batch.stats["reward_std_global"]}


def main() -> None:
    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])
    cases = {}
    grpo = load_config(ROOT / "configs" / "tiny-sd3" / "grpo.yaml", [*SMALL, "method.beta=0"])
    ctx, objective = objective_on_tiny_model(grpo)
    accelerator = ctx.accelerator
    assert accelerator.num_processes == 2, accelerator.num_processes
    rank = accelerator.process_index
    cases["grpo-global"] = grpo_epoch(objective, global_std=True)
    cases["grpo-group"] = grpo_epoch(objective, global_std=False)

    nft = load_config(ROOT / "configs" / "tiny-sd3" / "nft.yaml", SMALL)
    _, objective = objective_on_tiny_model(nft)
    batch = objective.next_epoch()
    cases["nft-global"] = {"rewards": batch.rewards.tolist(), "groups": batch.groups.tolist(),
                           "r": batch.r.tolist(), "reward_std_global": batch.stats["reward_std_global"]}

    gather = gather_values(accelerator, torch.arange(3.0) if rank == 0 else torch.tensor([7.5]))

    def fails_on_rank_1():
        if rank == 1:
            raise ValueError("injected failure on rank 1")
        return "fine"

    try:
        together(accelerator, together, accelerator, fails_on_rank_1)
        nested = None
    except ProcessFailed as err:
        nested = str(err)
    result = {"cases": cases, "gather": gather.tolist(), "nested_failure": nested}
    (out_dir / f"rank-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
