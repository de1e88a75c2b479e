"""The scorer interface and the weight-free scorers."""

import io

import pytest
import torch
from PIL import Image

from diffalign.scorers import Scorer, available_scorers, make_scorer


def _images(n=5, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, size, size).clone()
    noisy = torch.rand(n, 3, size, size, generator=g)
    return torch.cat([smooth, noisy])


def test_registry_lists_weight_free_scorers():
    assert {"jpeg_compressibility", "jpeg_incompressibility", "brightness"} <= set(available_scorers())
    with pytest.raises(ValueError, match="known scorers: .*brightness"):
        make_scorer("no-such-scorer")


def test_jpeg_compressibility_is_ddpo_definition():
    images = _images()
    scorer = make_scorer("jpeg_compressibility")
    assert isinstance(scorer, Scorer) and scorer.higher_is_better and not scorer.differentiable
    scores = scorer.score(images)
    for image, value in zip(images, scores, strict=True):
        array = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        assert value.item() == pytest.approx(-buffer.tell() / 1000, abs=1e-6)
    # flat images compress better than noise
    assert scores[:5].min() > scores[5:].max()
    assert torch.allclose(make_scorer("jpeg_incompressibility").score(images), -scores)


def test_pil_and_tensor_inputs_agree_and_batching_is_invisible():
    images = _images()
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in images]
    for name in ("jpeg_compressibility", "brightness"):
        scorer = make_scorer(name)
        batched = scorer.score(images)
        scorer.batch_size = 1
        one_by_one = scorer.score(images)
        assert torch.allclose(batched, one_by_one)
        assert torch.allclose(scorer.score(pil), batched, atol=1e-2)


def test_brightness_is_differentiable():
    images = _images().requires_grad_(True)
    scorer = make_scorer("brightness")
    scores = scorer.score(images)
    assert scores.requires_grad
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    white, black = torch.ones(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    assert scorer.score(white).item() == pytest.approx(1.0) and scorer.score(black).item() == pytest.approx(
        0.0
    )


def test_bad_input():
    scorer = make_scorer("brightness")
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        scorer.score(torch.rand(2, 3, 8, 8), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        scorer.score(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match="no images"):
        scorer.score([])
