"""GRPO through the trainer's online objective: the first ratio, skipped groups, the loss against its formula,
the Fast window (deterministic outside, trained inside), shared group noise, and ``diffalign train`` end to
end on tiny-sdxl (DDIM) and tiny-sd3 (flow SDE / CPS). Exact resume: tests/test_resume.py (grpo, grpo-fast).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffalign.config import load_config
from diffalign.methods import METHODS
from diffalign.objectives import OnlineObjective, TrainContext
from diffalign.sampler import family_of, recompute_steps
from diffalign.steps import DDIMStep, FlowCPSStep, FlowSDEStep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grpo_ctx(tiny_sdxl):
    """A GRPO TrainContext on a LoRA copy of the tiny SDXL UNet (CPU), built as the trainer builds it, with
    LoRA B moved off zero so the policy differs from the reference (a KL above 0)."""
    from accelerate import Accelerator
    from peft import LoraConfig

    pipe = copy.copy(tiny_sdxl)
    unet = copy.deepcopy(tiny_sdxl.unet).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    pipe.unet = unet
    cfg = load_config(ROOT / "configs/tiny-sdxl/grpo.yaml",
                      ["method.num_prompts=2", "method.samples_per_prompt=3", "method.num_steps=4",
                       "method.sample_batch_size=6", "method.micro_batch_prompts=2"])
    ctx = TrainContext(cfg, METHODS["grpo"], Accelerator(cpu=True), pipe, family_of(pipe), unet, None,
                       torch.float32)
    return ctx


def _objective(ctx, **overrides) -> OnlineObjective:
    cfg = copy.copy(ctx.cfg)
    cfg.method = dataclasses.replace(ctx.cfg.method, **overrides)
    return OnlineObjective(dataclasses.replace(ctx, cfg=cfg))


def _lora(unet):
    return [p for n, p in unet.named_parameters() if "lora_" in n]


@contextlib.contextmanager
def _trainable(unet):
    """LoRA weights with gradients (the objective back-propagates all but the last micro-batch itself)."""
    for p in _lora(unet):
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in _lora(unet):
            p.requires_grad_(False)
        unet.zero_grad(set_to_none=True)


def test_first_inner_step_on_fresh_samples_has_ratio_exactly_one(grpo_ctx):
    objective = _objective(grpo_ctx)
    batch = objective.next_epoch()
    assert batch.advantages is not None and batch.mean_ref is not None
    # Flow-GRPO's fraction: the first int(4 * 0.99) = 3 of the 4 stored DDIM steps
    columns = METHODS["grpo"].train_columns(objective.settings, len(batch.rewards), len(batch.steps), None)
    assert columns.tolist() == [[0, 1, 2]] * len(batch.rewards)
    with _trainable(grpo_ctx.unet):
        out = objective(batch)
    # the sampler's batch recomputed one step per forward: the policy's log-probs are the stored ones
    assert out.extra["ratio_mean"].item() == 1.0
    assert out.extra["approx_kl"].item() == 0.0 and out.extra["clipfrac"].item() == 0.0
    with torch.no_grad():
        again = recompute_steps(grpo_ctx.unet, batch.trajectory, batch.steps[:3]).log_prob
    assert torch.equal(again, batch.logp_old[:, :3])
    assert out.extra["kl"].item() > 0  # LoRA B is not zero: the policy is not the reference


def test_groups_with_equal_rewards_are_skipped_and_counted(grpo_ctx):
    objective = _objective(grpo_ctx)
    brightness = objective.reward
    first = None

    def reward(images, prompts):  # the first prompt's samples all score 0.5: nothing to learn from them
        nonlocal first
        first = prompts[0] if first is None else first
        scores = brightness(images, prompts)
        return torch.where(torch.tensor([p == first for p in prompts]), torch.tensor(0.5), scores)

    objective.reward = reward
    batch = objective.next_epoch()
    assert batch.stats["num_flat_groups"] == 1
    assert len(batch.rewards) == 3 and batch.groups.unique().numel() == 1
    assert first not in batch.trajectory.prompts
    with torch.no_grad():
        out = objective(batch)
    assert out.extra["num_flat_groups"].item() == 1.0


def test_loss_through_the_objective_equals_the_formula(grpo_ctx):
    """After the policy moved (ratios off 1, some clipped), the objective's loss over two micro-batches is
    Flow-GRPO's ``mean max(-A ρ, -A clip(ρ, 1 ± c)) + β mean ⟨(μ_θ - μ_ref)²⟩ / (2σ²)``, written out here."""
    clip, beta = 2e-3, 0.04
    objective = _objective(grpo_ctx, micro_batch_prompts=1, clip_range=clip, beta=beta)
    batch = objective.next_epoch()
    unet = grpo_ctx.unet
    saved = [p.detach().clone() for p in _lora(unet)]
    generator = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad():
            for p in _lora(unet):
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        with _trainable(unet):
            out = objective(batch)
        with torch.no_grad():
            steps = batch.steps[:3]
            policy = recompute_steps(unet, batch.trajectory, steps, with_mean=True)
            unet.disable_adapters()
            reference = recompute_steps(unet, batch.trajectory, steps, with_mean=True)
            unet.enable_adapters()
    finally:
        with torch.no_grad():
            for p, s in zip(_lora(unet), saved, strict=True):
                p.copy_(s)
    rewards, groups = batch.rewards.tolist(), batch.groups.tolist()
    std_all = torch.tensor(rewards).std(unbiased=False).item()  # global std (Flow-GRPO's default)
    for i, group in enumerate(groups):
        members = [r for r, g in zip(rewards, groups, strict=True) if g == group]
        advantage = max(-5.0, min(5.0, (rewards[i] - sum(members) / len(members)) / (std_all + 1e-4)))
        # fp32: r - mean cancels to ~1e-3 of the rewards, so ~1e-5 relative error in A
        assert batch.advantages[i].item() == pytest.approx(advantage, rel=1e-4, abs=1e-4)
    # Σ A ρ nearly cancels (Σ A = 0 per group): the loss is checked on the objective's own fp32 advantages
    total, kl_total, count = 0.0, 0.0, 0
    for i, advantage in enumerate(batch.advantages.tolist()):
        for j in range(3):
            ratio = float(torch.exp(policy.log_prob[i, j] - batch.logp_old[i, j]))
            total += max(-advantage * ratio, -advantage * min(max(ratio, 1 - clip), 1 + clip))
            squared = ((policy.mean[i, j] - reference.mean[i, j]) ** 2).mean().item()
            kl_total += squared / (2 * policy.std[i, j].item() ** 2)
            count += 1
    expected = total / count + beta * kl_total / count
    assert out.loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert 0 < out.extra["clipfrac"].item() < 1  # the clip was exercised, not everywhere
    assert out.extra["kl"].item() == pytest.approx(kl_total / count, rel=1e-4)


@pytest.mark.parametrize("rule", [DDIMStep(eta=1.0, noisy_steps=(2, 3)),
                                  FlowSDEStep(noise_level=0.7, noisy_steps=(2, 3)),
                                  FlowCPSStep(noise_level=0.8, noisy_steps=(2, 3))],
                         ids=["ddim", "flow_sde", "flow_cps"])
def test_outside_the_window_no_noise_is_drawn_and_the_step_is_the_ode(rule):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = rule.make_scheduler({}) if rule.kind == "ddim" else FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    ode = DDIMStep(eta=0.0) if rule.kind == "ddim" else FlowSDEStep(noise_level=0.0)
    for i in range(5):
        generator = torch.Generator().manual_seed(7)
        before = generator.get_state()
        step = rule(scheduler, out, scheduler.timesteps[i], x, generator=generator)
        if i == 2:
            assert bool(step.stochastic.all()) and not torch.equal(generator.get_state(), before)
            continue
        assert torch.equal(generator.get_state(), before)  # no noise drawn
        assert not bool(step.stochastic.any()) and step.std.abs().max().item() == 0.0
        assert torch.equal(step.prev_sample, step.mean)
        torch.testing.assert_close(step.prev_sample, ode(scheduler, out, scheduler.timesteps[i], x).mean,
                                   rtol=0, atol=1e-6)


def test_window_variant_samples_the_ode_outside_and_trains_only_the_window(grpo_ctx):
    objective = _objective(grpo_ctx, timestep_selection="window", window_size=2, window_range=[0, 4],
                           beta=0.0)
    windows = set()
    for _ in range(4):
        objective.epoch += 1
        batch = objective.collect()[0]
        stochastic = batch.trajectory.stochastic.tolist()
        start = stochastic.index(True)
        windows.add(start)
        assert stochastic == [start <= i < start + 2 for i in range(4)]
        assert batch.steps.tolist() == [start, start + 1]
        assert batch.trajectory.step_rule["noisy_steps"] == (start, start + 2)
        # the trained steps: every stored (window) step, for every sample
        n = len(batch.rewards)
        columns = METHODS["grpo"].train_columns(objective.settings, n, len(batch.steps), None)
        assert batch.select(torch.arange(len(batch.rewards)), columns).steps.tolist() == \
            [[start, start + 1]] * len(batch.rewards)
        # the recorded steps outside the window are deterministic under the recomputation too
        outside = [i for i in range(4) if not stochastic[i]]
        with torch.no_grad():
            rec = recompute_steps(grpo_ctx.unet, batch.trajectory, outside, with_mean=True)
        assert rec.std.abs().max().item() == 0.0
        assert torch.equal(rec.mean, batch.trajectory.latents[:, [i + 1 for i in outside]].float())
    assert len(windows) > 1  # the window moves between epochs (one draw per epoch, seeded by it)


def test_shared_group_noise_starts_a_group_from_one_noise(grpo_ctx):
    objective = _objective(grpo_ctx, shared_group_noise=True, samples_per_prompt=3)
    batch = objective.collect()[0]
    x_T, x_next = batch.trajectory.latents[:, 0], batch.trajectory.latents[:, 1]
    groups = batch.groups.tolist()
    for i in range(len(groups)):
        for j in range(len(groups)):
            assert torch.equal(x_T[i], x_T[j]) == (groups[i] == groups[j])
            if i != j:
                assert not torch.equal(x_next[i], x_next[j])  # their steps' noise differs


# ----------------------------------------------------------------------------------------------------
# diffalign train, end to end
# ----------------------------------------------------------------------------------------------------
def _train(config: str, out: Path, *extra: str) -> list[dict]:
    command = [sys.executable, "-m", "diffalign", "train", str(ROOT / "configs" / config),
               f"train.output_dir={out}", "eval.enabled=false", "log.progress_bar=false",
               "log.every_n_steps=1", "train.max_steps=2", "method.gradient_steps_per_epoch=1", *extra]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny-sdxl/grpo.yaml", "tiny-sdxl/grpo-fast.yaml", "tiny-sd3/grpo.yaml",
                                    "tiny-sd3/grpo-fast.yaml"])
def test_diffalign_train_runs_grpo_and_logs_its_metrics(config, tmp_path):
    from diffalign.models import load_pipeline

    extra = ["method.sde=dance_grpo", "method.eta=0.3", "method.shared_group_noise=true",
             "method.timestep_selection=random", "method.timestep_fraction=0.6"] \
        if config == "tiny-sd3/grpo.yaml" else []
    metrics = _train(config, tmp_path / "run", *extra)
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward_mean", "reward_std", "ratio_mean", "clipfrac", "num_flat_groups", "loss"):
        assert all(key in m for m in metrics), key
    assert metrics[0]["ratio_mean"] == 1.0 and metrics[0]["approx_kl"] == 0.0  # fresh samples, epoch 1
    beta = load_config(ROOT / "configs" / config, check=False).method.beta
    assert ("kl" in metrics[0]) == (beta > 0)
    pipe = load_pipeline(config.split("/")[0])
    pipe.load_lora_weights(tmp_path / "run")
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    assert any("lora" in n for n, _ in denoiser.named_parameters())


@pytest.mark.slow
def test_ema_of_the_weights_is_what_the_run_exports(tmp_path):
    """``ema: true``: the exported LoRA is the EMA of the trained weights (Flow-GRPO's decay, here every
    step), computed from the checkpoints' trained weights: ``e_1 = w_1`` (decay 0 at the first update),
    then ``e_n = d e_{n-1} + (1 - d) w_n``, ``d = min((1 + i) / (10 + i), 0.9)``, step index ``i = n - 1``.
    """
    from safetensors.torch import load_file

    out = tmp_path / "run"
    _train("tiny-sdxl/grpo.yaml", out, "method.ema=true", "method.ema_update_interval=1",
           "checkpoint.every_n_steps=1", "checkpoint.keep_last=3", "train.max_steps=3")
    checkpoints = out / "checkpoints"
    trained = [load_file(checkpoints / f"checkpoint-{n}" / "lora" / "pytorch_lora_weights.safetensors")
               for n in (1, 2, 3)]
    expected = dict(trained[0])
    for i, weights in enumerate(trained[1:], start=1):
        d = min((1 + i) / (10 + i), 0.9)
        expected = {k: d * v + (1 - d) * weights[k] for k, v in expected.items()}
    exported = load_file(out / "pytorch_lora_weights.safetensors")
    assert exported.keys() == expected.keys()
    for key in exported:
        torch.testing.assert_close(exported[key], expected[key], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(exported[k], trained[-1][k]) for k in exported)  # not the trained weights
