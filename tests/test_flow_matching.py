"""Flow-matching training pieces on fixed tensors: timestep densities, shifts, loss weights, FLUX packing."""

import math

import pytest
import torch

from diffalign import flow_matching as fm

SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def test_densities():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    u = fm.draw_u("logit_normal", 20000, logit_mean=0.5, logit_std=2.0, generator=g())
    logits = torch.logit(u.double())
    assert abs(logits.mean() - 0.5) < 0.05 and abs(logits.std() - 2.0) < 0.05
    uniform = fm.draw_u("uniform", 20000, generator=g())
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.01
    mode = fm.draw_u("mode", 20000, mode_scale=1.29, generator=g())
    # the mode density is f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) of a uniform u (same generator, same u)
    expected = 1 - uniform - 1.29 * (torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
    torch.testing.assert_close(mode, expected)
    with pytest.raises(ValueError, match="timestep density"):
        fm.draw_u("logit-normal", 4)


def test_sd3_sigmas_carry_the_static_shift():
    scheduler = fm.training_scheduler(SD3_SCHEDULER)
    u = torch.tensor([0.0, 0.25, 0.5, 0.999])
    sigmas, timesteps = fm.training_sigmas(scheduler, u)
    index = (u * 1000).long()
    unshifted = (1000 - index).double() / 1000
    torch.testing.assert_close(sigmas.double(), fm.static_shift(unshifted, 3.0), rtol=1e-6, atol=1e-6)
    assert sigmas[0] == 1 and abs(sigmas[2] - 0.75) < 1e-6  # k s / (1 + (k-1) s) at s = 0.5, k = 3
    torch.testing.assert_close(timesteps, sigmas * 1000)
    with pytest.raises(ValueError, match="static shift"):
        fm.training_sigmas(scheduler, u, mu=0.7)


def test_flux_sigmas_take_the_dynamic_shift_of_the_token_count():
    scheduler = fm.training_scheduler(FLUX_SCHEDULER)
    u = torch.tensor([0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="pass mu"):
        fm.training_sigmas(scheduler, u)
    assert fm.packed_seq_len(128, 128) == 4096  # 1024 px FLUX
    assert fm.flux_mu(256, FLUX_SCHEDULER) == pytest.approx(0.5) and fm.flux_mu(
        4096, FLUX_SCHEDULER
    ) == pytest.approx(1.15)
    mu = fm.flux_mu(1024, FLUX_SCHEDULER)
    assert mu == pytest.approx(0.5 + 0.65 * (1024 - 256) / (4096 - 256))
    sigmas, timesteps = fm.training_sigmas(scheduler, u, mu=mu)
    s = (1000 - (u * 1000).long()).double() / 1000
    expected = math.exp(mu) / (math.exp(mu) + 1 / s - 1)
    torch.testing.assert_close(sigmas.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(timesteps, sigmas * 1000)
    # the shift FluxPipeline gives its sampling schedule (sigmas linspace(1, 1/N, N), then mu)
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)
    base = torch.tensor([1.0, 0.75, 0.5, 0.25])
    sampled, _ = fm.training_sigmas(fm.training_scheduler(FLUX_SCHEDULER), 1 - base, mu=mu)
    torch.testing.assert_close(scheduler.sigmas[:4], sampled, rtol=1e-6, atol=1e-6)


def test_loss_weights():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(
        fm.loss_weights("cosmap", sigmas), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    )
    torch.testing.assert_close(fm.loss_weights("sigma_sqrt", sigmas), sigmas**-2)
    assert torch.equal(fm.loss_weights("none", sigmas), torch.ones(3))
    with pytest.raises(ValueError, match="loss weighting"):
        fm.loss_weights("sigma-sqrt", sigmas)  # diffusers itself would silently weight by 1


def test_interpolation_and_loss():
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    sigmas = torch.tensor([0.2, 0.8])
    x_t, target = fm.interpolate(x0, noise, sigmas)
    torch.testing.assert_close(x_t[1], 0.2 * x0[1] + 0.8 * noise[1])
    torch.testing.assert_close(target, noise - x0)
    assert torch.equal(fm.flow_matching_losses(target, x0, noise, sigmas), torch.zeros(2))
    plain = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(fm.flow_matching_losses(pred, x0, noise, sigmas), plain)
    torch.testing.assert_close(fm.flow_matching_losses(pred, x0, noise, sigmas, "cosmap"),
                               plain * fm.loss_weights("cosmap", sigmas))
    bf16 = fm.flow_matching_losses(pred.bfloat16(), x0.bfloat16(), noise.bfloat16(), sigmas)
    assert bf16.dtype == torch.float32


def test_flux_packing_and_ids():
    latents = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).view(2, 16, 4, 6)
    packed = fm.pack_latents(latents)
    assert packed.shape == (2, fm.packed_seq_len(4, 6), 64)
    for row in range(2):
        for col in range(3):
            # token (row, col) holds the 2x2 patch, channel-major: (C, 2, 2) flattened
            assert torch.equal(
                packed[1, row * 3 + col],
                latents[1, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].reshape(-1),
            )
    assert torch.equal(fm.unpack_latents(packed, 4, 6), latents)
    ids = fm.latent_image_ids(4, 6)
    assert ids.shape == (6, 3) and ids[:, 0].eq(0).all()
    assert ids[4].tolist() == [0, 1, 1] and ids[2].tolist() == [0, 0, 2]
    with pytest.raises(ValueError, match="even"):
        fm.pack_latents(torch.zeros(1, 16, 5, 6))
