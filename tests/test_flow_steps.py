"""Flow-matching step rules: the published formulas, diffusers' Euler step at noise 0, exact recomputation."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffalign.steps import STEP_RULES, FlowCPSStep, FlowEulerStep, FlowSDEStep, make_step_rule

SHAPE = (3, 4, 6, 6)


def _scheduler(num_steps=10, shift=3.0):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _tensors(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    v = torch.randn(SHAPE, generator=g)
    return x.to(dtype), v.to(dtype)


def _gaussian(x, mean, std):
    # log N written out per element, then the mean over non-batch elements (Flow-GRPO / DanceGRPO)
    lp = (
        -((x - mean) ** 2) / (2 * std**2)
        - torch.log(std)
        - torch.log(torch.sqrt(torch.as_tensor(2 * math.pi)))
    )
    return lp.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("index", [0, 4, 9])
def test_flow_grpo_sde_matches_its_formula(index):
    scheduler, (x, v), a = _scheduler(), _tensors(), 0.7
    t = scheduler.timesteps[index]
    out = FlowSDEStep(noise_level=a)(scheduler, v, t, x, generator=torch.Generator().manual_seed(1))
    s, s_next = scheduler.sigmas[index], scheduler.sigmas[index + 1]
    dt = s_next - s
    s_tilde = scheduler.sigmas[1] if s == 1 else s  # sigma = 1 would divide by zero
    std_t = a * torch.sqrt(s / (1 - s_tilde))
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    torch.testing.assert_close(out.mean, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.std, (std_t * torch.sqrt(-dt)).expand(3), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        out.log_prob, _gaussian(out.prev_sample, mean, std_t * torch.sqrt(-dt)), rtol=1e-6, atol=1e-5
    )
    assert out.stochastic.all()
    if index == 0:
        assert s == 1 and torch.isfinite(out.std).all()


def test_constant_schedule_is_dance_grpo():
    scheduler, (x, v), eta = _scheduler(16), _tensors(), 0.3
    for index in (0, 7, 15):
        t = scheduler.timesteps[index]
        out = FlowSDEStep(noise_level=eta, noise_schedule="constant")(scheduler, v, t, x,
                                                                        generator=torch.Generator().manual_seed(2))
        # DanceGRPO's flux_step: the Euler mean plus the score term
        s, s_next = scheduler.sigmas[index], scheduler.sigmas[index + 1]
        dsigma = s_next - s
        x0 = x - s * v
        score = -(x - x0 * (1 - s)) / s**2
        mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
        std = eta * torch.sqrt(s - s_next)
        torch.testing.assert_close(out.mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.std, std.expand(3), rtol=1e-6, atol=0)
        torch.testing.assert_close(out.log_prob, _gaussian(out.prev_sample, mean, std), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("index", [0, 5, 8])
def test_cps_matches_flow_grpo_plus(index):
    scheduler, (x, v), a = _scheduler(), _tensors(), 0.8
    t = scheduler.timesteps[index]
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    out = FlowCPSStep(noise_level=a)(scheduler, v, t, x, generator=gen())
    s, s_next = scheduler.sigmas[index], scheduler.sigmas[index + 1]
    std = s_next * math.sin(a * math.pi / 2)
    mean = (x - s * v) * (1 - s_next) + (x + v * (1 - s)) * torch.sqrt(s_next**2 - std**2)
    torch.testing.assert_close(out.mean, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        out.prev_sample, mean + std * torch.randn(SHAPE, generator=gen()), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(out.log_prob, _gaussian(out.prev_sample, mean, std), rtol=1e-6, atol=1e-5)
    plain = FlowCPSStep(noise_level=a, density="squared_error")(
        scheduler, v, t, x, prev_sample=out.prev_sample
    )
    torch.testing.assert_close(
        plain.log_prob, (-((out.prev_sample - mean) ** 2)).mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-7
    )


def test_cps_last_step_has_no_density():
    scheduler, (x, v) = _scheduler(), _tensors()
    out = FlowCPSStep(noise_level=0.8)(scheduler, v, scheduler.timesteps[-1], x)
    assert not out.stochastic.any() and torch.equal(out.log_prob, torch.zeros(3))
    torch.testing.assert_close(out.prev_sample, x - scheduler.sigmas[-2] * v)  # x0_hat


@pytest.mark.parametrize("rule,dtype", [(FlowSDEStep(noise_level=0.0), torch.float32),
                                        (FlowEulerStep(), torch.float32), (FlowEulerStep(), torch.bfloat16)])
def test_noise_level_zero_is_diffusers_euler_bitwise(rule, dtype):
    ours, theirs = _scheduler(8), _scheduler(8)
    x, _ = _tensors(dtype)
    a = b = x
    for i, t in enumerate(theirs.timesteps):
        v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10 + i)).to(dtype)
        b = theirs.step(v, t, b, return_dict=False)[0]
        out = rule(ours, v, t, a)
        a = out.prev_sample
        assert a.dtype == b.dtype and torch.equal(a, b), f"step {i}"
        assert not out.stochastic.any() and torch.equal(out.log_prob, torch.zeros(3))


def test_cps_at_noise_zero_is_the_euler_step():
    scheduler, (x, v) = _scheduler(), _tensors()
    for t in scheduler.timesteps:
        euler = FlowEulerStep()(scheduler, v, t, x).prev_sample
        torch.testing.assert_close(
            FlowCPSStep(noise_level=0.0)(scheduler, v, t, x).prev_sample, euler, rtol=0, atol=1e-5
        )


RULES = [FlowSDEStep(0.7), FlowSDEStep(0.3, "constant"), FlowCPSStep(0.8), FlowCPSStep(0.8, "squared_error"),
         FlowSDEStep(0.7, reduction="sum"), FlowCPSStep(0.8, reduction="sum")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rule", RULES, ids=lambda r: f"{r.kind}-{'-'.join(str(v) for v in vars(r).values())}"
)
def test_recomputing_gives_the_stored_log_prob_exactly(rule, dtype):
    scheduler, (x, v) = _scheduler(), _tensors(dtype)
    for t in scheduler.timesteps[:-1]:
        drawn = rule(scheduler, v, t, x, generator=torch.Generator().manual_seed(4))
        again = rule(scheduler, v, t, x, prev_sample=drawn.prev_sample)
        assert drawn.prev_sample.dtype == dtype and drawn.log_prob.dtype == torch.float32
        assert torch.isfinite(drawn.log_prob).all() and drawn.stochastic.all()
        assert torch.equal(again.log_prob, drawn.log_prob)
        assert torch.equal(torch.exp(again.log_prob - drawn.log_prob), torch.ones(3))  # the on-policy ratio


@pytest.mark.parametrize("rule", RULES[:4], ids=lambda r: r.kind)
def test_log_prob_is_fp32_from_bf16_inputs(rule):
    scheduler, (x, v) = _scheduler(), _tensors(torch.bfloat16)
    t = scheduler.timesteps[3]
    drawn = rule(scheduler, v, t, x, generator=torch.Generator().manual_seed(5))
    upcast = rule(scheduler, v.float(), t, x.float(), prev_sample=drawn.prev_sample.float())
    assert drawn.log_prob.dtype == drawn.mean.dtype == torch.float32
    assert torch.equal(drawn.log_prob, upcast.log_prob) and torch.equal(drawn.mean, upcast.mean)


def test_reduction_sum_is_mean_times_elements():
    scheduler, (x, v) = _scheduler(), _tensors()
    t = scheduler.timesteps[2]
    mean_rule, sum_rule = FlowSDEStep(0.7), FlowSDEStep(0.7, reduction="sum")
    drawn = mean_rule(scheduler, v, t, x, generator=torch.Generator().manual_seed(6))
    summed = sum_rule(scheduler, v, t, x, prev_sample=drawn.prev_sample)
    torch.testing.assert_close(summed.log_prob, drawn.log_prob * math.prod(SHAPE[1:]), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("rule", [FlowSDEStep(0.7), FlowCPSStep(0.8), FlowEulerStep()], ids=lambda r: r.kind)
def test_per_row_timesteps_equal_one_step_at_a_time(rule):
    scheduler, (x, v) = _scheduler(), _tensors()
    prev = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ts = scheduler.timesteps[torch.tensor([0, 4, 8])]
    batched = rule(scheduler, v, ts, x, prev_sample=prev)
    for row, t in enumerate(ts):
        one = rule(scheduler, v[row:row + 1], t, x[row:row + 1], prev_sample=prev[row:row + 1])
        torch.testing.assert_close(batched.log_prob[row:row + 1], one.log_prob, rtol=0, atol=0)
        torch.testing.assert_close(batched.mean[row:row + 1], one.mean, rtol=0, atol=0)


def test_rules_are_named_and_rebuilt_from_their_settings():
    for rule in [*RULES, FlowEulerStep()]:
        assert STEP_RULES[rule.kind] is type(rule)
        assert make_step_rule(rule.kind, **vars(rule)) == rule  # what a trajectory records rebuilds the rule


@pytest.mark.parametrize("make,match", [
    (lambda: FlowSDEStep(0.7, reduction="max"), "reduction"),
    (lambda: FlowCPSStep(1.5), "noise_level"),
    (lambda: FlowCPSStep(0.5, density="other"), "density"),
    (lambda: FlowSDEStep(-0.1), "noise_level"),
])
def test_bad_settings_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_timestep_is_named():
    scheduler, (x, v) = _scheduler(), _tensors()
    with pytest.raises(ValueError, match="not among the scheduler"):
        FlowEulerStep()(scheduler, v, 123.456, x)
