"""Real scorers (PickScore, HPSv2, aesthetic, CLIPScore) on tiny random-weight models of their families.

The preprocessing is checked against the reference pipelines themselves (open_clip / torchvision
transforms, transformers' numpy image transforms), the formulas against hand-computed features.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.images import to_pil
from diffalign.scorers import check_scorer_names, make_scorer, parse_scorer_spec
from diffalign.scorers.clip_preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    preprocess,
    preprocess_pil,
    preprocess_tensor,
)
from diffalign.scorers.tiny_models import save_tiny_scorer

SIZES = [(200, 300), (300, 200), (224, 224), (500, 225), (61, 97), (275, 499), (512, 512)]
# Torch path vs PIL path, in normalized pixel units (PIL rounds to uint8 after resizing).
TORCH_VS_PIL_MEAN, TORCH_VS_PIL_MAX = 0.006, 0.03


def smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, max(h // 8, 2), max(w // 8, 2), generator=g)
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)[0]


def pil_image(h: int, w: int, seed: int = 0) -> Image.Image:
    return to_pil(smooth_image(h, w, seed)[None])[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-scorers")
    return {
        kind: save_tiny_scorer(kind, root / kind) for kind in ("pickscore", "clipscore", "hpsv2", "aesthetic")
    }


@pytest.fixture(scope="module")
def scorers(folders):
    return {kind: make_scorer(f"{kind}:model={path}") for kind, path in folders.items()}


# ---------------------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("h,w", SIZES)
def test_crop_preprocessing_equals_openai_clip_transform(h, w):
    from open_clip.transform import image_transform

    image = pil_image(h, w)
    reference = image_transform(224, is_train=False, resize_mode="shortest")(image)[
        None
    ]  # Resize + CenterCrop
    torch.testing.assert_close(preprocess_pil([image], 224, "crop"), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("h,w", SIZES)
def test_pickscore_preprocessing_equals_transformers_clip_processor_steps(h, w):
    # PickScore's published processor: PIL bicubic resize of the short side, crop offset floored, rescale,
    # normalize.
    from transformers.image_transforms import center_crop, normalize, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    from diffalign.scorers.clip_preprocess import resized_size

    image = pil_image(h, w)
    array = np.asarray(image)
    resized = resize(array, resized_size(h, w, 224, "crop"), resample=PILImageResampling.BICUBIC,
                     input_data_format=ChannelDimension.LAST)
    cropped = (
        center_crop(resized, (224, 224), input_data_format=ChannelDimension.LAST).astype(np.float32) / 255.0
    )
    reference = normalize(cropped, CLIP_MEAN, CLIP_STD, input_data_format=ChannelDimension.LAST)
    reference = torch.from_numpy(np.ascontiguousarray(reference)).permute(2, 0, 1)[None].float()
    ours = preprocess_pil([image], 224, "crop", crop_rounding="floor")
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("h,w", SIZES)
def test_pad_preprocessing_equals_hpsv2_transform(h, w):
    from open_clip.transform import image_transform

    image = pil_image(h, w)
    reference = image_transform(224, is_train=False, resize_mode="longest")(image)[
        None
    ]  # HPSv2's ResizeMaxSize + pad
    ours = preprocess_pil([image], 224, "pad")
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    if h != w:  # the padding is black before normalization: (0 - mean) / std
        corner = ours[0, :, 0, 0]
        torch.testing.assert_close(corner, -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("h,w", SIZES)
def test_torch_path_matches_pil_path_and_is_differentiable(mode, h, w):
    image = pil_image(h, w)
    x = (torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255).requires_grad_(True)
    ours = preprocess_tensor(x, 224, mode)
    reference = preprocess_pil([image], 224, mode)
    difference = (ours.detach() - reference).abs()
    assert difference.mean() < TORCH_VS_PIL_MEAN and difference.max() < TORCH_VS_PIL_MAX
    ours.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_preprocess_path_setting():
    x = smooth_image(300, 200)[None]
    torch.testing.assert_close(preprocess(x, path="pil"), preprocess_pil(to_pil(x)))
    torch.testing.assert_close(preprocess(x), preprocess_tensor(x))
    with pytest.raises(ValueError, match="preprocessing path"):
        preprocess(x, path="fast")


# ---------------------------------------------------------------------------------------------- formulas
PROMPTS = ["a red fox in the snow", "a bowl of ramen, studio photo", "an astronaut riding a horse"]


def images_of_sizes():
    return [pil_image(h, w, seed=i) for i, (h, w) in enumerate([(256, 384), (300, 300), (512, 320)])]


def test_pickscore_is_logit_scale_times_cosine(scorers):
    scorer = scorers["pickscore"]
    model, images = scorer.model, images_of_sizes()
    pixels = preprocess_pil(images, 224, "crop", crop_rounding="floor")
    tokens = scorer.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = model.vision_model(pixel_values=pixels).pooler_output @ model.visual_projection.weight.T
        text = model.text_model(**tokens).pooler_output @ model.text_projection.weight.T
    cosine = F.cosine_similarity(image, text, dim=-1)
    expected = model.logit_scale.exp() * cosine
    torch.testing.assert_close(scorer.score(images, PROMPTS), expected, atol=1e-4, rtol=1e-4)


def test_clipscore_is_clamped_weighted_cosine(scorers, folders):
    scorer = scorers["clipscore"]
    images = images_of_sizes()
    cosine = (scorer.image_features(images) * scorer.text_features(PROMPTS)).sum(-1)
    torch.testing.assert_close(scorer.score(images, PROMPTS), (100 * cosine).clamp(min=0))
    scaled = make_scorer(f"clipscore:model={folders['clipscore']},weight=2.5")
    torch.testing.assert_close(scaled.score(images, PROMPTS), (2.5 * cosine).clamp(min=0))


def test_hpsv2_is_plain_cosine_and_versions_differ(scorers, folders):
    from open_clip.transform import image_transform

    scorer = scorers["hpsv2"]
    images = images_of_sizes()
    reference = image_transform(224, is_train=False, resize_mode="longest")
    pixels = torch.stack([reference(im) for im in images])
    with torch.no_grad():
        image = F.normalize(scorer.model.encode_image(pixels), dim=-1)
        text = F.normalize(scorer.model.encode_text(scorer.tokenizer(PROMPTS)), dim=-1)
    expected = (image * text).sum(-1)
    torch.testing.assert_close(scorer.score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    # The checkpoint is the fp16 state dict under "state_dict", read with weights_only=True.
    checkpoint = torch.load(folders["hpsv2"] / "HPS_v2.1_compressed.pt", weights_only=True)
    assert (
        set(checkpoint) == {"state_dict"} and checkpoint["state_dict"]["logit_scale"].dtype == torch.float16
    )
    v21 = make_scorer(f"hpsv2:model={folders['hpsv2']},version=v2.1")
    assert not torch.allclose(v21.score(images, PROMPTS), scorer.score(images, PROMPTS))
    with pytest.raises(ValueError, match="unknown version"):
        make_scorer(f"hpsv2:model={folders['hpsv2']},version=v3")


def test_aesthetic_head_reads_the_normalized_embedding(scorers):
    from open_clip.transform import image_transform

    scorer = scorers["aesthetic"]
    images = images_of_sizes()
    pixels = torch.stack([image_transform(224, is_train=False)(im) for im in images])
    with torch.no_grad():
        embedding = scorer.clip.get_image_features(pixel_values=pixels).pooler_output
        expected = scorer.head(embedding / embedding.norm(dim=-1, keepdim=True)).squeeze(-1)
        unnormalized = scorer.head(embedding).squeeze(-1)
    scores = scorer.score(images)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores, unnormalized, atol=1e-4)
    assert [name for name, _ in scorer.head.named_parameters()][
        0
    ] == "layers.0.weight"  # the published key layout


# ---------------------------------------------------------------------------------------- batching, gradients
@pytest.mark.parametrize("kind", ["pickscore", "clipscore", "hpsv2", "aesthetic"])
def test_batch_equals_one_by_one(scorers, kind):
    scorer = scorers[kind]
    images = [pil_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES[:5])]
    prompts = [f"picture number {i} of a cat" * (i + 1) for i in range(5)]
    old = scorer.batch_size
    try:
        scorer.batch_size = 2
        batched = scorer.score(images, prompts)
    finally:
        scorer.batch_size = old
    one_by_one = torch.cat([scorer.score([im], [p]) for im, p in zip(images, prompts, strict=True)])
    assert batched.shape == (5,)
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=1e-4)
    tensors = torch.stack([smooth_image(96, 64, seed=i) for i in range(4)])
    torch.testing.assert_close(
        scorer.score(tensors, prompts[:4]),
        torch.cat([scorer.score(t, prompts[i]) for i, t in enumerate(tensors)]),
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.parametrize("kind", ["pickscore", "clipscore", "hpsv2", "aesthetic"])
def test_differentiable_path_agrees_with_pil_path_and_has_gradients(scorers, kind):
    scorer = scorers[kind]
    x = torch.stack(
        [smooth_image(h, w, seed=1) for h, w in [(256, 256)]] * 1 + [smooth_image(256, 256, seed=2)]
    )
    x = to_pil_roundtrip(x).requires_grad_(True)
    prompts = PROMPTS[:2]
    differentiable = scorer.score(x, prompts)
    exact = scorer.score(to_pil(x), prompts)
    # Stated tolerance: the score moves by < 2% of the spread of scores over random images (tiny models).
    spread = scorer.score(torch.rand(6, 3, 64, 64), PROMPTS * 2).std()
    assert (differentiable.detach() - exact).abs().max() < 0.02 * spread + 1e-4
    differentiable.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def to_pil_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Quantize to uint8 so that the PIL path sees exactly the tensor's pixels."""
    return (x * 255).round() / 255


# -------------------------------------------------------------------------------------------- combined, video
def test_combined_scorer_is_the_weighted_sum(scorers, folders):
    spec = (f"10*pickscore:model={folders['pickscore']} + 2*hpsv2:model={folders['hpsv2']}"
            f"+0.05*aesthetic:model={folders['aesthetic']}")
    combined = make_scorer(spec)
    images = images_of_sizes()
    expected = (10 * scorers["pickscore"].score(images, PROMPTS) + 2 * scorers["hpsv2"].score(images, PROMPTS)
                + 0.05 * scorers["aesthetic"].score(images))
    torch.testing.assert_close(combined.score(images, PROMPTS), expected)
    assert combined.differentiable and combined.needs_prompts and combined.name == spec
    check_scorer_names([spec])


def test_spec_parsing_keeps_plus_inside_a_path_and_rejects_bad_specs():
    terms = parse_scorer_spec(
        "10*pickscore:model=/m,dtype=float16 + 0.05*aesthetic:head=/h/sac+logos+ava1-l14-linearMSE.pth"
    )
    assert terms == [(10.0, "pickscore", {"model": "/m", "dtype": "float16"}),
                     (0.05, "aesthetic", {"head": "/h/sac+logos+ava1-l14-linearMSE.pth"})]
    assert parse_scorer_spec("brightness") == [(None, "brightness", {})]
    with pytest.raises(
        ValueError, match="unknown scorer 'pickscor'.*known scorers: .*aesthetic.*hpsv2.*pickscore"
    ):
        check_scorer_names(["10*pickscor+2*hpsv2"])
    with pytest.raises(ValueError, match="unknown scorer 'hpsv9'"):  # hpsv3 is registered now
        make_scorer("pickscore+hpsv9")
    with pytest.raises(ValueError, match="has no setting 'modle'.*model"):
        check_scorer_names(["pickscore:modle=/x"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        check_scorer_names(["pickscore:model"])
    with pytest.raises(ValueError, match="per part"):
        make_scorer("pickscore+hpsv2", model="/x")


def test_video_scores_average_over_all_or_k_evenly_spaced_frames(scorers):
    scorer = scorers["aesthetic"]
    videos = torch.stack(
        [torch.stack([smooth_image(64, 96, seed=10 * v + f) for f in range(5)]) for v in range(2)]
    )
    per_frame = scorer.score(videos.flatten(0, 1)).view(2, 5)
    torch.testing.assert_close(scorer.score(videos), per_frame.mean(1))
    scorer.video_frames = 3
    try:
        torch.testing.assert_close(scorer.score(videos), per_frame[:, [0, 2, 4]].mean(1))
    finally:
        scorer.video_frames = None
    pick = scorers["pickscore"]
    frames = pick.score(videos.flatten(0, 1), [p for p in PROMPTS[:2] for _ in range(5)]).view(2, 5)
    torch.testing.assert_close(pick.score(videos, PROMPTS[:2]), frames.mean(1))


# ---------------------------------------------------------------------------------------------- bad input
def test_odd_image_modes_and_sizes(scorers):
    scorer = scorers["hpsv2"]
    rgb = pil_image(120, 90)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(255)
    gray = rgb.convert("L")
    gray16 = Image.fromarray(
        np.asarray(gray).astype(np.uint16) * 257
    )  # 16-bit ("I;16") with the same content
    assert gray16.mode == "I;16"
    cmyk = rgb.convert("CMYK")
    palette = rgb.convert("P")
    extremes = [Image.new("RGB", (1, 1), (10, 200, 30)), Image.new("RGB", (1000, 7), (5, 5, 250))]
    images = [rgb, rgba, gray, gray16, cmyk, palette, *extremes]
    scores = scorer.score(images, ["x"] * len(images))
    assert torch.isfinite(scores).all()
    assert scores[1] == pytest.approx(scores[0], abs=1e-6)  # opaque RGBA == RGB
    assert scores[3] == pytest.approx(scores[2], abs=1e-6)  # 16-bit == 8-bit of the same picture
    transparent = Image.new("RGBA", (50, 50), (0, 0, 0, 0))  # composited on white
    white = Image.new("RGB", (50, 50), (255, 255, 255))
    assert scorer.score([transparent], "x").item() == pytest.approx(
        scorer.score([white], "x").item(), abs=1e-6
    )
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        scorer.score(torch.rand(2, 4, 32, 32), ["x", "y"])
    with pytest.raises(ValueError, match="needs one prompt per image"):
        scorer.score([rgb])


@pytest.mark.parametrize("kind", ["pickscore", "hpsv2"])
def test_long_prompts_are_truncated_and_said_once(scorers, kind, caplog):
    scorer = scorers[kind]
    scorer.truncation.said = False
    image = [pil_image(224, 224)]
    base = "a watercolor painting of a lighthouse on a cliff at dusk, " * 12  # > 77 tokens
    with caplog.at_level(logging.WARNING, logger="diffalign.scorers.weights"):
        a = scorer.score(image, [base])
        b = scorer.score(image, [base + " and a completely different ending about cars"])
    assert a.item() == pytest.approx(b.item(), abs=1e-6)  # everything past the limit is dropped
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and kind in warnings[0].getMessage()


def test_weights_missing_offline_names_the_id_and_the_local_path_setting(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"xswu/HPSv2/HPS_v2.1_compressed.pt.*hpsv2:model=PATH"):
        make_scorer("hpsv2:version=v2.1")
    with pytest.raises(FileNotFoundError, match=r"yuvalkirstain/PickScore_v1.*pickscore:model=PATH"):
        make_scorer("pickscore")
    with pytest.raises(FileNotFoundError, match=r"trl-lib/ddpo-aesthetic-predictor.*aesthetic:head=PATH"):
        make_scorer("aesthetic")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_scorer("pickscore:model=/no/such/folder")


def test_imagereward_says_what_is_missing():
    import importlib.util

    if importlib.util.find_spec("ImageReward") is not None:
        pytest.skip("the image-reward package is installed here")
    with pytest.raises(NotImplementedError, match="image-reward.*timm"):
        check_scorer_names(["imagereward"])
    with pytest.raises(NotImplementedError, match="not available"):
        make_scorer("imagereward")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_scores_a_folder_with_local_tiny_models(tmp_path, capsys):
    import json

    from diffalign.cli import main

    assert main(["tiny", "aesthetic", str(tmp_path / "aes")]) == 0
    assert main(["tiny", "pickscore", str(tmp_path / "pick")]) == 0
    images = tmp_path / "images"
    images.mkdir()
    pil_image(300, 200).save(images / "a.png")
    pil_image(128, 256, seed=3).convert("RGBA").save(images / "b.png")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    specs = [f"pickscore:model={tmp_path / 'pick'}", f"aesthetic:model={tmp_path / 'aes'}"]
    argv = ["score", "--images", str(images), "--prompts", str(tmp_path / "prompts.txt")]
    assert main(argv + [a for s in specs for a in ("--scorer", s)]) == 0
    rows = [json.loads(line) for line in (images / "scores.jsonl").read_text().splitlines()]
    expected = make_scorer(specs[1]).score([Image.open(images / "a.png"), Image.open(images / "b.png")])
    assert [r["scores"][specs[1]] for r in rows] == pytest.approx(expected.tolist(), abs=1e-5)
    assert main(["score", "--images", str(images), "--scorer", "pickscor"]) == 2
    assert "known scorers" in capsys.readouterr().err


def test_dtype_device_and_head_settings(folders, scorers):
    images = images_of_sizes()
    bf16 = make_scorer(f"pickscore:model={folders['pickscore']},dtype=bfloat16,device=cpu")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16 and bf16.device == torch.device("cpu")
    exact = scorers["pickscore"].score(images, PROMPTS)
    assert (bf16.score(images, PROMPTS) - exact).abs().max() < 0.05 * exact.abs().max() + 0.05
    # The head by its published file name inside a folder, given separately from the CLIP model.
    separate = make_scorer(f"aesthetic:model={folders['aesthetic']},head={folders['aesthetic']}")
    torch.testing.assert_close(separate.score(images), scorers["aesthetic"].score(images))
    with pytest.raises(FileNotFoundError, match="expected a model folder"):
        make_scorer(f"pickscore:model={folders['pickscore'] / 'config.json'}")
    with pytest.raises(ValueError, match="unknown dtype"):
        make_scorer(f"hpsv2:model={folders['hpsv2']},dtype=float8")
