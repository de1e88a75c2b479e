"""DiffusionNFT in the trainer: end to end from the CLI on a flow family, the objective's loss against the
formula on the tensors it is handed, the old policy (sampling, update, checkpoint) and the refusal of UNet
families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.objective_context import objective_on_tiny_model
from safetensors.torch import load_file
from torch.func import functional_call

from diffalign.cli import main
from diffalign.config import ConfigError, load_config
from diffalign.methods.nft import old_policy_decay
from diffalign.objectives.online import choose_prompts, epoch_seed, sample_epoch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-sd3" / "nft.yaml"
FAST = ["eval.enabled=false", "log.every_n_steps=1", "log.progress_bar=false", "method.num_steps=4"]


@pytest.mark.slow
def test_nft_trains_from_the_cli_on_tiny_sd3_and_checkpoints_the_old_policy(tmp_path):
    out = tmp_path / "nft"
    assert main(["train", str(CONFIG), f"train.output_dir={out}", "train.max_steps=3",
                 "checkpoint.every_n_steps=2", *FAST]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert {"policy_loss", "loss_pos", "loss_neg", "kl", "r_mean", "old_policy_decay", "reward_mean",
                "reward_std"} <= row.keys()
    # K = 2: the old policy moves after steps 2 (d = .002), never before
    assert [row["old_policy_decay"] for row in rows] == pytest.approx([0.0, 0.0, old_policy_decay(2)])
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())
    state = load_file(str(out / "checkpoints" / "checkpoint-2" / "rank-0.safetensors"))
    old = [k for k in state if "/old/" in k]
    trained = load_file(str(out / "checkpoints" / "checkpoint-2" / "trainable.safetensors"))
    assert len(old) == len(trained) > 0  # one old-policy tensor per trained tensor, in safetensors


def test_unet_families_are_refused_before_anything_loads(capsys):
    overrides = ["model.name=tiny-sdxl", "lora.target_modules=[to_q]"]
    with pytest.raises(ConfigError, match=r"model.name.*flow-matching.*'sdxl' samples with ddim steps"):
        load_config(CONFIG, overrides)
    assert main(["train", str(CONFIG), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DiffusionNFT applies to flow-matching" in err[0]


# ----------------------------------------------------------------------------------------------------
# The objective on a tiny SD3
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nft_objective():
    cfg = load_config(CONFIG, ["method.num_steps=4", "method.num_prompts=2", "method.samples_per_prompt=3",
                               "method.train_batch_size=64", "method.kl_weight=0.01"])
    _, objective = objective_on_tiny_model(cfg)
    with torch.no_grad():  # an old policy away from the current weights, so v_old != v_θ
        for name, value in objective.old.items():
            value.add_(0.02 * torch.randn(value.shape, generator=torch.Generator().manual_seed(len(name))))
    return objective


def _with_weights(module, weights):
    return lambda **kwargs: functional_call(module, weights, args=(), kwargs=kwargs)


@pytest.mark.slow
def test_the_old_policy_samples_and_the_weights_come_back(nft_objective):
    objective = nft_objective
    ctx, m = objective.ctx, objective.settings
    before = {k: p.detach().clone() for k, p in objective.trained.items()}
    batch = objective.collect()
    for k, p in objective.trained.items():
        assert torch.equal(p, before[k])
    # the same draw with the old weights copied in by hand
    seed = epoch_seed(ctx.cfg.train.seed, objective.epoch, 0)
    prompts = choose_prompts(objective.prompts, m.num_prompts, seed)
    with torch.no_grad():
        for k, p in objective.trained.items():
            p.copy_(objective.old[k])
    try:
        seeds = [seed + i for i in range(6)]
        trajectory, _, _, _ = sample_epoch(ctx.pipe, prompts, m, seeds, objective.reward, ctx.cfg.model.name)
    finally:
        with torch.no_grad():
            for k, p in objective.trained.items():
                p.copy_(before[k])
    assert torch.equal(batch.x0, trajectory.latents[:, -1])


@pytest.mark.slow
def test_the_objective_loss_equals_the_formula_on_its_tensors(nft_objective):
    """Rebuild every tensor the objective uses (the draw, x_t, v_θ, v_old with the old weights, v_ref with the
    adapters off) independently of it and compute DiffusionNFT's loss written out here."""
    objective = nft_objective
    ctx, m = objective.ctx, objective.settings
    batch = objective.next_epoch()
    steps_state, noise_state = objective.steps_rng.get_state(), objective.noise_rng.get_state()
    out = objective(batch)

    steps_rng = torch.Generator()
    steps_rng.set_state(steps_state)
    noise_rng = torch.Generator()
    noise_rng.set_state(noise_state)
    n_steps, n = len(batch.timesteps), len(batch.x0)
    steps = torch.randperm(n_steps, generator=steps_rng)[: int(n_steps * m.timestep_fraction)].sort().values
    assert len(steps) == 3  # int(4 x .9)
    noise = torch.randn((len(steps), *batch.x0.shape), generator=noise_rng)
    unet, family = ctx.unet, ctx.family
    old = dict(objective.old)
    total = 0.0
    for j, step in enumerate(steps.tolist()):
        sigma = float(batch.sigmas[step])
        x_t = (1 - sigma) * batch.x0 + sigma * noise[j]
        t = batch.timesteps[step].repeat(n)
        with torch.no_grad():
            v_old = family.call(_with_weights(unet, old), x_t, t, batch.cond)
            unet.disable_adapters()
            v_ref = family.call(unet, x_t, t, batch.cond)
            unet.enable_adapters()
            v = family.call(unet, x_t, t, batch.cond)
        beta = m.beta
        x0_pos = x_t - sigma * (beta * v + (1 - beta) * v_old)
        x0_neg = x_t - sigma * ((1 + beta) * v_old - beta * v)

        def adaptive(x0_hat):
            err = x0_hat - batch.x0
            return (err**2).flatten(1).mean(1) / err.abs().flatten(1).mean(1).clamp(min=m.norm_floor)

        r = batch.r
        policy = m.loss_scale * ((r * adaptive(x0_pos) + (1 - r) * adaptive(x0_neg)) / beta)
        kl = ((v - v_ref) ** 2).flatten(1).mean(1)
        total += float((policy + m.kl_weight * kl).sum())
    expected = total / (len(steps) * n)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.extra["kl"].item() > 0 and out.extra["policy_loss"].item() > 0
    # r from the group advantages: clamp(clip(A, ±5) / 10 + 1/2, 0, 1), a mean of 1/2 within each group
    for g in batch.groups.unique():
        assert batch.r[batch.groups == g].mean().item() == pytest.approx(0.5, abs=1e-6)


def test_the_old_policy_moves_only_at_the_end_of_an_epoch(nft_objective):
    objective = nft_objective
    old = {k: v.clone() for k, v in objective.old.items()}
    objective.used = objective.repeats - 1
    objective.on_step_end(300)
    for k in old:
        assert torch.equal(objective.old[k], old[k])
    objective.used = objective.repeats
    objective.on_step_end(300)  # d = min(.001 x 300, .5) = .3
    assert objective.last_decay == pytest.approx(0.3)
    for k, p in objective.trained.items():
        torch.testing.assert_close(objective.old[k], 0.3 * old[k] + 0.7 * p.detach(), rtol=1e-6, atol=1e-7)
    for k in old:  # leave the fixture's old policy as it was
        objective.old[k].copy_(old[k])
