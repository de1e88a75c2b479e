"""The reward-gradient methods in the trainer (DRaFT, DRaFT-K, DRaFT-LV, AlignProp, ReFL): end to end from the
CLI on UNet and flow families, the objective's latents against the tested sampler, finite differences through
the wired path (denoiser steps, VAE decode) and the non-differentiable-scorer refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.objective_context import objective_on_tiny_model
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.config import ConfigError, load_config
from diffalign.denoising import decode_latents
from diffalign.methods.reward_gradient import VARIANTS, sample_for_reward
from diffalign.objectives.reward_gradient import ChainSteps, latents_for_reward

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.max_steps=2", "eval.enabled=false", "log.every_n_steps=1", "log.progress_bar=false",
        "method.num_steps=4"]
SHORTER = {"alignprop": ["method.truncation_mean=2.5", "method.truncation_std=1.0"],
           "refl": ["method.refl_step_range=[2,3]"]}
SD3 = ["model.name=tiny-sd3", "lora.target_modules=[attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,"
       "attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,attn.to_add_out]"]
WAN = ["model.name=tiny-wan", "lora.target_modules=[to_q,to_k,to_v,to_out.0]", "method.height=16",
       "method.width=16", "method.num_frames=5"]


def _train(config: str, out: Path, *extra: str) -> list[dict]:
    assert main(["train", str(ROOT / "configs" / config), f"train.output_dir={out}", *FAST, *extra]) == 0
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    # LoRA B starts at zero: a non-zero B after training means the reward's gradient reached the adapters
    assert any(("lora_B" in k or "lora.up" in k) and v.abs().max() > 0 for k, v in weights.items())
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_from_the_cli_on_tiny_sdxl(variant, tmp_path):
    rows = _train(f"tiny-sdxl/{variant}.yaml", tmp_path / variant, *SHORTER.get(variant, []))
    assert len(rows) == 2
    for row in rows:
        assert {"loss", "reward_mean", "reward_std", "first_gradient_step", "gradient_steps"} <= row.keys()
        assert 0 < row["reward_mean"] < 1 and row["reward_std"] >= 0
    expected_steps = {"draft": 4, "draft_k": 2, "draft_lv": 1, "refl": 1}
    if variant in expected_steps:
        assert rows[0]["gradient_steps"] == expected_steps[variant]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-wan"])
def test_draft_k_trains_on_flow_families(model, tmp_path):
    rows = _train("tiny-sd3/draft_k.yaml", tmp_path / model, *(WAN if model == "tiny-wan" else []))
    assert rows[-1]["gradient_steps"] == 2 and "reward_std" in rows[-1]


@pytest.mark.slow
def test_refl_trains_on_a_flow_family(tmp_path):
    _train("tiny-sdxl/refl.yaml", tmp_path / "refl", *SD3, "method.refl_step_range=[2,3]")


# ----------------------------------------------------------------------------------------------------
# The objective's latents, and gradients through the wired path
# ----------------------------------------------------------------------------------------------------
def _context(model: str, variant: str, dtype=torch.float32, **overrides):
    """A trainer context and objective on a built-in tiny model whose LoRA B is not zero (so the adapters
    change the output and every LoRA tensor carries gradient)."""
    extra = SD3 if model == "tiny-sd3" else []
    cfg = load_config(ROOT / "configs" / "tiny-sdxl" / f"{variant}.yaml", [*extra, "method.num_steps=4",
                                                                            "train.batch_size=2",
                                                   *[f"method.{k}={v}" for k, v in overrides.items()]])
    return objective_on_tiny_model(cfg, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_objective_latents_equal_sample_for_reward_from_x_T(model, variant):
    """The objective starts the gradient steps from the sampler's stored chain; the tested
    ``sample_for_reward`` runs the whole chain from x_T itself. Same draw, same latents to score."""
    overrides = {"alignprop": {"truncation_mean": 2.5, "truncation_std": 1.0},
                 "refl": {"refl_step_range": "[1,3]"}}.get(variant, {})
    ctx, objective = _context(model, variant, **overrides)
    prompts, seeds = next(objective.batches())
    trajectory = objective.sample_chain(prompts, seeds)
    chain = ChainSteps(ctx.unet, ctx.family, trajectory, ctx.device, ctx.weight_dtype)
    with torch.no_grad():
        ours, steps = latents_for_reward(ctx.cfg.method, chain, trajectory.latents,
                                         torch.Generator().manual_seed(3))
        theirs, their_steps = sample_for_reward(ctx.cfg.method, chain.step, trajectory.latents[:, 0],
                                                list(trajectory.timesteps), x0_fn=chain.x0,
                                                add_noise=chain.add_noise,
                                                generator=torch.Generator().manual_seed(3))
    assert steps == their_steps
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    if variant == "draft":  # the recomputed chain is the sampler's own
        torch.testing.assert_close(ours, trajectory.latents[:, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3"])
@pytest.mark.parametrize("variant", ["draft", "draft_k", "refl"])
def test_gradient_through_the_wired_path_matches_finite_differences(model, variant):
    """float64: the reward (mean decoded pixel) of the wired steps and VAE decode, as a function of one LoRA
    tensor along a random direction, against its autograd derivative (the stored prefix held fixed)."""
    overrides = {"refl": {"refl_step_range": "[2,2]"}, "draft_k": {"k": 2}}.get(variant, {})
    ctx, objective = _context(model, variant, torch.float64, **overrides)
    prompts, seeds = next(objective.batches())
    trajectory = objective.sample_chain(prompts, seeds)
    lora = [p for n, p in ctx.unet.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)

    def reward(direction=None, eps: float = 0.0) -> torch.Tensor:
        base = [p.detach().clone() for p in lora]
        if direction is not None:
            with torch.no_grad():
                for p, d in zip(lora, direction, strict=True):
                    p.add_(eps * d)
        try:
            chain = ChainSteps(ctx.unet, ctx.family, trajectory, ctx.device, torch.float64)
            x, _ = latents_for_reward(ctx.cfg.method, chain, trajectory.latents.double(), None)
            s = objective.sampling
            images = decode_latents(ctx.pipe.vae, ctx.family.training_latents(ctx.pipe, x, s.height, s.width))
            return images.mean()
        finally:
            with torch.no_grad():
                for p, b in zip(lora, base, strict=True):
                    p.copy_(b)

    grads = torch.autograd.grad(reward(), lora)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    direction = [g / norm for g in grads]  # the steepest direction: its derivative is the gradient's norm
    # the step rules compute in fp32 whatever the model's dtype: a wide step, a 1 % tolerance
    eps = 1e-2
    with torch.no_grad():
        numeric = float((reward(direction, eps) - reward(direction, -eps)) / (2 * eps))
    assert float(norm) > 1e-6
    assert float(norm) == pytest.approx(numeric, rel=1e-2)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reward", ["toy_geneval", "brightness+jpeg_incompressibility", "remote:http://localhost:1"])
def test_a_non_differentiable_reward_is_one_config_error_before_anything_loads(reward, capsys):
    path = ROOT / "configs" / "tiny-sdxl" / "draft_k.yaml"
    with pytest.raises(ConfigError, match=r"method.reward.*differentiable scorer.*is not differentiable"):
        load_config(path, [f"method.reward={reward}"])
    assert main(["train", str(path), f"method.reward={reward}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not differentiable" in err[0] and "Traceback" not in err[0]


def test_a_variant_refuses_another_variant_s_settings_and_a_pretraining_weight_without_data():
    path = ROOT / "configs" / "tiny-sdxl"
    with pytest.raises(ConfigError, match=r"method.k.*unset: k is a setting of draft_k, not of alignprop"):
        load_config(path / "alignprop.yaml", ["method.k=2"])
    with pytest.raises(ConfigError, match=r"method.refl_threshold.*a setting of refl"):
        load_config(path / "draft.yaml", ["method.refl_threshold=1.0"])
    with pytest.raises(ConfigError, match=r"method.pretrain_loss_weight.*method.pretrain_data set"):
        load_config(path / "refl.yaml", ["method.pretrain_loss_weight=0.5"])
    with pytest.raises(ConfigError, match=r"method.k.*\[1, num_steps\]"):
        load_config(path / "draft_k.yaml", ["method.k=9"])
