"""PRDP and DDPO: losses against hand-worked values, the online loop's fault handling, and short runs."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from diffalign.methods.ddpo import ddpo_loss, per_prompt_advantages
from diffalign.methods.prdp import prdp_loss, reward_pairs
from diffalign.objectives.online import OnlineBatch, RewardError, filter_rewards, make_reward, micro_batches
from diffalign.prompt_sets import load_prompt_source


# ----------------------------------------------------------------------------------------------------
# PRDP loss
# ----------------------------------------------------------------------------------------------------
def _prdp_inputs():
    logp = torch.tensor([[0.3, 0.1], [0.0, 0.2]], requires_grad=True)
    ref = torch.tensor([[0.1, 0.1], [0.1, 0.1]])
    return logp, ref.clone(), ref, torch.tensor([1.0, 0.5]), torch.tensor([0, 0])


def test_prdp_loss_hand_worked_mean():
    # r̂_t = [[.2, 0], [-.1, .1]] -> r̂ = [.1, 0]; target (1 - .5)/β = .5; l = (.1 - .5)² = .16
    # old ratios are 0, ε = .05: clipped r̂_t = [[.05, 0], [-.05, .05]] -> [.025, 0]; l_clip = .475² = .225625
    logp, old, ref, rewards, groups = _prdp_inputs()
    out = prdp_loss(logp, old, ref, rewards, groups, beta=1.0, clip_epsilon=0.05, log_ratio="mean")
    assert out.loss.item() == pytest.approx(0.225625, abs=1e-6)
    assert out.extra["num_pairs"].item() == 1
    assert out.reward_margin.item() == pytest.approx(0.1, abs=1e-6)
    assert out.implicit_acc.item() == 1.0
    assert out.extra["clipfrac"].item() == pytest.approx(0.75)
    out.loss.backward()
    # max picks l_clip; only the unclipped step (0, 1) passes gradient: 2 · (.025 - .5) · ½ = -.475
    expected = torch.tensor([[0.0, -0.475], [0.0, 0.0]])
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_prdp_loss_hand_worked_sum():
    # sums: r̂ = [.2, 0] -> l = (.2 - .5)² = .09; clipped sums [.05, 0] -> l_clip = .45² = .2025
    logp, old, ref, rewards, groups = _prdp_inputs()
    out = prdp_loss(logp, old, ref, rewards, groups, beta=1.0, clip_epsilon=0.05, log_ratio="sum")
    assert out.loss.item() == pytest.approx(0.2025, abs=1e-6)


def test_prdp_loss_takes_unclipped_when_larger():
    # wide ε: nothing is clipped, l == l_clip = .16
    logp, old, ref, rewards, groups = _prdp_inputs()
    out = prdp_loss(logp, old, ref, rewards, groups, beta=1.0, clip_epsilon=10.0)
    assert out.loss.item() == pytest.approx(0.16, abs=1e-6)
    assert out.extra["clipfrac"].item() == 0


def test_reward_pairs_ordered_within_groups_only():
    rewards = torch.tensor([1.0, 1.0, 0.0, 3.0, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    a, b = reward_pairs(rewards, groups)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [
        (0, 2),
        (1, 2),
        (3, 4),
    ]  # the tie (0, 1) gives no pair


def test_prdp_loss_without_pairs_is_a_zero_with_graph():
    logp = torch.zeros(2, 3, requires_grad=True)
    out = prdp_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, 1.0]), torch.tensor([0, 0]))
    assert out.loss.item() == 0 and out.extra["num_pairs"].item() == 0
    out.loss.backward()  # does not raise


# ----------------------------------------------------------------------------------------------------
# DDPO loss
# ----------------------------------------------------------------------------------------------------
def test_per_prompt_advantages_hand_worked():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = per_prompt_advantages(rewards, groups)
    z = 1 / math.sqrt(2 / 3)  # population std of (1, 2, 3) is sqrt(2/3)
    assert torch.allclose(adv, torch.tensor([-z, 0.0, z, 0.0, 0.0, 0.0]), atol=1e-5)


def test_ddpo_loss_hand_worked_clipped():
    # c = .2; A = [1, -1]; ratios [1.5, .5]: sample 0 max(-1.5, -1.2) = -1.2, sample 1 max(.5, .8) = .8
    logp = torch.log(torch.tensor([[1.5], [0.5]])).requires_grad_(True)
    out = ddpo_loss(logp, torch.zeros(2, 1), torch.tensor([1.0, -1.0]), clip_range=0.2)
    assert out.loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert out.extra["clipfrac"].item() == 1.0
    out.loss.backward()
    assert torch.all(logp.grad == 0)  # both take the clipped branch: no gradient


def test_ddpo_loss_inside_clip_range_and_advantage_clip():
    # ratio 1.1 inside c = .2: loss = mean(-A·ρ); A = 10 is clipped to 5 -> -(5·1.1 + (-2)·1.1)/2 = -1.65
    logp = torch.log(torch.tensor([[1.1], [1.1]])).requires_grad_(True)
    out = ddpo_loss(logp, torch.zeros(2, 1), torch.tensor([10.0, -2.0]), clip_range=0.2, adv_clip_max=5.0)
    assert out.loss.item() == pytest.approx(-1.65, abs=1e-5)
    out.loss.backward()
    # d/dlogp of -A·exp(logp)/n = -A·ρ/n
    assert torch.allclose(logp.grad, torch.tensor([[-5 * 1.1 / 2], [2 * 1.1 / 2]]), atol=1e-5)
    assert out.implicit_acc.item() == 0.5  # both moved up; only the positive-advantage one should have


# ----------------------------------------------------------------------------------------------------
# Loop pieces: rewards, filtering, prompt sources
# ----------------------------------------------------------------------------------------------------
def test_filter_rewards_drops_nan_and_flat_groups(caplog):
    rewards = torch.tensor([1.0, float("nan"), 2.0, 0.5, 0.5, 0.5])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    with caplog.at_level(logging.WARNING, logger="diffalign.online"):
        keep, stats = filter_rewards(rewards, groups, max_bad_fraction=0.5)
    assert keep.tolist() == [True, False, True, False, False, False]
    assert stats == {"num_bad_rewards": 1, "num_flat_groups": 1}
    assert "NaN/inf" in caplog.text and "all equal" in caplog.text


def test_filter_rewards_stops_when_too_many_are_bad():
    rewards = torch.tensor([float("inf"), float("nan"), 1.0, 2.0])
    with pytest.raises(RewardError, match="2 of 4 rewards are NaN/inf"):
        filter_rewards(rewards, torch.tensor([0, 0, 0, 0]), max_bad_fraction=0.25)


def test_reward_that_raises_names_the_scorer():
    from diffalign.scorers import SCORERS, Scorer, register_scorer

    if "test_online_broken" not in SCORERS:
        @register_scorer("test_online_broken")
        class Broken(Scorer):
            def _score(self, images, prompts):
                raise RuntimeError("out of cheese")

    reward = make_reward("brightness + 2*test_online_broken")
    with pytest.raises(RewardError, match="'test_online_broken' raised RuntimeError: out of cheese"):
        reward(torch.rand(2, 3, 8, 8), ["a", "b"])


def test_weighted_reward_sum():
    reward = make_reward("2*brightness + -0.5*brightness")
    images = torch.full((1, 3, 4, 4), 0.5)
    assert reward(images, ["x"]).item() == pytest.approx(1.5 * 0.5, abs=1e-6)


def test_micro_batches_keep_groups_whole():
    groups = torch.tensor([3, 3, 5, 5, 7])
    parts = micro_batches(groups, 2)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4]]


def test_prompt_sources(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    assert load_prompt_source(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"text": "a fox"}\n')
    assert load_prompt_source(str(tmp_path / "p.jsonl"), column="text") == ["a fox"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a cow", "", "an owl"]}), tmp_path / "p.parquet")
    assert load_prompt_source(str(tmp_path / "p.parquet"), column="caption") == ["a cow", "an owl"]
    with pytest.raises(ValueError, match="no column 'prompt'"):
        load_prompt_source(str(tmp_path / "p.parquet"))
    assert len(load_prompt_source("ddpo-animals")) == 45
    assert all(isinstance(p, str) for p in load_prompt_source("toy-train")[:3])
    with pytest.raises(FileNotFoundError):
        load_prompt_source(str(tmp_path / "missing.txt"))


def test_config_rejects_bad_online_settings():
    from diffalign.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="method.reward"):
        load_config("configs/tiny-sdxl/prdp.yaml", ["method.reward=no_such_scorer"])
    with pytest.raises(ConfigError, match="method.samples_per_prompt"):
        load_config("configs/tiny-sdxl/ddpo.yaml", ["method.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="method.eta"):
        load_config("configs/tiny-sdxl/prdp.yaml", ["method.eta=0"])
    with pytest.raises(ConfigError, match="method.prompts"):
        load_config("configs/tiny-sdxl/prdp.yaml", ["method.prompts=nope/missing.txt"])


# ----------------------------------------------------------------------------------------------------
# The objective on the tiny model: accumulation is exact, and gradient steps move the loss the right way
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def online_ctx(tiny_sdxl):
    """A TrainContext on a LoRA copy of the tiny SDXL UNet (CPU), built as the trainer builds it."""
    from accelerate import Accelerator
    from peft import LoraConfig

    from diffalign.config import load_config
    from diffalign.methods import METHODS
    from diffalign.objectives import TrainContext
    from diffalign.sampler import family_of

    pipe = copy.copy(tiny_sdxl)
    unet = copy.deepcopy(tiny_sdxl.unet).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pipe.unet = unet
    cfg = load_config(
        "configs/tiny-sdxl/prdp.yaml",
        [
            "method.num_prompts=2",
            "method.samples_per_prompt=3",
            "method.num_steps=4",
            "method.train_timesteps=null",
        ],
    )
    accelerator = Accelerator(cpu=True)
    ctx = TrainContext(cfg, METHODS["prdp"], accelerator, pipe, family_of(pipe), unet, None, torch.float32)
    return ctx


def _objective(ctx, name, **overrides):
    import dataclasses

    from diffalign.methods import METHODS
    from diffalign.objectives import OnlineObjective

    cfg = copy.copy(ctx.cfg)
    base = {k: getattr(ctx.cfg.method, k) for k in (f.name for f in dataclasses.fields(ctx.cfg.method))
            if k in {f.name for f in dataclasses.fields(METHODS[name].config_class)}}
    cfg.method = METHODS[name].config_class(**(base | overrides))
    return OnlineObjective(dataclasses.replace(ctx, cfg=cfg, spec=METHODS[name]))


def _grads(unet):
    return torch.cat([p.grad.flatten() for n, p in unet.named_parameters() if "lora_" in n])


def test_micro_batch_and_step_chunked_gradients_equal_one_batch(online_ctx):
    unet = online_ctx.unet
    whole = _objective(online_ctx, "prdp", micro_batch_prompts=2, beta=0.05, clip_epsilon=1.0)
    batch = whole.collect()[0]
    assert isinstance(batch, OnlineBatch) and batch.logp_ref is not None
    # LoRA B starts at zero: the policy is the reference, and the sampler's log-probs are log π_old
    assert torch.allclose(batch.logp_ref, batch.logp_old, atol=1e-5)
    unet.zero_grad()
    out = whole(batch)
    out.loss.backward()
    g_whole, loss_whole = _grads(unet).clone(), out.loss.item()
    split = _objective(online_ctx, "prdp", micro_batch_prompts=1, beta=0.05, clip_epsilon=1.0)
    unet.zero_grad()
    out = split(batch)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(loss_whole, rel=1e-5)
    assert torch.allclose(_grads(unet), g_whole, rtol=1e-4, atol=1e-5 * g_whole.abs().max().item())
    # two passes, 1 step per graph: d loss / d log π first, then one step at a time
    chunked = _objective(
        online_ctx, "prdp", micro_batch_prompts=1, steps_per_backward=1, beta=0.05, clip_epsilon=1.0
    )
    unet.zero_grad()
    out = chunked(batch)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(loss_whole, rel=1e-5)
    # batching steps differently changes float rounding of the UNet, hence a relative-norm comparison
    assert (_grads(unet) - g_whole).norm() / g_whole.norm() < 1e-3
    unet.zero_grad()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prdp", "ddpo"])
def test_gradient_steps_improve_the_objective_on_a_fixed_batch(online_ctx, name):
    """A few optimizer steps on one epoch batch move the policy the way the method asks."""
    unet = online_ctx.unet
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    saved = [p.detach().clone() for p in lora]
    for p in lora:
        p.requires_grad_(True)
    settings = {"prdp": {"beta": 0.02, "clip_epsilon": 1.0}, "ddpo": {"clip_range": 10.0}}[name]
    objective = _objective(online_ctx, name, micro_batch_prompts=2, **settings)
    batch = objective.next_epoch()
    optimizer = torch.optim.Adam(lora, lr=3e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        out = objective(batch)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    with torch.no_grad():
        final = objective(batch).loss.item()
    for p, s in zip(lora, saved, strict=True):
        p.data.copy_(s)
        p.requires_grad_(False)
    unet.zero_grad()
    assert final < losses[0]


# ----------------------------------------------------------------------------------------------------
# End to end through the trainer
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["prdp", "ddpo"])
def test_train_from_shipped_config_writes_loadable_lora(name, tmp_path, tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    from diffalign.config import load_config
    from diffalign.train import train

    cfg = load_config(
        f"configs/tiny-sdxl/{name}.yaml",
        [
            f"train.output_dir={tmp_path / name}",
            "train.max_steps=2",
            "method.gradient_steps_per_epoch=1",
            "method.num_prompts=1",
            "method.samples_per_prompt=3",
            "method.num_steps=4",
            "method.train_timesteps=2",
            "eval.enabled=false",
            "log.every_n_steps=1",
            f"model.name={tiny_sdxl_path}",
        ],
    )
    out = train(cfg)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "reward_mean" in lines[0]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.load_lora_weights(out)
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())
