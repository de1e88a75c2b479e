"""HPSv3 on a tiny same-architecture Qwen2-VL built offline (published checkpoint layout)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffalign.scorers import make_scorer
from diffalign.scorers.hpsv3 import HPSV3_FILE, modern_key, smart_resize
from diffalign.scorers.tiny_models import cached_tiny_scorer


@pytest.fixture(scope="module")
def tiny_hpsv3():
    return cached_tiny_scorer("hpsv3")


def _images(n=3, seed=0):
    return torch.rand(n, 3, 40, 56, generator=torch.Generator().manual_seed(seed))


def test_smart_resize_matches_qwen_vl_at_256x28x28_pixels():
    assert smart_resize(512, 512) == (448, 448) and smart_resize(1024, 1024) == (448, 448)
    for height, width in ((768, 1344), (40, 56), (1000, 300)):
        h, w = smart_resize(height, width)
        assert h % 28 == 0 and w % 28 == 0 and abs(h * w - 256 * 28 * 28) / (256 * 28 * 28) < 0.15
        assert abs(h / w - height / width) / (height / width) < 0.15


def test_batched_scores_equal_one_at_a_time_with_different_prompt_lengths(tiny_hpsv3):
    scorer = make_scorer(f"hpsv3:model={tiny_hpsv3},dtype=float32")
    assert scorer.needs_prompts and not scorer.differentiable
    images = _images()
    prompts = ["a cat", "a much longer prompt about a small dog on a red sofa", "x"]  # right padding differs
    batched = scorer.score(images, prompts)
    single = torch.cat([scorer.score(images[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)
    assert len(set(batched.tolist())) == 3  # images and prompts change the score
    assert scorer.score(images[:1], ["a cat"]).item() != pytest.approx(
        scorer.score(images[:1], ["a dog"]).item(), abs=1e-9
    )


def test_legacy_and_modern_checkpoint_layouts_give_the_same_scores(tiny_hpsv3, tmp_path):
    legacy = load_file(str(tiny_hpsv3 / HPSV3_FILE))
    assert any(k.startswith("visual.") for k in legacy) and any(k.startswith("rm_head.") for k in legacy)
    modern_dir = tmp_path / "modern"
    shutil.copytree(tiny_hpsv3, modern_dir)
    save_file({modern_key(k): v for k, v in legacy.items()}, str(modern_dir / HPSV3_FILE))
    images, prompts = _images(2, seed=1), ["a red cube", "a blue ball"]
    a = make_scorer(f"hpsv3:model={tiny_hpsv3},dtype=float32").score(images, prompts)
    b = make_scorer(f"hpsv3:model={modern_dir / HPSV3_FILE},base={tiny_hpsv3},dtype=float32").score(
        images, prompts
    )
    assert torch.equal(a, b)


def test_broken_or_missing_checkpoints_are_clear_errors(tiny_hpsv3, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_hpsv3, broken)
    state = load_file(str(broken / HPSV3_FILE))
    save_file(
        {k: v for k, v in state.items() if not k.startswith("visual.blocks.1.")}, str(broken / HPSV3_FILE)
    )
    with pytest.raises(
        ValueError, match=r"does not match the Qwen2-VL architecture.*missing \['model.visual.blocks.1"
    ):
        make_scorer(f"hpsv3:model={broken}")
    with pytest.raises(
        FileNotFoundError, match=r"HPSv3 checkpoint.*MizzenAI/HPSv3/HPSv3.safetensors.*hpsv3:model=PATH"
    ):
        make_scorer("hpsv3")  # the tests run offline: the hub checkpoint cannot be fetched
