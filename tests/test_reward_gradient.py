"""Reward-gradient methods (DRaFT, DRaFT-K, DRaFT-LV, AlignProp, ReFL): which steps carry gradients, gradients
through the differentiable sampler against finite differences, checkpointing, the losses and the scorer
check."""

import pytest
import torch
from diffusers import DDIMScheduler
from torch.func import functional_call

from diffalign.methods.reward_gradient import (
    RewardGradientConfig,
    alignprop_truncation,
    differentiable_sample,
    draft_lv_sample,
    gradient_steps,
    require_differentiable,
    reward_gradient_loss,
    sample_for_reward,
    validate_reward_gradient_settings,
)
from diffalign.scorers import make_scorer

N = 6
TIMESTEPS = list(range(N))


class TinyDenoiser(torch.nn.Module):
    """A real (tiny) module, plus one gain per sampler step so each step's share of the gradient is
    visible."""

    def __init__(self, dim=3, steps=N):
        super().__init__()
        self.net = torch.nn.Linear(dim, dim)
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.0, steps))

    def forward(self, x, t):
        return self.step(x, t)

    def step(self, x, t):
        return x - 0.2 * self.gain[t] * torch.tanh(self.net(x))

    def x0(self, x, t):
        return x - self.gain[t] * self.net(x)


def _reward(x):
    return torch.sin(x).sum(dim=-1)  # smooth, non-linear


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyDenoiser().double()


def _x_T(seed=1):
    return torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _add_noise(x0, noise, t):
    return 0.9 * x0 + 0.3 * noise


def _grads(model, cfg, *, checkpoint, seed=0):
    model.zero_grad()
    cfg = RewardGradientConfig(**{**cfg.__dict__, "checkpoint": checkpoint})
    x, steps = sample_for_reward(cfg, model.step, _x_T(), TIMESTEPS, x0_fn=model.x0, add_noise=_add_noise,
                                 generator=torch.Generator().manual_seed(seed))
    reward_gradient_loss(_reward(x), cfg).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, steps


VARIANT_CONFIGS = {
    "draft": RewardGradientConfig(variant="draft"),
    "draft_k": RewardGradientConfig(variant="draft_k", k=2),
    "draft_lv": RewardGradientConfig(variant="draft_lv", lv_renoisings=3),
    "alignprop": RewardGradientConfig(variant="alignprop", truncation_mean=3.5, truncation_std=1.0),
    "refl": RewardGradientConfig(variant="refl", refl_step_range=(2, 4)),
}


def test_gradient_steps_follow_each_variants_rule():
    assert gradient_steps(RewardGradientConfig(variant="draft"), 50) == range(50)
    assert gradient_steps(RewardGradientConfig(variant="draft_k", k=3), 50) == range(47, 50)
    assert gradient_steps(RewardGradientConfig(variant="draft_lv"), 50) == range(49, 50)
    fixed = RewardGradientConfig(variant="alignprop", truncation_mean=49, truncation_std=0)
    assert gradient_steps(fixed, 50) == range(49, 50)  # AlignProp's fixed 49: DRaFT-1
    g = torch.Generator().manual_seed(0)
    draws = [alignprop_truncation(50, 42, 5, g) for _ in range(2000)]
    assert 1 <= min(draws) and max(draws) <= 49
    assert abs(sum(draws) / len(draws) - 41.5) < 0.5  # int() of N(42, 5) truncates: mean ~ 41.5
    assert alignprop_truncation(50, -10, 0) == 1 and alignprop_truncation(50, 80, 0) == 49  # clamped
    g = torch.Generator().manual_seed(0)
    refl = [gradient_steps(RewardGradientConfig(variant="refl"), 40, g) for _ in range(500)]
    assert all(len(r) == 1 for r in refl)
    assert {r[0] for r in refl} == set(range(30, 40))  # U{30 .. 39}, both ends included


@pytest.mark.parametrize("variant", list(VARIANT_CONFIGS))
def test_only_the_rule_s_steps_receive_gradient(variant):
    model = _model()
    grads, steps = _grads(model, VARIANT_CONFIGS[variant], checkpoint=True)
    nonzero = {i for i in range(N) if grads["gain"][i] != 0}
    assert nonzero == set(steps)
    assert grads["net.weight"].abs().sum() > 0


@pytest.mark.parametrize("variant", list(VARIANT_CONFIGS))
def test_checkpointing_gives_the_same_gradients(variant):
    model = _model()
    on, steps_on = _grads(model, VARIANT_CONFIGS[variant], checkpoint=True)
    off, steps_off = _grads(model, VARIANT_CONFIGS[variant], checkpoint=False)
    assert steps_on == steps_off
    for name in on:
        torch.testing.assert_close(on[name], off[name], rtol=0, atol=1e-12)


def test_full_draft_gradient_matches_finite_differences():
    model = _model()
    names = [n for n, _ in model.named_parameters()]

    def reward_of(*values):
        step = lambda x, t: functional_call(model, dict(zip(names, values, strict=True)), (x, t))  # noqa: E731
        return _reward(differentiable_sample(step, _x_T(), TIMESTEPS, range(N))).sum()

    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(reward_of, params)


@pytest.mark.parametrize("variant", ["draft_k", "alignprop", "refl"])
def test_truncated_gradient_is_the_exact_partial_derivative_of_the_gradient_steps(variant):
    # The gains of the gradient steps only act inside those steps, so the truncated gradient with respect
    # to them is the true derivative of the reward: check it against finite differences.
    model = _model()
    cfg = VARIANT_CONFIGS[variant]
    steps = gradient_steps(cfg, N, torch.Generator().manual_seed(0))
    base_gain = model.gain.detach().clone()

    def reward_of(active_gains):
        gain = base_gain.clone()
        gain[list(steps)] = active_gains
        step = lambda x, t: x - 0.2 * gain[t] * torch.tanh(model.net(x))  # noqa: E731
        x0 = lambda x, t: x - gain[t] * model.net(x)  # noqa: E731
        x, drawn = sample_for_reward(cfg, step, _x_T(), TIMESTEPS, x0_fn=x0, add_noise=_add_noise,
                                     generator=torch.Generator().manual_seed(0))
        assert drawn == steps
        return _reward(x).mean()

    active = base_gain[list(steps)].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(reward_of, (active,))


def test_draft_lv_gradient_matches_finite_differences_with_the_final_sample_held():
    # DRaFT-LV's final sample is a constant for autograd; given it, the gradient of the re-noised last
    # step is exact.
    model = _model()
    x0 = _x_T(2)

    def reward_of(gain_last):
        step = lambda x, t: x - 0.2 * gain_last * torch.tanh(model.net(x))  # noqa: E731
        x = draft_lv_sample(step, _add_noise, x0, N - 1, 3, torch.Generator().manual_seed(0))
        assert x.shape == (3 * len(x0), 3)
        return _reward(x).mean()

    assert torch.autograd.gradcheck(reward_of, (torch.tensor(0.7, dtype=torch.float64, requires_grad=True),))


def test_checkpointing_bounds_the_memory_saved_for_backward():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
    step = lambda x, t: x - 0.1 * net(x)  # noqa: E731
    x_T = torch.randn(8, 64)

    def saved_bytes(checkpoint, num_grad_steps):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = differentiable_sample(
                step, x_T, list(range(20)), range(20 - num_grad_steps, 20), checkpoint
            )
        out.sum().backward()
        return total

    assert saved_bytes(True, 10) < saved_bytes(False, 10) / 2
    # without checkpointing the graph grows with the gradient steps; the no-gradient steps keep nothing
    assert saved_bytes(False, 2) < saved_bytes(False, 10)


def test_ddim_scheduler_steps_around_a_conv_denoiser():
    """DRaFT-K through diffusers' deterministic DDIM step on a tiny Conv2d epsilon model (float64)."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(4)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).double()
    x_T = torch.randn(1, 2, 4, 4, dtype=torch.float64)

    def run(weight, bias, grad_steps, checkpoint=True):
        def step(x, t):
            eps = torch.nn.functional.conv2d(x, weight, bias, padding=1)
            return scheduler.step(eps, t, x, eta=0.0).prev_sample

        x = differentiable_sample(step, x_T, list(scheduler.timesteps), grad_steps, checkpoint)
        return (x.tanh() ** 2).mean()

    w, b = conv.weight.detach().clone().requires_grad_(True), conv.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w_, b_: run(w_, b_, range(4)), (w, b))
    g_on = torch.autograd.grad(run(w, b, range(2, 4), True), (w, b))
    g_off = torch.autograd.grad(run(w, b, range(2, 4), False), (w, b))
    for a, c in zip(g_on, g_off, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-14)


def test_losses_equal_their_formulas():
    r = torch.tensor([0.5, 1.5, 2.5, 3.0], requires_grad=True)
    out = reward_gradient_loss(r, RewardGradientConfig(variant="alignprop", loss_scale=0.01))
    assert out.loss.item() == pytest.approx(-0.01 * (0.5 + 1.5 + 2.5 + 3.0) / 4)
    refl = RewardGradientConfig(variant="refl", refl_threshold=2.0, loss_scale=1e-3, pretrain_loss_weight=0.5)
    out = reward_gradient_loss(r, refl, pretrain_loss=torch.tensor(0.2))
    assert out.loss.item() == pytest.approx(1e-3 * (1.5 + 0.5 + 0 + 0) / 4 + 0.5 * 0.2)
    assert out.extra["below_threshold"].item() == 0.5
    (grad,) = torch.autograd.grad(out.loss, r)
    assert grad.tolist() == pytest.approx([-1e-3 / 4, -1e-3 / 4, 0.0, 0.0])  # satisfied samples get none
    with pytest.raises(ValueError, match="pretraining"):
        reward_gradient_loss(r, refl)


def test_invalid_gradient_steps_and_missing_callables_are_refused():
    with pytest.raises(ValueError, match="consecutive"):
        differentiable_sample(lambda x, t: x, torch.zeros(1), TIMESTEPS, [1, 3])
    with pytest.raises(ValueError, match="consecutive"):
        differentiable_sample(lambda x, t: x, torch.zeros(1), TIMESTEPS, range(4, 8))
    with pytest.raises(ValueError, match="x0_fn"):
        sample_for_reward(RewardGradientConfig(variant="refl", refl_step_range=(1, 2)), lambda x, t: x,
                          torch.zeros(1), TIMESTEPS)
    with pytest.raises(ValueError, match="add_noise"):
        sample_for_reward(RewardGradientConfig(variant="draft_lv"), lambda x, t: x, torch.zeros(1), TIMESTEPS)


def test_validate_names_the_key():
    problems = []
    require = lambda ok, key, value, expected: problems.append(key) if not ok else None  # noqa: E731
    validate_reward_gradient_settings(RewardGradientConfig(), require, 50)
    validate_reward_gradient_settings(RewardGradientConfig(variant="refl"), require, 40)
    assert problems == []
    validate_reward_gradient_settings(RewardGradientConfig(variant="refl", k=60), require, 20)
    assert problems == ["method.k", "method.refl_step_range"]


def test_non_differentiable_scorers_are_refused_clearly():
    require_differentiable(make_scorer("toy_saturation"))
    require_differentiable(make_scorer("2*toy_saturation+brightness"))
    with pytest.raises(ValueError, match="jpeg_incompressibility is not differentiable.*toy_saturation"):
        require_differentiable(make_scorer("jpeg_incompressibility"))
    with pytest.raises(ValueError, match=r"scorer jpeg_compressibility is not"):
        require_differentiable(make_scorer("brightness+jpeg_compressibility"))
