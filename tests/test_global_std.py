"""GRPO's and DiffusionNFT's ``global_std`` across processes (Flow-GRPO gathers every process's rewards):
two processes, each with its own epoch, get exactly the advantages one process computes on both epochs'
rewards together, with the groups' means still their own; per-group std is untouched by the other rank.

The ranks run tests/helpers/global_std_run.py under ``accelerate launch`` (two CPU processes, gloo): the
objectives' real ``next_epoch`` on the tiny SD3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffalign.config import load_config
from diffalign.methods.grpo import group_advantages
from diffalign.methods.nft import optimality_probability

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "helpers" / "global_std_run.py"
CPU_CONFIG = ROOT / "configs" / "accelerate" / "cpu.yaml"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    from diffalign.tiny import cached_tiny

    cached_tiny("sd3")  # built once here, not by both ranks at once
    out = tmp_path_factory.mktemp("global-std")
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG), str(RUN),
               str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]


def _both(ranks: list[dict], case: str):
    """Both ranks' rewards and groups as one process would hold them (rank 1's groups renumbered)."""
    parts = [r["cases"][case] for r in ranks]
    rewards = torch.tensor(parts[0]["rewards"] + parts[1]["rewards"])
    offset = max(parts[0]["groups"]) + 1
    groups = torch.tensor(parts[0]["groups"] + [g + offset for g in parts[1]["groups"]])
    return parts, rewards, groups


def _settings(name: str):
    return load_config(ROOT / "configs" / "tiny-sd3" / f"{name}.yaml").method


@pytest.mark.slow
def test_two_processes_get_the_advantages_of_one_process_over_all_rewards(ranks):
    m = _settings("grpo")
    parts, rewards, groups = _both(ranks, "grpo-global")
    assert parts[0]["rewards"] != parts[1]["rewards"]  # the ranks sampled different epochs
    assert all(torch.isfinite(rewards))
    one = group_advantages(rewards, groups, global_std=True, eps=m.std_eps, unbiased=m.std_unbiased,
                           adv_clip_max=m.adv_clip_max)
    n0 = len(parts[0]["rewards"])
    for part, expected in zip(parts, (one[:n0], one[n0:]), strict=True):
        assert torch.equal(torch.tensor(part["advantages"]), expected[part["kept"]])
        local = group_advantages(torch.tensor(part["rewards"]), torch.tensor(part["groups"]), global_std=True,
                                 eps=m.std_eps, unbiased=m.std_unbiased, adv_clip_max=m.adv_clip_max)
        assert not torch.equal(torch.tensor(part["advantages"]), local[part["kept"]])  # what it was before
        assert part["reward_std_global"] == pytest.approx(float(rewards.std()), rel=1e-6)


@pytest.mark.slow
def test_per_group_std_is_each_process_own(ranks):
    m = _settings("grpo")
    parts, rewards, groups = _both(ranks, "grpo-group")
    one = group_advantages(rewards, groups, global_std=False, eps=m.std_eps, unbiased=m.std_unbiased,
                           adv_clip_max=m.adv_clip_max)
    n0 = len(parts[0]["rewards"])
    for part, expected in zip(parts, (one[:n0], one[n0:]), strict=True):
        local = group_advantages(torch.tensor(part["rewards"]), torch.tensor(part["groups"]),
                                 global_std=False, eps=m.std_eps, unbiased=m.std_unbiased,
                                 adv_clip_max=m.adv_clip_max)
        assert torch.equal(torch.tensor(part["advantages"]), local[part["kept"]])
        assert torch.equal(local, expected)


@pytest.mark.slow
def test_nft_optimality_probabilities_use_every_process_std(ranks):
    m = _settings("nft")
    parts, rewards, groups = _both(ranks, "nft-global")
    one = group_advantages(rewards, groups, global_std=m.global_std, eps=m.std_eps,
                           adv_clip_max=m.adv_clip_max)
    r = optimality_probability(one, m.adv_clip_max)
    n0 = len(parts[0]["rewards"])
    assert torch.equal(torch.tensor(parts[0]["r"] + parts[1]["r"]), r)
    local = optimality_probability(group_advantages(
        rewards[:n0], groups[:n0], global_std=m.global_std, eps=m.std_eps, adv_clip_max=m.adv_clip_max),
        m.adv_clip_max)
    assert not torch.equal(torch.tensor(parts[0]["r"]), local)


@pytest.mark.slow
def test_gathered_values_and_a_nested_agreement(ranks):
    for rank in ranks:
        assert rank["gather"] == [0.0, 1.0, 2.0, 7.5]  # uneven lengths, in process order, on every rank
        # an inner together's failure reaches the outer one unchanged (not agreed on, and worded, twice)
        assert rank["nested_failure"] == "injected failure on rank 1 (process 1 of 2; every process stopped)"
