"""The flow-matching training noise as configured (train.flow_*): timestep densities against diffusers' own
sampler, loss weightings by their formulas, FLUX's dynamic shift, and the config/one-line errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from diffalign.config import ConfigError, load_config
from diffalign.denoising import DDPMNoise, FlowMatchingNoise, denoising_losses
from diffalign.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
DRAWS = 20000


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = torch.cat([a, b]).unique()
    cdf = [torch.searchsorted(x.sort().values, grid, right=True).double() / len(x) for x in (a, b)]
    return float((cdf[0] - cdf[1]).abs().max())


def _diffusers_sigmas(noise: FlowMatchingNoise, density: str, **kw) -> torch.Tensor:
    """Sigmas as train_dreambooth_lora_sd3.py draws them: u from diffusers, index int(u N) into the table."""
    u = compute_density_for_timestep_sampling(density, DRAWS, generator=torch.Generator().manual_seed(1),
                                              logit_mean=kw.get("logit_mean"), logit_std=kw.get("logit_std"),
                                              mode_scale=kw.get("mode_scale"))
    return noise.scheduler.sigmas[(u * 1000).long().clamp(0, 999)].float()


@pytest.mark.parametrize(("density", "settings"), [
    ("logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}),
    ("logit_normal", {"logit_mean": 0.7, "logit_std": 0.5}),
    ("mode", {"mode_scale": 1.29}),
    ("mode", {"mode_scale": -0.8}),
])
def test_drawn_sigmas_follow_the_density_diffusers_draws(density, settings):
    noise = FlowMatchingNoise.from_pipeline_config(SD3_SCHEDULER, timestep_sampling=density, **settings)
    index = torch.randint(0, 1000, (DRAWS,), generator=torch.Generator().manual_seed(0))  # pair_noise's draws
    ours, timesteps = noise.sigmas_and_timesteps(index)
    theirs = _diffusers_sigmas(noise, density, **settings)
    # critical KS distance at alpha = 0.001 for two samples of 20000: 1.95 sqrt(2 / 20000) = 0.0195
    assert _ks(ours, theirs) < 0.0195
    torch.testing.assert_close(timesteps, ours * 1000)
    # the check has power: the uniform table (today's default) is far from these densities
    uniform = FlowMatchingNoise.from_pipeline_config(SD3_SCHEDULER).sigmas_and_timesteps(index)[0]
    assert _ks(uniform, theirs) > 0.05


def test_uniform_default_takes_the_index_as_drawn():
    noise = FlowMatchingNoise.from_pipeline_config(SD3_SCHEDULER)
    index = torch.tensor([0, 1, 500, 999])
    sigmas, _ = noise.sigmas_and_timesteps(index)
    plain = (1000 - index.double()) / 1000
    torch.testing.assert_close(sigmas.double(), 3 * plain / (1 + 2 * plain), atol=1e-6, rtol=0)


def test_flux_dynamic_shift_uses_the_token_count_mu():
    noise = FlowMatchingNoise.from_pipeline_config(FLUX_SCHEDULER, dynamic_shift=True)
    index = torch.tensor([0, 250, 500, 999])
    plain = (1000 - index.double()) / 1000  # FLUX's table is unshifted (use_dynamic_shifting)
    for h, w in ((32, 32), (128, 128)):  # 256 and 4096 packed tokens: mu = base_shift, max_shift
        mu = 0.5 if h == 32 else 1.15
        sigmas, timesteps = noise.sigmas_and_timesteps(index, (2, 16, h, w))
        expected = math.exp(mu) / (math.exp(mu) + 1 / plain - 1)
        torch.testing.assert_close(sigmas.double(), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(timesteps, sigmas * 1000)
    unshifted = FlowMatchingNoise.from_pipeline_config(FLUX_SCHEDULER)
    unshifted = unshifted.sigmas_and_timesteps(index, (2, 16, 32, 32))
    torch.testing.assert_close(unshifted[0].double(), plain, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def tiny_sd3(_offline_cache):
    from diffalign.models import load_pipeline

    return load_pipeline("tiny-sd3")


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap"])
def test_loss_weighting_multiplies_each_sample_loss_by_its_formula(tiny_sd3, weighting):
    family, transformer = FAMILIES["sd3"], tiny_sd3.transformer
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 16, 8, 8, generator=generator), torch.randn(3, 16, 8, 8, generator=generator)
    cond = {"encoder_hidden_states": torch.randn(3, 7, 64, generator=generator),
            "pooled_projections": torch.randn(3, 64, generator=generator)}
    index = torch.tensor([10, 400, 900])
    plain_noise = FAMILIES["sd3"].make_training_noise(tiny_sd3.scheduler.config)
    weighted_noise = family.make_training_noise(tiny_sd3.scheduler.config, loss_weighting=weighting)
    with torch.no_grad():
        plain = denoising_losses(transformer, family, plain_noise, x0, eps, index, cond)
        weighted = denoising_losses(transformer, family, weighted_noise, x0, eps, index, cond)
    p = (1000 - index.double()) / 1000
    s = 3 * p / (1 + 2 * p)  # tiny-sd3's shift 3
    w = s**-2 if weighting == "sigma_sqrt" else 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    torch.testing.assert_close(weighted.double(), plain.double() * w, rtol=1e-5, atol=0)
    assert not torch.allclose(weighted, plain)


def test_weighting_reaches_the_trainer(tmp_path):
    """Two DPO steps on tiny-sd3 from the same draws: the second loss (the first is log 2 whatever the
    weighting: LoRA starts at the reference) differs with cosmap: the key is wired into training."""
    losses = {}
    for weighting in ("none", "cosmap"):
        out = tmp_path / weighting
        overrides = [f"train.output_dir={out}", "train.max_steps=2", "log.every_n_steps=1",
                     "optim.learning_rate=2e-2", "optim.lr_warmup_steps=0",
                     "log.validation_every_n_steps=0", "log.progress_bar=false", "checkpoint.every_n_steps=0",
                     "eval.enabled=false", f"train.flow_loss_weighting={weighting}", "train.batch_size=2"]
        config = str(ROOT / "configs/tiny-sd3/dpo.yaml")
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        run = subprocess.run([sys.executable, "-m", "diffalign", "train", config, *overrides], env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        losses[weighting] = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["cosmap"] != losses["none"]


@pytest.mark.parametrize(("override", "key"), [
    ("train.flow_timestep_sampling=logit-normal", "train.flow_timestep_sampling"),
    ("train.flow_loss_weighting=cosine", "train.flow_loss_weighting"),
    ("train.flow_mode_scale=3.0", "train.flow_mode_scale"),
    ("train.flow_logit_std=0", "train.flow_logit_std"),
])
def test_bad_flow_keys_are_one_line_config_errors(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/tiny-sd3/dpo.yaml", [override])
    assert err.value.path == key and "\n" not in str(err.value)


def test_flow_settings_on_a_ddpm_model_or_a_static_shift_say_so():
    with pytest.raises(ValueError, match=r"train.flow_loss_weighting='cosmap'.*DDPM") as err:
        DDPMNoise.from_pipeline_config({"num_train_timesteps": 1000}, loss_weighting="cosmap")
    assert "\n" not in str(err.value)
    assert DDPMNoise.from_pipeline_config({"num_train_timesteps": 1000}, timestep_sampling="uniform")
    with pytest.raises(ValueError, match=r"train.flow_dynamic_shift=true.*static shift"):
        FlowMatchingNoise.from_pipeline_config(SD3_SCHEDULER, dynamic_shift=True)
