"""DiffusionNFT math on fixed tensors: optimality probabilities, the implicit-policy loss, stop-gradients,
the old-policy decay and the refusal of non-flow families."""

import pytest
import torch

from diffalign.methods.grpo import group_advantages
from diffalign.methods.nft import (
    NFTConfig,
    nft_loss,
    old_policy_decay,
    optimality_probability,
    require_flow_family,
    update_old_policy,
    validate_nft_settings,
)


def test_optimality_probability():
    a = torch.tensor([-7.0, -5.0, -1.0, 0.0, 2.5, 5.0, 9.0])
    assert optimality_probability(a).tolist() == pytest.approx([0.0, 0.0, 0.4, 0.5, 0.75, 1.0, 1.0])
    # from rewards, through GRPO's group advantages
    rewards, groups = torch.tensor([1.0, 3.0, 2.0, 2.0]), torch.tensor([0, 0, 1, 1])
    r = optimality_probability(group_advantages(rewards, groups, global_std=False))
    assert r[0] < 0.5 < r[1] and r[2:].tolist() == [0.5, 0.5]


def _direct_loss(v_theta, v_old, v_ref, x_t, x0, t, r, beta, scale, kl_weight, floor):
    """The formula written out sample by sample, element by element."""
    n = v_theta.shape[0]
    total_policy, total_kl = 0.0, 0.0
    for i in range(n):
        vt, vo, vr = v_theta[i].flatten().tolist(), v_old[i].flatten().tolist(), v_ref[i].flatten().tolist()
        xt, x = x_t[i].flatten().tolist(), x0[i].flatten().tolist()
        m = len(vt)
        losses = []
        for sign in (+1, -1):
            errs = []
            for j in range(m):
                v = beta * vt[j] + (1 - beta) * vo[j] if sign > 0 else (1 + beta) * vo[j] - beta * vt[j]
                errs.append(xt[j] - t[i].item() * v - x[j])
            norm = max(sum(abs(e) for e in errs) / m, floor)
            losses.append(sum(e * e for e in errs) / m / norm)
        ri = r[i].item()
        total_policy += (ri * losses[0] + (1 - ri) * losses[1]) / beta
        total_kl += sum((a - b) ** 2 for a, b in zip(vt, vr, strict=True)) / m
    return scale * total_policy / n + kl_weight * total_kl / n


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 2, 2, 2)
    x0 = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_old = eps - x0 + 0.1 * torch.randn(shape, generator=g)
    v_ref = eps - x0 + 0.1 * torch.randn(shape, generator=g)
    v_theta = (v_old + 0.05 * torch.randn(shape, generator=g)).requires_grad_(True)
    r = torch.tensor([0.1, 0.5, 0.95])
    return v_theta, v_old, v_ref, x_t, x0, t, r


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_equals_the_formula(beta):
    v_theta, v_old, v_ref, x_t, x0, t, r = _tensors()
    out = nft_loss(v_theta, v_old, v_ref, x_t, x0, t, r, beta=beta, loss_scale=5.0, kl_weight=1e-2)
    expected = _direct_loss(v_theta, v_old, v_ref, x_t, x0, t, r, beta, 5.0, 1e-2, 1e-5)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_norm_floor_applies_when_the_prediction_is_exact():
    v_theta, v_old, v_ref, x_t, x0, t, r = _tensors()
    exact = ((x_t - x0) / t.view(-1, 1, 1, 1)).requires_grad_(True)
    out = nft_loss(exact, exact.detach(), exact.detach(), x_t, x0, t, r, kl_weight=1.0)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    # errors t · 0.01 < 0.05: every sample's normaliser is the floor
    off = exact.detach() + 0.01
    expected = _direct_loss(off, exact.detach(), exact.detach(), x_t, x0, t, r, 1.0, 5.0, 0.0, 0.05)
    got = nft_loss(off, exact.detach(), exact.detach(), x_t, x0, t, r, kl_weight=0.0, norm_floor=0.05)
    assert got.loss.item() == pytest.approx(expected, rel=1e-3)
    unfloored = nft_loss(off, exact.detach(), exact.detach(), x_t, x0, t, r, kl_weight=0.0, norm_floor=1e-5)
    assert unfloored.loss.item() > 2 * got.loss.item()


def test_gradients_reach_only_the_policy_velocity():
    v_theta, v_old, v_ref, x_t, x0, t, r = _tensors()
    leaves = [v.clone().requires_grad_(True) for v in (v_old, v_ref, x_t, x0, t, r)]
    out = nft_loss(v_theta, *leaves)
    out.loss.backward()
    assert v_theta.grad is not None and v_theta.grad.abs().sum() > 0
    assert all(leaf.grad is None for leaf in leaves)


def test_gradient_pulls_towards_good_and_away_from_bad_samples():
    # beta = 1, no KL: the positive branch is v_θ itself; r = 1 descends ℓ⁺ (x0⁺ → x0), r = 0 descends ℓ⁻
    v_theta, v_old, v_ref, x_t, x0, t, _ = _tensors()
    target = (x_t - x0) / t.view(-1, 1, 1, 1)  # the velocity that reproduces x0
    for r_value, closer in ((1.0, True), (0.0, False)):
        v = v_old.clone().requires_grad_(True)
        out = nft_loss(v, v_old, v_ref, x_t, x0, t, torch.full((3,), r_value), kl_weight=0.0)
        (grad,) = torch.autograd.grad(out.loss, v)
        moved = v.detach() - 1e-3 * grad
        before, after = (v_old - target).norm(), (moved - target).norm()
        assert (after < before) == closer


def test_at_the_old_policy_both_branches_agree_and_ranking_metrics():
    v_theta, v_old, v_ref, x_t, x0, t, r = _tensors()
    at_old = v_old.clone().requires_grad_(True)
    out = nft_loss(at_old, v_old, v_ref, x_t, x0, t, r, kl_weight=0.0)
    assert out.extra["loss_pos"].item() == pytest.approx(out.extra["loss_neg"].item(), rel=1e-6)
    assert out.reward_margin.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="v_ref"):
        nft_loss(at_old, v_old, None, x_t, x0, t, r, kl_weight=1e-4)


def test_old_policy_decay_schedules():
    assert [old_policy_decay(s) for s in (0, 1, 100, 499, 500, 10_000)] == pytest.approx(
        [0.0, 0.001, 0.1, 0.499, 0.5, 0.5])
    assert [old_policy_decay(s, "ocr") for s in (0, 74, 75, 76, 100, 500)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.0075, 0.1875, 0.999])
    assert old_policy_decay(1000, "none") == 0.0
    with pytest.raises(ValueError, match="ocr"):
        old_policy_decay(1, "nope")


def test_update_old_policy():
    old = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    new = [torch.nn.Parameter(torch.tensor([3.0, 6.0])), torch.nn.Parameter(torch.tensor([[1.0]]))]
    update_old_policy(old, new, 0.25)
    assert old[0].tolist() == pytest.approx([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6])
    assert old[1].item() == pytest.approx(0.75)
    update_old_policy(old, new, 0.0)  # decay 0: the old policy becomes the current one
    assert old[0].tolist() == [3.0, 6.0]


def test_refuses_non_flow_families():
    require_flow_family("wan")
    for family in ("sd", "sdxl", "animatediff"):
        with pytest.raises(NotImplementedError, match=f"flow-matching.*wan.*'{family}' samples with ddim"):
            require_flow_family(family)


def test_validate_names_the_key():
    problems = []
    require = lambda ok, key, value, expected: problems.append(key) if not ok else None  # noqa: E731
    validate_nft_settings(NFTConfig(), require)
    assert problems == []
    validate_nft_settings(NFTConfig(beta=0, old_decay="fast"), require)
    assert problems == ["method.beta", "method.old_decay"]
