"""GRPO (Flow-GRPO / DanceGRPO) math on fixed tensors: advantages, the clipped loss, KL, step selection,
EMA."""

import math
import statistics

import pytest
import torch

from diffalign.methods.ddpo import per_prompt_advantages
from diffalign.methods.grpo import (
    GRPOConfig,
    ema_update,
    flow_grpo_ema_decay,
    flow_grpo_kl,
    flow_step_rule,
    fraction_steps,
    group_advantages,
    grpo_loss,
    make_ema,
    random_steps,
    sde_window,
    train_step_indices,
    validate_grpo_settings,
)

REWARDS = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 4.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])


def _expected_advantages(global_std, eps, unbiased, clip):
    values = REWARDS.tolist()
    std_fn = statistics.stdev if unbiased else statistics.pstdev
    out = []
    for i, g in enumerate(GROUPS.tolist()):
        member = [v for v, h in zip(values, GROUPS.tolist(), strict=True) if h == g]
        std = std_fn(values) if global_std else std_fn(member)
        out.append(max(-clip, min(clip, (values[i] - statistics.fmean(member)) / (std + eps))))
    return out


@pytest.mark.parametrize("global_std", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantages_match_a_direct_computation(global_std, unbiased):
    got = group_advantages(
        REWARDS, GROUPS, global_std=global_std, eps=1e-4, unbiased=unbiased, adv_clip_max=5.0
    )
    assert got.tolist() == pytest.approx(
        _expected_advantages(global_std, 1e-4, unbiased, 5.0), rel=1e-5, abs=1e-6
    )
    assert got[3:6].abs().max().item() == 0.0  # the equal-reward group


def test_group_advantages_clip_and_ddpo_equivalence():
    got = group_advantages(REWARDS, GROUPS, global_std=False, eps=1e-4, adv_clip_max=0.5)
    assert got.abs().max().item() == pytest.approx(0.5)
    assert got.tolist() == pytest.approx(_expected_advantages(False, 1e-4, False, 0.5), rel=1e-5)
    # DanceGRPO-like per-prompt std with eps 1e-8 and no clipping is DDPO's standardisation
    dg = group_advantages(REWARDS, GROUPS, global_std=False, eps=1e-8, adv_clip_max=1e9)
    assert torch.allclose(dg, per_prompt_advantages(REWARDS, GROUPS, eps=1e-8))


def test_grpo_loss_equals_the_formula_by_direct_loop():
    logp = torch.tensor([[-1.00, -2.00], [-0.50, -0.70], [-3.0, -1.0]], requires_grad=True)
    logp_old = torch.tensor([[-1.05, -2.00], [-0.50, -0.60], [-3.0, -1.2]])
    adv = torch.tensor([1.5, -0.5, 7.0])  # 7 is clipped to 5
    c = 0.05
    out = grpo_loss(logp, logp_old, adv, clip_range=c, adv_clip_max=5.0)
    terms, clipped = [], 0
    for i in range(3):
        a = max(-5.0, min(5.0, adv[i].item()))
        for t in range(2):
            rho = math.exp(logp[i, t].item() - logp_old[i, t].item())
            terms.append(max(-a * rho, -a * min(max(rho, 1 - c), 1 + c)))
            clipped += abs(rho - 1) > c
    assert out.loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert out.extra["clipfrac"].item() == pytest.approx(clipped / 6)
    ratios = [
        math.exp(a - b) for a, b in zip(logp.flatten().tolist(), logp_old.flatten().tolist(), strict=True)
    ]
    assert out.extra["ratio_mean"].item() == pytest.approx(sum(ratios) / 6, rel=1e-6)
    diffs = [a - b for a, b in zip(logp.flatten().tolist(), logp_old.flatten().tolist(), strict=True)]
    assert out.extra["approx_kl"].item() == pytest.approx(0.5 * sum(d * d for d in diffs) / 6, rel=1e-5)
    assert "kl" not in out.extra


def test_first_inner_step_ratio_is_one_and_gradient_is_the_policy_gradient():
    torch.manual_seed(0)
    logp = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    out = grpo_loss(logp, logp.detach().clone(), adv, clip_range=1e-4)
    assert out.extra["ratio_mean"].item() == 1.0
    assert out.extra["clipfrac"].item() == 0.0
    (grad,) = torch.autograd.grad(out.loss, logp)
    expected = (-adv[:, None] * torch.ones(4, 3, dtype=torch.float64)) / 12  # -A ∇logp, averaged
    assert torch.equal(grad, expected)
    # the value is the plain policy-gradient surrogate -mean(A)
    assert out.loss.item() == pytest.approx(-adv.mean().item())


def test_kl_term_matches_the_formula_and_reaches_only_the_policy_mean():
    torch.manual_seed(1)
    mean = torch.randn(2, 3, 4, 5, requires_grad=True)
    mean_ref = torch.randn(2, 3, 4, 5, requires_grad=True)
    std = torch.rand(2, 3) + 0.1
    kl = flow_grpo_kl(mean, mean_ref, std)
    for i in range(2):
        for t in range(3):
            direct = ((mean[i, t] - mean_ref[i, t]) ** 2).mean().item() / (2 * std[i, t].item() ** 2)
            assert kl[i, t].item() == pytest.approx(direct, rel=1e-5)
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    out = grpo_loss(logp, logp.detach(), adv, beta=0.04, mean=mean, mean_ref=mean_ref, std=std)
    plain = grpo_loss(logp, logp.detach(), adv)
    assert out.loss.item() == pytest.approx(plain.loss.item() + 0.04 * kl.mean().item(), rel=1e-5)
    assert out.extra["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-6)
    out.loss.backward()
    assert mean.grad is not None and mean.grad.abs().sum() > 0
    assert mean_ref.grad is None  # the reference is a stop-gradient
    with pytest.raises(ValueError, match="mean_ref"):
        grpo_loss(logp, logp.detach(), adv, beta=0.1)


def test_fraction_steps_follow_python_int():
    assert fraction_steps(10, 0.99).tolist() == list(range(9))
    assert fraction_steps(16, 0.6).tolist() == list(range(int(16 * 0.6)))
    assert fraction_steps(10, 1.0).tolist() == list(range(10))


def test_random_steps_are_a_subset_per_sample():
    g = torch.Generator().manual_seed(0)
    steps = random_steps(64, 16, 0.6, drop_last=True, generator=g)
    assert steps.shape == (64, int(15 * 0.6))
    for row in steps:
        assert len(set(row.tolist())) == len(row) and row.max() < 15 and row.min() >= 0
        assert row.tolist() == sorted(row.tolist())
    assert len({tuple(r.tolist()) for r in steps}) > 1  # per sample, not one subset for all
    assert set(steps.flatten().tolist()) == set(range(15))  # the last step never; the others all appear
    again = random_steps(64, 16, 0.6, drop_last=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(steps, again)


def test_sde_window_noise_and_trained_steps():
    starts = set()
    for seed in range(200):
        start, stop = sde_window(10, 3, (1, 7), torch.Generator().manual_seed(seed))
        starts.add(start)
        assert stop == start + 3
    assert starts == {1, 2, 3, 4}  # U{lo .. hi - size}
    with pytest.raises(ValueError, match="does not fit"):
        sde_window(10, 4, (0, 3))


def test_train_step_indices_dispatch():
    n, steps = 3, 10
    assert train_step_indices(GRPOConfig(), n, steps).tolist() == [list(range(9))] * 3
    cfg = GRPOConfig(timestep_selection="random", timestep_fraction=0.5)
    assert train_step_indices(cfg, n, steps, generator=torch.Generator().manual_seed(0)).shape == (3, 5)
    # the window: every stored step (the sampler was stochastic only inside it)
    cfg = GRPOConfig(timestep_selection="window")
    assert train_step_indices(cfg, n, 2).tolist() == [[0, 1]] * 3
    assert flow_step_rule(GRPOConfig(sde="dance_grpo"), 0.3).noise_schedule == "constant"
    assert flow_step_rule(GRPOConfig(), 0.7).noise_schedule == "flow_grpo"
    assert flow_step_rule(GRPOConfig(sde="cps"), 0.8).kind == "flow_cps"


def test_validate_names_the_key():
    problems = []

    def require(ok, key, value, expected):
        if not ok:
            problems.append(key)

    validate_grpo_settings(GRPOConfig(), require, 10)
    assert problems == []
    validate_grpo_settings(GRPOConfig(timestep_fraction=0.05, clip_range=0), require, 10)
    assert problems == ["method.clip_range", "method.timestep_fraction"]
    problems.clear()
    validate_grpo_settings(
        GRPOConfig(timestep_selection="window", window_size=4, window_range=[0, 12]), require, 10
    )
    assert problems == ["method.window_range"]


def test_ema_follows_flow_grpo_decay_every_interval():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = make_ema(model.parameters(), max_decay=0.9)
    shadow = 0.0
    for step in range(40):
        with torch.no_grad():
            model.weight.fill_(float(step + 1))  # what the optimizer step made of the weights
        updated = ema_update(ema, model.parameters(), step, interval=8)
        assert updated == ((step + 1) % 8 == 0)
        if updated:
            d = min((1 + step) / (10 + step), 0.9)
            shadow = d * shadow + (1 - d) * (step + 1)
        assert ema.shadow_params[0][0, 0].item() == pytest.approx(shadow, rel=1e-6)
    assert flow_grpo_ema_decay(7) == pytest.approx(8 / 17)
    assert flow_grpo_ema_decay(1000) == 0.9
    # the EMA round-trips through its state dict (resume)
    again = make_ema(model.parameters(), max_decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert torch.equal(again.shadow_params[0], ema.shadow_params[0])


def test_dance_grpo_sde_is_the_constant_noise_flow_step():
    """DanceGRPO's SDE (score form, REFERENCE §2) equals FlowSDEStep with noise_schedule "constant"."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(8)
    eta = 0.3
    rule = flow_step_rule(GRPOConfig(sde="dance_grpo"), eta)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    for i in range(7):
        s, s_next = scheduler.sigmas[i].item(), scheduler.sigmas[i + 1].item()
        x0_hat = x - s * v
        score = -(x - (1 - s) * x0_hat) / s**2
        mean = x + (s_next - s) * (v - 0.5 * eta**2 * score)
        out = rule(scheduler, v, scheduler.timesteps[i], x)
        torch.testing.assert_close(out.mean, mean, rtol=1e-5, atol=1e-5)
        assert out.std.tolist() == pytest.approx([eta * (s - s_next) ** 0.5] * 2, rel=1e-5)
