"""The trajectory sampler: parity with diffusers, exact log-probs, recomputation, LoRA gradients, records."""

import copy
import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffalign.sampler import Trajectory, recompute_log_probs, sample
from diffalign.steps import DDIMStep

PROMPTS = ["a red circle", "a blue square on green", "two yellow stars"]
SEEDS = [11, 12, 13]


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl):
    return sample(tiny_sdxl, PROMPTS, seeds=SEEDS, num_steps=6, guidance_scale=5.0, eta=1.0)


@pytest.mark.parametrize("pipe_name", ["tiny_sd", "tiny_sdxl"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_eta0_final_latents_equal_plain_diffusers(pipe_name, guidance, request):
    pipe = request.getfixturevalue(pipe_name)
    out = sample(pipe, PROMPTS, seeds=SEEDS, num_steps=5, guidance_scale=guidance, eta=0.0, decode=False)
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config, clip_sample=False, set_alpha_to_one=False)
    try:
        plain = pipe(PROMPTS, num_inference_steps=5, guidance_scale=guidance, eta=0.0, output_type="latent",
                     generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    finally:
        pipe.scheduler = original
    assert torch.allclose(out.trajectory.latents[:, -1], plain, atol=1e-5)
    assert not out.trajectory.stochastic.any()  # eta 0 has no density
    assert (out.trajectory.log_probs == 0).all()


def test_eta1_matches_diffusers_ddim_noise_draw(tiny_sdxl):
    """Same generator, same draws: with eta > 0 our step reproduces DDIMScheduler.step sample for sample."""
    out = sample(
        tiny_sdxl, PROMPTS[:2], seeds=SEEDS[:2], num_steps=4, guidance_scale=3.0, eta=0.7, decode=False
    )
    original = tiny_sdxl.scheduler
    tiny_sdxl.scheduler = DDIMScheduler.from_config(
        original.config, clip_sample=False, set_alpha_to_one=False
    )
    try:
        plain = tiny_sdxl(
            PROMPTS[:2],
            num_inference_steps=4,
            guidance_scale=3.0,
            eta=0.7,
            output_type="latent",
            generator=[torch.Generator().manual_seed(s) for s in SEEDS[:2]],
        ).images
    finally:
        tiny_sdxl.scheduler = original
    assert torch.allclose(out.trajectory.latents[:, -1], plain, atol=1e-5)


def test_record_shapes_and_conditioning(sdxl_run, tiny_sdxl):
    traj = sdxl_run.trajectory
    b, t = len(PROMPTS), 6
    assert (
        sdxl_run.images.shape == (b, 3, 32, 32) and 0 <= sdxl_run.images.min() and sdxl_run.images.max() <= 1
    )
    assert traj.latents.shape == (b, t + 1, 4, 16, 16)
    assert traj.log_probs.shape == (b, t) and traj.log_probs.dtype == torch.float32
    assert traj.timesteps.tolist() == [831, 665, 499, 333, 167, 1]
    assert traj.stochastic.all()
    assert traj.cond["encoder_hidden_states"].shape == (b, 77, 64)
    assert traj.cond["text_embeds"].shape == (b, 32) and traj.cond["time_ids"].shape == (b, 6)
    assert traj.cond["time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]
    # conditioning equals the pipeline's own prompt encoding
    pe, npe, pooled, npooled = tiny_sdxl.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=True
    )
    assert torch.allclose(traj.cond["encoder_hidden_states"], pe) and torch.allclose(
        traj.uncond["encoder_hidden_states"], npe
    )
    assert torch.allclose(traj.cond["text_embeds"], pooled) and torch.allclose(
        traj.uncond["text_embeds"], npooled
    )


def test_stored_log_probs_equal_independent_gaussian(sdxl_run, tiny_sdxl):
    """Recompute each step with diffusers' DDIMScheduler (zero noise gives the mean) and
    torch.distributions."""
    traj = sdxl_run.trajectory
    scheduler = DDIMScheduler.from_config(
        tiny_sdxl.scheduler.config, clip_sample=False, set_alpha_to_one=False
    )
    scheduler.set_timesteps(traj.num_steps)
    pe, npe, pooled, npooled = tiny_sdxl.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=True
    )
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(2 * len(PROMPTS), 1)
    eta = traj.step_rule["eta"]
    for i, t in enumerate(scheduler.timesteps):
        x_t = traj.latents[:, i]
        with torch.no_grad():
            out = tiny_sdxl.unet(
                torch.cat([x_t, x_t]),
                t,
                encoder_hidden_states=torch.cat([npe, pe]),
                added_cond_kwargs={"text_embeds": torch.cat([npooled, pooled]), "time_ids": time_ids},
            ).sample
        uncond, cond = out.chunk(2)
        eps = uncond + traj.guidance_scale * (cond - uncond)
        mean = scheduler.step(eps, t, x_t, eta=eta, variance_noise=torch.zeros_like(x_t)).prev_sample
        prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        std = eta * math.sqrt(scheduler._get_variance(int(t), prev_t))
        expected = torch.distributions.Normal(mean, std).log_prob(traj.latents[:, i + 1]).flatten(1).mean(1)
        assert torch.allclose(traj.log_probs[:, i], expected, atol=1e-4), i


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 6])
def test_recompute_equals_stored_any_chunking(sdxl_run, tiny_sdxl, chunk_size):
    traj = sdxl_run.trajectory
    with torch.no_grad():
        lp = recompute_log_probs(tiny_sdxl.unet, traj, chunk_size=chunk_size)
    assert torch.allclose(lp, traj.log_probs, atol=1e-5)


def test_recompute_chosen_steps_and_samples(sdxl_run, tiny_sdxl):
    traj = sdxl_run.trajectory
    sub = traj.select([2, 0])
    with torch.no_grad():
        lp = recompute_log_probs(tiny_sdxl.unet, sub, steps=[4, 1, 3], chunk_size=2)
    assert torch.allclose(lp, traj.log_probs[[2, 0]][:, [4, 1, 3]], atol=1e-5)


def test_sd_recompute_equals_stored(tiny_sd):
    out = sample(tiny_sd, PROMPTS, seeds=SEEDS, num_steps=4, guidance_scale=4.0, eta=1.0, decode=False)
    with torch.no_grad():
        lp = recompute_log_probs(tiny_sd.unet, out.trajectory, chunk_size=4)
    assert torch.allclose(lp, out.trajectory.log_probs, atol=1e-5)


def test_guidance_rescale_recorded_and_reproduced(tiny_sdxl):
    out = sample(
        tiny_sdxl,
        PROMPTS[:2],
        seeds=SEEDS[:2],
        num_steps=3,
        guidance_scale=6.0,
        guidance_rescale=0.7,
        decode=False,
    )
    assert out.trajectory.guidance_rescale == 0.7
    with torch.no_grad():
        lp = recompute_log_probs(tiny_sdxl.unet, out.trajectory, chunk_size=3)
    assert torch.allclose(lp, out.trajectory.log_probs, atol=1e-5)


def test_gradients_reach_lora_parameters(sdxl_run, tiny_sdxl):
    from peft import LoraConfig

    unet = copy.deepcopy(tiny_sdxl.unet)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    traj = sdxl_run.trajectory
    lp = recompute_log_probs(unet, traj, steps=[0, 3], chunk_size=2)
    # LoRA starts as the identity (B = 0): same log-probs as the sampling model
    assert torch.allclose(lp.detach(), traj.log_probs[:, [0, 3]], atol=1e-5)
    lp.mean().backward()
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora_" not in n)


def test_another_denoiser_gives_other_log_probs(sdxl_run, tiny_sdxl):
    unet = copy.deepcopy(tiny_sdxl.unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
        lp = recompute_log_probs(unet, sdxl_run.trajectory, chunk_size=3)
    assert not torch.allclose(lp, sdxl_run.trajectory.log_probs, atol=1e-3)


def test_seeds_make_each_image_independent_of_batch(tiny_sdxl):
    both = sample(tiny_sdxl, PROMPTS[:2], seeds=SEEDS[:2], num_steps=3, decode=False).trajectory
    alone = sample(tiny_sdxl, PROMPTS[1:2], seeds=SEEDS[1:2], num_steps=3, decode=False).trajectory
    # equal up to batch-size-dependent float rounding (~1e-6 relative); another seed differs by O(1)
    assert torch.allclose(both.latents[1], alone.latents[0], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(both.latents[0], alone.latents[0], atol=1e-1)


def test_trajectory_save_load_select_cat(sdxl_run, tmp_path):
    traj = sdxl_run.trajectory
    traj.save(tmp_path / "t.safetensors")
    loaded = Trajectory.load(tmp_path / "t.safetensors")
    assert torch.equal(loaded.latents, traj.latents) and torch.equal(loaded.log_probs, traj.log_probs)
    assert torch.equal(loaded.timesteps, traj.timesteps) and torch.equal(loaded.stochastic, traj.stochastic)
    assert loaded.prompts == traj.prompts and loaded.step_rule == traj.step_rule
    assert loaded.scheduler_config == traj.scheduler_config and loaded.guidance_scale == traj.guidance_scale
    assert all(torch.equal(loaded.uncond[k], traj.uncond[k]) for k in traj.uncond)
    joined = Trajectory.cat([traj.select([0]), traj.select([1, 2])])
    assert torch.equal(joined.latents, traj.latents) and joined.prompts == traj.prompts


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a diffalign trajectory"):
        Trajectory.load(tmp_path / "x.safetensors")


def test_bad_arguments(tiny_sdxl):
    with pytest.raises(ValueError, match="prompts must not be empty"):
        sample(tiny_sdxl, [], num_steps=2)
    with pytest.raises(ValueError, match="num_steps"):
        sample(tiny_sdxl, ["x"], num_steps=0)
    with pytest.raises(ValueError, match="eta"):
        DDIMStep(eta=-0.1)
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample(tiny_sdxl, ["x", "y"], seeds=[1], num_steps=2)


def test_keep_steps_stores_less_and_recomputes_the_kept_steps(sdxl_run, tiny_sdxl, tmp_path):
    traj = sdxl_run.trajectory
    compact = traj.keep_steps([1, 4])
    assert compact.latents.shape[1] == 4 and compact.latent_steps.tolist() == [1, 2, 4, 5]
    assert compact.nbytes() < traj.nbytes()
    with torch.no_grad():
        lp = recompute_log_probs(tiny_sdxl.unet, compact, steps=[4, 1], chunk_size=2)
    assert torch.allclose(lp, traj.log_probs[:, [4, 1]], atol=1e-5)
    with pytest.raises(ValueError, match=r"no longer stores the latents of positions \[0\]"):
        recompute_log_probs(tiny_sdxl.unet, compact, steps=[0])
    compact.save(tmp_path / "c.safetensors")
    assert torch.equal(Trajectory.load(tmp_path / "c.safetensors").latent_steps, compact.latent_steps)

    half = traj.keep_steps([2], dtype=torch.bfloat16)
    assert half.latents.dtype == torch.bfloat16 and half.cond["encoder_hidden_states"].dtype == torch.bfloat16
    assert half.nbytes() < compact.nbytes()
    # rounded latents: close to (~1e-3 at a mid step), not equal to, the stored log-probs
    with torch.no_grad():
        lp_half = recompute_log_probs(tiny_sdxl.unet, half, steps=[2])
    assert torch.allclose(lp_half, traj.log_probs[:, [2]], atol=5e-3)


def test_bf16_denoiser_and_text_encoders_decode_with_the_fp32_vae(tiny_sdxl_path):
    """Mixed precision keeps the VAE in fp32 while the text encoders (and so the latents) are bf16; the
    stock pipelines hand their VAE the latents as they are, which failed with a dtype mismatch."""
    from diffalign.models import load_pipeline

    pipe = load_pipeline(str(tiny_sdxl_path))
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).to(torch.bfloat16)
    out = sample(pipe, ["a red circle"], num_steps=2, guidance_scale=3.0, eta=1.0, seeds=[0])
    assert out.trajectory.latents.dtype == torch.bfloat16  # the trajectory keeps the sampling dtype
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    assert pipe.vae.dtype == torch.float32
