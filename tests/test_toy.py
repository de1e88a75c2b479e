"""The toy world: dataset, caption parser, reader, toy scorers, pretraining script and the shipped
toy-sdxl."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.toy import TOY_SDXL_DIR, data
from diffalign.toy.evaluate import attribute_hits, chance_levels, dataset_accuracy, read_attributes, summarize

#: The shipped model must show these fractions of named attributes on 48 held-out prompts (chance: colour
#: 0.17, background and shape 0.33). Measured on all 126 held-out prompts: colour 0.97, background 0.99,
#: shape 0.87 (BENCHMARKS.md, "Toy model").
MIN_COLOR_ACCURACY = 0.8
MIN_BACKGROUND_ACCURACY = 0.8
MIN_SHAPE_ACCURACY = 0.6


# ----------------------------------------------------------------------------------------------------
# Dataset and captions
# ----------------------------------------------------------------------------------------------------
def test_dataset_is_deterministic_for_a_seed_and_differs_across_seeds():
    images_a, captions_a = data.make_dataset(24, seed=3)
    images_b, captions_b = data.make_dataset(24, seed=3)
    images_c, captions_c = data.make_dataset(24, seed=4)
    assert images_a.dtype == torch.uint8 and images_a.shape == (24, 3, 32, 32)
    assert torch.equal(images_a, images_b) and captions_a == captions_b
    assert not torch.equal(images_a, images_c) and captions_a != captions_c


def test_captions_parse_back_to_their_attributes():
    scenes = data.all_scenes()
    assert len(scenes) == len({s.caption() for s in scenes}) == 756
    for scene in scenes:
        assert data.parse_caption(scene.caption()) == scene
    scene = data.parse_caption("three large blue squares on a black background")
    assert (scene.count, scene.size, scene.color, scene.shape, scene.position, scene.background) == (
        3, "large", "blue", "square", None, "black")
    for bad in (
        "a photo of a cat",
        "a small pink circle on the left on a white background",
        "two small red circles on the left on a white background",
        "a small red circle on a white background",
    ):
        with pytest.raises(ValueError, match="caption"):
            data.parse_caption(bad)


def test_prompt_splits_are_fixed_disjoint_and_cover_every_attribute():
    train, heldout = data.toy_prompts("train"), data.toy_prompts("heldout")
    assert len(train) + len(heldout) == 756 and not set(train) & set(heldout)
    assert data.toy_prompts("heldout", 10, seed=1) == data.toy_prompts("heldout", 10, seed=1)
    assert data.toy_prompts("heldout", 10, seed=1) != data.toy_prompts("heldout", 10, seed=2)
    assert set(data.toy_prompts("heldout", 10, seed=1)) <= set(heldout)
    assert len(data.toy_prompts("train", 1000, seed=0)) == 1000
    for name, values in data.VOCAB.items():
        if name != "position":
            seen = {getattr(data.parse_caption(p), name) for p in train}
            assert seen == set(values), name
    _, captions = data.make_dataset(64, seed=0, split="train")
    assert set(captions) <= set(train)
    with pytest.raises(ValueError, match="split"):
        data.toy_prompts("test")


def test_reader_recovers_the_attributes_of_the_dataset_renders():
    accuracy = dataset_accuracy(200, seed=7, split="heldout")
    assert accuracy["color"] == 1.0 and accuracy["background"] == 1.0 and accuracy["count"] == 1.0
    assert accuracy["all"] > 0.9
    uniform = torch.full((3, 32, 32), 0.5)
    assert read_attributes(uniform)["count"] == 0
    hits = attribute_hits(uniform.unsqueeze(0), ["a small red circle on the left on a grey background"])
    assert hits[0]["background"] and not hits[0]["color"]
    assert summarize(hits)["all"] == 0.0
    assert chance_levels()["color"] == pytest.approx(1 / 6)


# ----------------------------------------------------------------------------------------------------
# Toy scorers
# ----------------------------------------------------------------------------------------------------
def _scene_image(caption: str, seed: int = 0) -> torch.Tensor:
    import random

    image = data.render(data.parse_caption(caption), random.Random(seed))
    from diffalign.images import to_tensor

    return to_tensor(image)


def test_faithfulness_prefers_the_named_colour_background_and_size():
    from diffalign.scorers import make_scorer

    scorer = make_scorer("toy_faithfulness")
    prompt = "a large red circle in the center on a white background"
    red, blue = _scene_image(prompt), _scene_image("a large blue circle in the center on a white background")
    small_red = _scene_image("a small red circle in the center on a white background")
    black_bg = _scene_image("a large red circle in the center on a black background")
    scores = scorer(torch.cat([red, blue, small_red, black_bg]), [prompt] * 4)
    assert scores[0] > 0.9
    assert scores[0] > scores[1] + 0.2 and scores[0] > scores[2] + 0.1 and scores[0] > scores[3] + 0.2
    with pytest.raises(ValueError, match="toy caption"):
        scorer(red, ["a photo of a dog"])
    with pytest.raises(ValueError, match="prompt"):
        scorer(red)


def test_saturation_and_target_colour_order_images():
    from diffalign.scorers import make_scorer

    grey = torch.full((1, 3, 32, 32), 0.5)
    colourful = _scene_image("three large green squares on a grey background")
    saturation = make_scorer("toy_saturation")(torch.cat([grey, colourful]))
    assert saturation[0] == pytest.approx(0.0, abs=1e-6) and saturation[1] > 0.1
    red = _scene_image("a large red square in the center on a grey background")
    redness = make_scorer("toy_target_color")(torch.cat([red, colourful]))
    assert redness[0] > 0.1 > redness[1]
    assert make_scorer("toy_target_color", color="green")(colourful) > 0.2
    with pytest.raises(ValueError, match="colour"):
        make_scorer("toy_target_color", color="pink")


@pytest.mark.parametrize("name", ["toy_faithfulness", "toy_saturation", "toy_target_color"])
def test_toy_scorers_give_gradients(name):
    from diffalign.scorers import make_scorer

    scorer = make_scorer(name)
    assert scorer.differentiable
    images = (_scene_image("two small orange triangles on a white background") * 0.8 + 0.1).requires_grad_(
        True
    )
    score = scorer(images, ["two small orange triangles on a white background"])
    score.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# Pretraining script (a few steps) and the shipped model
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pretrain_runs_resumes_and_is_reproducible(tmp_path, one_thread):
    from safetensors.torch import load_file

    from diffalign.toy.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(num_images=16, vae_steps=3, vae_batch_size=4, unet_steps=4, unet_batch_size=4,
                            checkpoint_every=2, eval_every=1000, eval_prompts=2)
    first = pretrain(tmp_path / "a", config, final_samples=False)
    second = pretrain(tmp_path / "b", config, final_samples=False)
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(first / weights)), load_file(str(second / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())
    assert state["stage"] == "done" and state["step"] == 4
    assert "unet step 4/4" in (tmp_path / "a" / "train.log").read_text()
    # A finished run resumes straight to writing its pipeline; other settings are refused.
    pretrain(tmp_path / "a", config, final_samples=False)
    assert "resuming from" in (tmp_path / "a" / "train.log").read_text()
    with pytest.raises(ValueError, match="other settings"):
        pretrain(tmp_path / "a", PretrainConfig(num_images=16, vae_steps=3, vae_batch_size=4, unet_steps=5))


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import DiffusionPipeline

    # Stock diffusers, offline (conftest sets HF_HUB_OFFLINE), from the folder that ships in the package.
    pipe = DiffusionPipeline.from_pretrained(str(TOY_SDXL_DIR))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_toy_sdxl_loads_with_stock_diffusers_and_generates(toy_pipe):
    from diffusers import StableDiffusionXLPipeline

    from diffalign.models import resolve_model

    assert isinstance(toy_pipe, StableDiffusionXLPipeline)
    assert toy_pipe.unet.config.addition_embed_type == "text_time"
    assert resolve_model("toy-sdxl").location() == str(TOY_SDXL_DIR)
    files = [p for p in TOY_SDXL_DIR.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    out = toy_pipe("a large red circle in the center on a white background", num_inference_steps=4,
                   generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()


@pytest.mark.slow
def test_shipped_toy_sdxl_follows_its_captions(toy_pipe, one_thread):
    from diffalign.toy.evaluate import caption_accuracy
    from diffalign.toy.model import DEFAULT_GUIDANCE, DEFAULT_NUM_STEPS

    prompts = data.toy_prompts("heldout", 48, seed=0)
    result = caption_accuracy(
        toy_pipe, prompts, seed=0, num_steps=DEFAULT_NUM_STEPS, guidance_scale=DEFAULT_GUIDANCE
    )
    accuracy = result["accuracy"]
    assert accuracy["color"] >= MIN_COLOR_ACCURACY, accuracy
    assert accuracy["background"] >= MIN_BACKGROUND_ACCURACY, accuracy
    assert accuracy["shape"] >= MIN_SHAPE_ACCURACY, accuracy
