"""SePPO: the loss against hand-worked values, the checkpoint pool, winners' data, a short run."""

from __future__ import annotations

import copy
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from diffalign.data import DataError
from diffalign.methods.seppo import flip_sign, seppo_loss
from diffalign.objectives.winners import CheckpointPool
from diffalign.winners import ImagePrompts, PairWinners, WinnersDataset, open_winners


def _nll(x: float) -> float:
    return math.log1p(math.exp(-x))  # -log σ(x)


# model_w - ref_w = [-.5, +1]: the policy beats the reference on winner 0, not on winner 1
# model_r - ref_r = [+1, -.5]
LOSSES = dict(model_w=torch.tensor([1.0, 2.0]), ref_w=torch.tensor([1.5, 1.0]),
              model_r=torch.tensor([2.0, 1.0]), ref_r=torch.tensor([1.0, 1.5]))


@pytest.mark.parametrize("flip, inside", [
    ("sign", (1.5, -0.5)),  # pair 1 flips to -1: -(1 - (-1)(-.5)) = -.5
    ("indicator", (1.5, -1.0)),  # pair 1 drops x_ref: -(1 - 0) = -1
    ("off", (1.5, -1.5)),  # plain DPO with x_ref as the loser: -(1 - (-.5)) = -1.5
])
def test_seppo_loss_hand_worked(flip, inside):
    # β = 2, so β/2 = 1: inside = -[(model_w - ref_w) - s·(model_r - ref_r)]; pair 0: -(-.5 - 1) = 1.5
    out = seppo_loss(**LOSSES, beta=2.0, flip=flip)
    assert out.loss.item() == pytest.approx((_nll(inside[0]) + _nll(inside[1])) / 2, abs=1e-6)
    assert out.implicit_acc.item() == 0.5
    assert out.reward_margin.item() == pytest.approx(sum(inside) / 2, abs=1e-6)


def test_flip_sign_values_and_no_gradient():
    model_w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    ref_w = torch.tensor([1.0, 1.0, 4.0])
    assert flip_sign(model_w, ref_w, "sign").tolist() == [1.0, -1.0, 1.0]  # equality counts as better
    assert flip_sign(model_w, ref_w, "indicator").tolist() == [1.0, 0.0, 1.0]
    assert flip_sign(model_w, ref_w, "off").tolist() == [1.0, 1.0, 1.0]
    assert not flip_sign(model_w, ref_w, "sign").requires_grad
    with pytest.raises(ValueError, match="unknown SePPO flip"):
        flip_sign(model_w, ref_w, "sideways")


def test_seppo_gradient_pushes_winner_and_flipped_sample():
    # sign flip: the policy is pulled down on w; x_ref is pushed up (s = +1) or pulled down (s = -1)
    model_w = torch.tensor([1.0, 2.0], requires_grad=True)
    model_r = torch.tensor([2.0, 1.0], requires_grad=True)
    seppo_loss(model_w, LOSSES["ref_w"], model_r, LOSSES["ref_r"], beta=2.0, flip="sign").loss.backward()
    assert torch.all(model_w.grad > 0)  # lowering L_θ(w) lowers the loss
    assert model_r.grad[0] < 0 and model_r.grad[1] > 0


# ----------------------------------------------------------------------------------------------------
# The pool
# ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def lora_unet(tiny_sdxl):
    from peft import LoraConfig

    unet = copy.deepcopy(tiny_sdxl.unet).requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    )
    return unet


def _forward(unet):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16)
    cond = {
        "encoder_hidden_states": torch.randn(1, 77, 64),
        "text_embeds": torch.randn(1, 32),
        "time_ids": torch.zeros(1, 6),
    }
    cond["encoder_hidden_states"] = torch.randn(1, 77, unet.config.cross_attention_dim)
    cond["text_embeds"] = torch.randn(
        1, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    )
    with torch.no_grad():
        return unet(
            x,
            torch.tensor([500]),
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
        ).sample


def _perturb_lora(unet, value):
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.fill_(value)


def test_lora_pool_swaps_and_restores(lora_unet, tmp_path):
    pipe = SimpleNamespace(unet=lora_unet)
    pool = CheckpointPool(pipe, lora_unet, None, "lora", tmp_path, size=2)
    rng = random.Random(0)
    # an empty pool at the first step: every rule gives the initial model
    assert {pool.choose(rule, rng).step for rule in ("uniform", "initial", "latest")} == {0}
    base = _forward(lora_unet)  # LoRA B = 0: the policy is the base model
    _perturb_lora(lora_unet, 0.01)
    pool.add(5)
    policy_5 = _forward(lora_unet)
    assert not torch.allclose(policy_5, base)
    _perturb_lora(lora_unet, 0.02)
    policy_now = _forward(lora_unet)
    with pool.use(pool.entries[0]) as ref:
        assert torch.allclose(_forward(ref), base, atol=1e-6)  # adapters disabled
    with pool.use(pool.choose("latest", rng)) as ref:
        assert torch.allclose(_forward(ref), policy_5, atol=1e-6)
        assert pipe.unet is ref
    assert torch.allclose(_forward(lora_unet), policy_now, atol=1e-6)  # restored
    pool.add(10)
    pool.add(15)
    assert [e.step for e in pool.entries] == [
        0,
        10,
        15,
    ]  # size 2: the oldest saved policy goes, the initial stays
    drawn = {pool.choose("uniform", rng).step for _ in range(60)}
    assert drawn == {0, 10, 15}


def test_full_finetune_pool_keeps_weights_on_disk(tiny_sdxl, tmp_path):
    unet = copy.deepcopy(tiny_sdxl.unet)
    ref_unet = copy.deepcopy(tiny_sdxl.unet).requires_grad_(False)
    pipe = SimpleNamespace(unet=unet)
    pool = CheckpointPool(pipe, unet, ref_unet, "full", tmp_path / "pool", size=1)
    base = _forward(unet)
    with torch.no_grad():
        next(unet.parameters()).add_(0.1)
    pool.add(3)
    changed = _forward(unet)
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == [
        "step-0.safetensors",
        "step-3.safetensors",
    ]
    with pool.use(pool.entries[-1]) as ref:
        assert ref is ref_unet and pipe.unet is ref_unet
        assert torch.allclose(_forward(ref), changed, atol=1e-6)
    assert pipe.unet is unet
    with pool.use(pool.entries[0]) as ref:
        assert torch.allclose(_forward(ref), base, atol=1e-6)
    pool.add(6)
    assert not (tmp_path / "pool" / "step-3.safetensors").exists()


# ----------------------------------------------------------------------------------------------------
# Winners
# ----------------------------------------------------------------------------------------------------
def _image(path, color):
    Image.new("RGB", (40, 24), color).save(path)


def test_open_winners_formats(tmp_path):
    _image(tmp_path / "a.png", (255, 0, 0))
    _image(tmp_path / "b.png", (0, 0, 255))
    (tmp_path / "winners.jsonl").write_text(json.dumps({"prompt": "red", "image": "a.png"}) + "\n")
    data = SimpleNamespace(
        source=str(tmp_path / "winners.jsonl"), format="auto", split="train", max_pairs=None
    )
    winners = open_winners(data)
    assert isinstance(winners, ImagePrompts) and winners.caption(0) == "red"
    item = WinnersDataset(winners, 16, random_flip=False, seed=0)[0]
    assert item["pixels"].shape == (3, 16, 16) and item["pixels"][0].mean() > 0.9
    assert item["time_ids"].tolist() == [24, 40, 0, 6, 16, 16]  # 40x24 -> 27x16, centre crop from x = 6

    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"prompt": "blue", "chosen": "b.png", "rejected": "a.png"}) + "\n"
    )
    winners = open_winners(SimpleNamespace(**{**vars(data), "source": str(tmp_path / "pairs.jsonl")}))
    assert isinstance(winners, PairWinners) and winners.winner(0).image.getpixel((0, 0)) == (0, 0, 255)

    folder = tmp_path / "samples"
    folder.mkdir()
    _image(folder / "00000.png", (0, 255, 0))
    (folder / "samples.jsonl").write_text(json.dumps({"prompt": "green", "file": "00000.png"}) + "\n")
    winners = open_winners(SimpleNamespace(**{**vars(data), "source": str(folder)}))
    assert winners.caption(0) == "green" and winners.winner(0).image.getpixel((1, 1)) == (0, 255, 0)

    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "image": "missing.png"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: image .*missing.png does not exist"):
        open_winners(SimpleNamespace(**{**vars(data), "source": str(tmp_path / "bad.jsonl")}))


# ----------------------------------------------------------------------------------------------------
# End to end through the trainer
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_seppo_from_shipped_config(tmp_path, tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    from diffalign.config import load_config
    from diffalign.train import train

    cfg = load_config(
        "configs/tiny-sdxl/seppo.yaml",
        [
            f"train.output_dir={tmp_path / 'seppo'}",
            "train.max_steps=3",
            "train.batch_size=2",
            "method.pool_interval=1",
            "method.reference=latest",
            "method.ref_num_steps=3",
            "eval.enabled=false",
            "log.every_n_steps=1",
            f"model.name={tiny_sdxl_path}",
        ],
    )
    out = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["pool_size"] for r in rows] == [1, 2, 3]  # the initial model, then one policy per step
    assert [r["reference_step"] for r in rows] == [0, 1, 2]  # "latest"
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the first step
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.load_lora_weights(out)
