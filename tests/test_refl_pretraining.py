"""ReFL's pretraining loss (``method.pretrain_data``, ``method.pretrain_loss_weight``): the loss formula, the
objective's term against the epsilon MSE written out, its gradient, CLI runs on a UNet and a flow family,
and the one-line refusals of inconsistent or unreadable settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from helpers.objective_context import objective_on_tiny_model

from diffalign.cli import main
from diffalign.config import ConfigError, load_config
from diffalign.data import EpochBatches
from diffalign.denoising import encode_images, keyed_generator, pair_noise, sample_latents
from diffalign.methods.reward_gradient import VARIANTS, RewardGradientConfig, reward_gradient_loss
from diffalign.objectives.reward_gradient import RewardGradientObjective

ROOT = Path(__file__).resolve().parents[1]
REFL = ROOT / "configs" / "tiny-sdxl" / "refl.yaml"
PAIRS = str(ROOT / "data" / "shapes-pairs")
PRETRAIN = [f"method.pretrain_data={PAIRS}", "method.pretrain_loss_weight=0.5", "data.resolution=32"]
FAST = ["train.max_steps=2", "eval.enabled=false", "log.every_n_steps=1", "log.progress_bar=false",
        "method.num_steps=4", "method.refl_step_range=[2,3]"]
SD3 = ["model.name=tiny-sd3", "lora.target_modules=[attn.to_q,attn.to_k,attn.to_v,attn.to_out.0]"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_loss_is_the_reward_loss_plus_w_times_the_pretraining_loss(variant):
    r = torch.tensor([0.5, 1.5, 2.5, 3.0])
    pretrain = torch.tensor(0.37)
    plain = reward_gradient_loss(r, RewardGradientConfig(variant=variant, loss_scale=1e-3))
    weighted = reward_gradient_loss(r, RewardGradientConfig(variant=variant, loss_scale=1e-3,
                                                            pretrain_loss_weight=0.25), pretrain)
    assert weighted.loss.item() == pytest.approx(plain.loss.item() + 0.25 * 0.37)
    assert weighted.extra["pretrain_loss"].item() == pytest.approx(0.37)
    assert "pretrain_loss" not in plain.extra
    with pytest.raises(ValueError, match="pretraining"):
        reward_gradient_loss(r, RewardGradientConfig(variant=variant, pretrain_loss_weight=0.25))


def _epsilon_mse(ctx, batch: dict, key: str) -> torch.Tensor:
    """The DDPM epsilon-prediction loss of a batch written out: ``|ε_θ(√ᾱ x0 + √(1-ᾱ) ε, t) - ε|²``, with the
    keyed draws the objective documents (posterior sample, noise and timestep per image index)."""
    vae, family = ctx.pipe.vae, ctx.family
    generators = [keyed_generator(f"{key}/posterior/{i}") for i in batch["index"].tolist()]
    x0 = sample_latents(vae, encode_images(vae, batch["pixels"]), generators)
    eps, t = pair_noise(batch["index"], key, tuple(x0.shape[1:]), 1000)
    alphas = DDPMScheduler.from_config(ctx.pipe.scheduler.config).alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alphas.sqrt() * x0 + (1 - alphas).sqrt() * eps
    cond = family.encode_prompt(ctx.pipe, batch["caption"], ctx.device)
    cond["time_ids"] = batch["time_ids"]
    return (family.call(ctx.unet, noisy, t, cond).float() - eps).pow(2).mean()


def _lora_grads(ctx, loss: torch.Tensor) -> list[torch.Tensor]:
    lora = [p for n, p in ctx.unet.named_parameters() if "lora_" in n]
    return list(torch.autograd.grad(loss, lora, allow_unused=False))


@pytest.mark.slow
def test_the_objective_adds_w_times_the_denoising_loss_of_its_batch_and_it_moves_the_gradient():
    """One micro-step with w = 0.5 against the same step with w = 0 (same prompts, seeds, ReFL step m and
    weights): the loss differs by w · the epsilon MSE of the first shuffled batch, written out, and the LoRA
    gradient by w · that MSE's gradient."""
    cfg = load_config(REFL, [*PRETRAIN, "method.num_steps=4", "method.refl_step_range=[2,3]",
                             "train.batch_size=2"])
    ctx, objective = objective_on_tiny_model(cfg)
    for name, p in ctx.unet.named_parameters():
        p.requires_grad_("lora_" in name)
    plain_cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, pretrain_data="",
                                                                     pretrain_loss_weight=0.0))
    plain = RewardGradientObjective(dataclasses.replace(ctx, cfg=plain_cfg))
    batch = next(objective.batches())
    assert batch == next(plain.batches())

    out = objective(batch)
    out_plain = plain(batch)
    first = next(iter(EpochBatches(objective.batches_of.dataset, ctx.accelerator, batch_size=2,
                                   seed=cfg.train.seed)))
    expected = _epsilon_mse(ctx, first, f"pretrain/{cfg.train.seed}/0")
    assert out.extra["pretrain_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.extra["reward_mean"].item() == pytest.approx(out_plain.extra["reward_mean"].item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(out_plain.loss.item() + 0.5 * expected.item(), rel=1e-5)

    grads, grads_plain = _lora_grads(ctx, out.loss), _lora_grads(ctx, out_plain.loss)
    grads_mse = _lora_grads(ctx, expected)
    assert max((g - h).abs().max().item() for g, h in zip(grads, grads_plain, strict=True)) > 1e-6
    for g, h, m in zip(grads, grads_plain, grads_mse, strict=True):
        torch.testing.assert_close(g - h, 0.5 * m, rtol=1e-3, atol=1e-6 * max(1.0, m.abs().max().item()))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3"])
def test_refl_with_the_pretraining_loss_trains_from_the_cli(model, tmp_path):
    out = tmp_path / model
    extra = SD3 if model == "tiny-sd3" else []
    assert main(["train", str(REFL), f"train.output_dir={out}", *FAST, *PRETRAIN, *extra]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["pretrain_loss"] > 0 and row["below_threshold"] == 1.0  # brightness < 2: every ReLU on
        assert row["loss"] == pytest.approx(1e-3 * (2.0 - row["reward_mean"]) + 0.5 * row["pretrain_loss"],
                                            rel=1e-5)
    saved = load_config(out / "config.yaml")
    assert saved.method.pretrain_data == PAIRS and saved.method.pretrain_loss_weight == 0.5


# ----------------------------------------------------------------------------------------------------
# Bad input: one line naming the key, before anything loads
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "pattern"), [
    (["method.pretrain_loss_weight=0.5"], r"method.pretrain_loss_weight.*method.pretrain_data set"),
    ([f"method.pretrain_data={PAIRS}"], r"method.pretrain_data.*unset while method.pretrain_loss_weight"),
    (["method.pretrain_loss_weight=-1", f"method.pretrain_data={PAIRS}"],
     r"method.pretrain_loss_weight.*a number >= 0"),
])
def test_a_weight_without_data_or_data_without_a_weight_is_one_config_error(overrides, pattern, capsys):
    with pytest.raises(ConfigError, match=pattern):
        load_config(REFL, overrides)
    assert main(["train", str(REFL), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]


def test_every_variant_takes_the_pretraining_term():
    for variant in VARIANTS:
        cfg = load_config(ROOT / "configs" / "tiny-sdxl" / f"{variant}.yaml", PRETRAIN)
        assert cfg.method.pretrain_loss_weight == 0.5


def test_an_unreadable_pretraining_dataset_is_one_line_naming_the_key(tmp_path, capsys):
    no_image = tmp_path / "captions.jsonl"
    no_image.write_text(json.dumps({"prompt": "a red circle", "picture": "x.png"}) + "\n")
    missing = tmp_path / "images.jsonl"
    missing.write_text(json.dumps({"prompt": "a red circle", "image": "nowhere.png"}) + "\n")
    for source, detail in [(tmp_path / "nope", "does not exist"), (ROOT / "data" / "tiny-prompts.txt",
                                                                     "expected a .jsonl"),
                           (no_image, "an image path 'image'"), (missing, "nowhere.png")]:
        overrides = [f"train.output_dir={tmp_path / 'run'}", "method.pretrain_loss_weight=0.5",
                     f"method.pretrain_data={source}"]
        assert main(["train", str(REFL), *overrides]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "config key 'method.pretrain_data'" in err[0] and detail in err[0], err
        assert not (tmp_path / "run").exists()  # refused before the run folder or any model


def test_a_relative_pretrain_data_in_a_config_file_is_relative_to_the_file(tmp_path):
    (tmp_path / "pairs").mkdir()
    config = tmp_path / "refl.yaml"
    prompts = ROOT / "data" / "tiny-prompts.txt"
    config.write_text(f"model: {{name: tiny-sdxl}}\nmethod: {{name: refl, prompts: {prompts}, reward: "
                      "brightness, pretrain_loss_weight: 0.5, pretrain_data: ./pairs}\n"
                      "eval: {enabled: false}\n")
    assert load_config(config).method.pretrain_data == str(tmp_path / "pairs")
