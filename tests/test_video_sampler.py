"""The trajectory sampler on text-to-video pipelines: AnimateDiff (DDIM) and Wan (flow-matching SDE)."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from diffalign.cli import main
from diffalign.sampler import Trajectory, recompute_log_probs, sample
from diffalign.steps import FlowSDEStep

PROMPTS = ["a red circle moving left", "a blue square"]
SEEDS = [3, 4]
FRAMES = {"tiny_animatediff": 4, "tiny_wan": 5}


@pytest.fixture(scope="module")
def tiny_animatediff(_offline_cache):
    from diffalign.models import load_pipeline

    pipe = load_pipeline("tiny-animatediff")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_wan(_offline_cache):
    from diffalign.models import load_pipeline

    pipe = load_pipeline("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


@pytest.mark.parametrize("name", ["tiny_animatediff", "tiny_wan"])
def test_deterministic_sampling_equals_plain_pipeline(name, request):
    pipe = request.getfixturevalue(name)
    kw = dict(num_frames=FRAMES[name], height=32, width=32)
    ours = sample(pipe, PROMPTS, seeds=SEEDS, num_steps=4, guidance_scale=4.0, eta=0.0, decode=False, **kw)
    original = pipe.scheduler
    if name == "tiny_animatediff":
        pipe.scheduler = DDIMScheduler.from_config(original.config)
        kw["eta"] = 0.0
    try:  # Wan's own scheduler is the Euler flow scheduler: the noise-free SDE step is its step
        plain = pipe(PROMPTS, num_inference_steps=4, guidance_scale=4.0, output_type="latent",
                     generator=[torch.Generator().manual_seed(s) for s in SEEDS], **kw)[0]
    finally:
        pipe.scheduler = original
    assert torch.allclose(ours.trajectory.latents[:, -1], plain, atol=1e-5)
    assert not ours.trajectory.stochastic.any()


@pytest.mark.parametrize("name", ["tiny_animatediff", "tiny_wan"])
def test_stochastic_video_trajectory_recomputes_exactly(name, request):
    pipe = request.getfixturevalue(name)
    out = sample(pipe, PROMPTS, seeds=SEEDS, num_steps=4, guidance_scale=4.0, eta=0.8,
                 num_frames=FRAMES[name], height=32, width=32)
    traj = out.trajectory
    assert out.images.shape == (2, FRAMES[name], 3, 32, 32)
    assert traj.latents.shape[:2] == (2, 5) and traj.log_probs.shape == (2, 4)
    assert (
        traj.cond["encoder_hidden_states"].shape[0] == 2
        and traj.uncond["encoder_hidden_states"].shape[0] == 2
    )
    with torch.no_grad():
        one = recompute_log_probs(_denoiser(pipe), traj, chunk_size=1)
        batched = recompute_log_probs(_denoiser(pipe), traj, chunk_size=4)
    assert torch.allclose(one, traj.log_probs, atol=1e-5) and torch.allclose(
        batched, traj.log_probs, atol=1e-5
    )


def test_flow_sde_log_prob_matches_formula(tiny_wan):
    """Check the Wan record against the Flow-GRPO step written out independently with torch.distributions."""
    a = 0.7
    out = sample(tiny_wan, PROMPTS[:1], seeds=SEEDS[:1], num_steps=3, guidance_scale=1.0, eta=a, num_frames=5,
                 height=32, width=32, decode=False)
    traj = out.trajectory
    assert traj.step_rule == {
        "kind": "flow_sde",
        "noise_level": a,
        "noise_schedule": "flow_grpo",
        "reduction": "mean",
    }
    scheduler = FlowSDEStep.make_scheduler(traj.scheduler_config)
    scheduler.set_timesteps(3)
    sigmas = scheduler.sigmas.tolist()
    for i in range(3):
        x = traj.latents[:, i]
        with torch.no_grad():
            v = tiny_wan.transformer(
                hidden_states=x,
                timestep=traj.timesteps[i : i + 1],
                encoder_hidden_states=traj.cond["encoder_hidden_states"],
                return_dict=False,
            )[0]
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        dt = sigma_next - sigma
        std_t = a * math.sqrt(sigma / (1 - (sigmas[1] if sigma == 1 else sigma)))
        mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        expected = (
            torch.distributions.Normal(mean, std_t * math.sqrt(-dt)).log_prob(traj.latents[:, i + 1]).mean()
        )
        assert traj.log_probs[0, i].item() == pytest.approx(expected.item(), abs=1e-4)


def test_trajectory_file_round_trip_keeps_float_timesteps(tiny_wan, tmp_path):
    out = sample(tiny_wan, PROMPTS, seeds=SEEDS, num_steps=2, guidance_scale=3.0, eta=0.5, num_frames=5,
                 height=32, width=32, decode=False)
    out.trajectory.save(tmp_path / "t.safetensors")
    loaded = Trajectory.load(tmp_path / "t.safetensors")
    assert loaded.timesteps.dtype == torch.float32 and torch.equal(loaded.timesteps, out.trajectory.timesteps)
    with torch.no_grad():
        assert torch.allclose(
            recompute_log_probs(tiny_wan.transformer, loaded), out.trajectory.log_probs, atol=1e-5
        )


@pytest.mark.slow
def test_cli_tiny_and_sample_write_videos(tmp_path):
    assert main(["tiny", "wan", str(tmp_path / "wan")]) == 0
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "wan")).__name__ == "WanPipeline"
    out = tmp_path / "out"
    assert (
        main(
            [
                "sample",
                "--model",
                str(tmp_path / "wan"),
                "--prompt",
                "a cat",
                "--num-frames",
                "5",
                "--steps",
                "2",
                "--height",
                "32",
                "--width",
                "32",
                "--out",
                str(out),
                "--save-trajectories",
            ]
        )
        == 0
    )
    from PIL import Image

    video = Image.open(out / "00000.webp")
    assert video.n_frames == 5 and video.size == (32, 32)
    assert (out / "00000.gif").exists()
    assert Trajectory.load(out / "trajectories.safetensors").family == "wan"
