"""The toy video world: moving-shape clips, their reader, the pretraining script and the shipped
toy-animatediff."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from diffalign.toy import TOY_ANIMATEDIFF_DIR, video_data
from diffalign.toy.video_evaluate import clip_hits, read_direction, summarize_clips, video_chance_levels

#: The shipped model follows background and colour words only loosely (BENCHMARKS.md, "Toy video model"),
#: so its check is paired: same seeds, one caption word changed, averaged over 4 clips, in [0, 1] pixel units.
#: Measured (seeds 0-3): white-minus-black border brightness +0.038, red-minus-blue "redness" +0.009; at seeds
#: 100-103: +0.016 and +0.043. A model that ignored its captions would sit at 0 up to sampling noise.
MIN_BACKGROUND_MARGIN = 0.02
MIN_COLOUR_MARGIN = 0.0


# ----------------------------------------------------------------------------------------------------
# Clips and captions
# ----------------------------------------------------------------------------------------------------
def test_clips_are_deterministic_and_captions_parse_back():
    clips_a, captions_a = video_data.make_video_dataset(12, seed=3)
    clips_b, captions_b = video_data.make_video_dataset(12, seed=3)
    clips_c, _ = video_data.make_video_dataset(12, seed=4)
    assert clips_a.shape == (12, video_data.NUM_FRAMES, 3, 32, 32) and clips_a.dtype == torch.uint8
    assert torch.equal(clips_a, clips_b) and captions_a == captions_b
    assert not torch.equal(clips_a, clips_c)
    for caption in captions_a:
        assert video_data.parse_video_caption(caption).caption() == caption
    with pytest.raises(ValueError, match="not a toy video caption"):
        video_data.parse_video_caption("a small red circle on the left on a white background")
    with pytest.raises(ValueError, match="unknown direction"):
        video_data.parse_video_caption("a small red circle moving sideways on a white background")


def test_splits_are_disjoint_and_heldout_triples_never_train():
    train, heldout = video_data.clips_of("train"), video_data.clips_of("heldout")
    assert len(train) + len(heldout) == len(video_data.all_clips()) == 432 and len(heldout) == 72
    triple = lambda c: (c.color, c.shape, c.background)  # noqa: E731
    assert not {triple(c) for c in train} & {triple(c) for c in heldout}
    _, captions = video_data.make_video_dataset(40, seed=0, split="heldout")
    assert all(video_data.is_heldout(video_data.parse_video_caption(c)) for c in captions)
    assert set(video_data.video_prompts("heldout")) == {c.caption() for c in heldout}


@pytest.mark.parametrize("direction", video_data.DIRECTIONS)
def test_the_object_moves_in_the_captioned_direction_and_stays_inside(direction):
    clip = video_data.Clip("large", "red", "circle", direction, "white")
    dx, dy = video_data.DIRECTION_VECTORS[direction]
    for seed in range(5):
        centres = video_data.path_of(clip, random.Random(seed))
        steps = [(b[0] - a[0]) * dx + (b[1] - a[1]) * dy for a, b in zip(centres, centres[1:], strict=False)]
        assert all(s > 0.8 for s in steps)  # steadily forward, about 1.5 px per frame
        assert all(7.5 < v < 32 - 7.5 for c in centres for v in c)  # a large shape stays whole
        frames = torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1)
                              for f in video_data.render_clip(clip, random.Random(seed))]).float() / 255
        assert read_direction(frames) == direction
    assert read_direction(frames[:1].expand(8, -1, -1, -1)) is None  # a still clip does not move


def test_reader_scores_the_dataset_clips_near_perfect_and_a_wrong_caption_low():
    clips, captions = video_data.make_video_dataset(24, seed=1, split="heldout")
    videos = clips.float() / 255
    accuracy = summarize_clips(clip_hits(videos, captions))
    assert accuracy["direction"] == 1.0 and accuracy["color"] == 1.0 and accuracy["background"] == 1.0
    assert accuracy["shape"] >= 0.9 and accuracy["size"] >= 0.9 and accuracy["count"] == 1.0
    # The same clips against captions whose direction is turned around: motion accuracy drops to zero.
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    flipped = [c.replace(f"moving {d}", f"moving {opposite[d]}") for c in captions
               for d in [video_data.parse_video_caption(c).direction]]
    assert summarize_clips(clip_hits(videos, flipped))["direction"] == 0.0
    assert video_chance_levels()["direction"] == 0.25


def test_toy_saturation_scores_videos_as_frame_averages():
    from diffalign.scorers import make_scorer

    clips, captions = video_data.make_video_dataset(3, seed=0)
    videos = clips.float() / 255
    scorer = make_scorer("toy_saturation")
    per_video = scorer(videos, captions)
    per_frame = scorer(videos.flatten(0, 1), [c for c in captions for _ in range(videos.shape[1])])
    assert per_video.shape == (3,)
    torch.testing.assert_close(per_video, per_frame.view(3, -1).mean(1))


# ----------------------------------------------------------------------------------------------------
# Pretraining script (a few steps) and the shipped model
# ----------------------------------------------------------------------------------------------------
def test_pretrain_config_rejects_bad_settings():
    from diffalign.toy.video_pretrain import VideoPretrainConfig

    with pytest.raises(ValueError, match="num_frames must be >= 2"):
        VideoPretrainConfig(num_frames=1)
    with pytest.raises(ValueError, match="<= 32"):
        VideoPretrainConfig(num_frames=40)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        VideoPretrainConfig(batch_size=0)
    with pytest.raises(FileNotFoundError, match="init_from"):
        VideoPretrainConfig(init_from="/no/such/run/pipeline")


@pytest.mark.slow
def test_pretrain_video_runs_and_resumes_exactly(tmp_path, one_thread):
    from diffusers import AnimateDiffPipeline
    from safetensors.torch import load_file

    from diffalign.toy.video_pretrain import VideoPretrainConfig, pretrain_video

    config = VideoPretrainConfig(num_clips=6, num_frames=4, steps=4, batch_size=2, warmup_steps=1,
                                 checkpoint_every=3, eval_every=1000, eval_prompts=2)
    # Run "a" is interrupted after 2 steps and resumed; run "b" goes straight through.
    assert pretrain_video(tmp_path / "a", config, final_samples=False, stop_after=2) is None
    state = json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())
    assert state["stage"] == "unet" and state["step"] == 2
    first = pretrain_video(tmp_path / "a", config, final_samples=False)
    second = pretrain_video(tmp_path / "b", config, final_samples=False)
    for name in (
        "unet/diffusion_pytorch_model.safetensors",
        "motion_adapter/diffusion_pytorch_model.safetensors",
    ):
        a, b = load_file(str(first / name)), load_file(str(second / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    log = (tmp_path / "a" / "train.log").read_text()
    assert "resuming from" in log and "motion unet step 4/4" in log
    with pytest.raises(ValueError, match="other settings"):
        pretrain_video(tmp_path / "a", VideoPretrainConfig(num_clips=6, num_frames=4, steps=5, batch_size=2))
    pipe = AnimateDiffPipeline.from_pretrained(str(first))
    assert type(pipe.unet).__name__ == "UNetMotionModel"


@pytest.fixture(scope="module")
def toy_video_pipe():
    from diffalign.models import load_pipeline

    pipe = load_pipeline("toy-animatediff")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_toy_animatediff_loads_with_stock_diffusers_and_samples_videos(toy_video_pipe):
    from diffusers import AnimateDiffPipeline

    from diffalign.models import resolve_model
    from diffalign.sampler import sample

    assert resolve_model("toy-animatediff").location() == str(TOY_ANIMATEDIFF_DIR)
    files = [p for p in TOY_ANIMATEDIFF_DIR.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    stock = AnimateDiffPipeline.from_pretrained(str(TOY_ANIMATEDIFF_DIR))
    assert type(stock.unet).__name__ == "UNetMotionModel"
    assert stock.unet.config.cross_attention_dim == stock.text_encoder.config.hidden_size
    prompts = [
        "a large red circle moving left on a white background",
        "a small blue square moving up on a black background",
    ]
    out = sample(
        toy_video_pipe,
        prompts,
        seeds=[0, 1],
        num_steps=4,
        guidance_scale=3.0,
        num_frames=video_data.NUM_FRAMES,
    )
    assert out.images.shape == (2, video_data.NUM_FRAMES, 3, 32, 32) and torch.isfinite(out.images).all()
    assert out.trajectory.latents.shape == (2, 5, 4, video_data.NUM_FRAMES, 16, 16)


@pytest.mark.slow
def test_shipped_toy_animatediff_follows_background_and_colour_words(toy_video_pipe, one_thread):
    """Same seeds, captions differing in one word: the named background / object colour must win."""
    from diffalign.sampler import sample
    from diffalign.toy.video_model import DEFAULT_GUIDANCE, DEFAULT_NUM_STEPS

    n = 4
    prompts = [
        "a large red circle moving left on a white background",
        "a large red circle moving left on a black background",
        "a large red square moving up on a grey background",
        "a large blue square moving up on a grey background",
    ]
    # One batch; per-sample seeds make each clip what it would be alone.
    videos = sample(
        toy_video_pipe,
        [p for p in prompts for _ in range(n)],
        seeds=list(range(n)) * len(prompts),
        num_steps=DEFAULT_NUM_STEPS,
        guidance_scale=DEFAULT_GUIDANCE,
        num_frames=video_data.NUM_FRAMES,
    ).images
    white, black, red, blue = videos.split(n)
    border = lambda v: torch.cat([v[..., 0, :], v[..., -1, :]], dim=-1).mean(dim=(1, 2, 3))  # noqa: E731
    assert (border(white) - border(black)).mean() > MIN_BACKGROUND_MARGIN, (border(white), border(black))
    redness = lambda v: (v[:, :, 0] - v[:, :, 2]).mean(dim=(1, 2, 3))  # noqa: E731
    assert (redness(red) - redness(blue)).mean() > MIN_COLOUR_MARGIN, (redness(red), redness(blue))
