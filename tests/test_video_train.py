"""Training on video: AnimateDiff (DDPM losses) and Wan (flow-matching losses), video preference data."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.data import (
    BadRowCounter,
    DataError,
    PreferenceDataset,
    Preprocessing,
    collate_pairs,
    open_pairs,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_VIDEO_CONFIGS = sorted(f"{p.parent.name}/{p.name}" for p in (ROOT / "configs").glob("tiny-*/*.yaml")
                            if p.parent.name in ("tiny-animatediff", "tiny-wan"))
# Small and fast: 2 optimizer steps, no before/after sampling, 16x16 clips; AnimateDiff 2 frames (its pairs
# store 4: this also exercises resampling), Wan 5 (its VAE needs 4k+1 frames).
COMMON = ["train.max_steps=2", "train.batch_size=1", "eval.enabled=false", "log.progress_bar=false"]
PAIRS = ["data.resolution=16"]
ONLINE = [
    "method.num_steps=2",
    "method.samples_per_prompt=2",
    "method.num_prompts=1",
    "method.gradient_steps_per_epoch=1",
    "method.train_timesteps=1",
    "method.height=16",
    "method.width=16",
]


def fast_overrides(name: str) -> list[str]:
    frames = "num_frames=2" if "animatediff" in name else "num_frames=5"
    if name.endswith(("prdp.yaml", "ddpo.yaml")):
        return COMMON + ONLINE + [f"method.{frames}"]
    seppo = ["method.ref_num_steps=2"] if name.endswith("seppo.yaml") else []
    return COMMON + PAIRS + seppo + [f"data.{frames}"]

# ----------------------------------------------------------------------------------------------------
# Video preference data
# ----------------------------------------------------------------------------------------------------
def _frames(n: int, size: int = 24) -> list[Image.Image]:
    # frame i is a flat grey of value 20 * i: the frame's index can be read back from its pixels
    return [Image.new("RGB", (size + 8, size), (20 * i, 20 * i, 20 * i)) for i in range(n)]


def _write_gif(path: Path, n: int) -> Path:
    frames = _frames(n)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def _write_webp(path: Path, n: int) -> Path:
    frames = _frames(n)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    return path


def _frame_index(pixels: torch.Tensor) -> list[int]:
    """[F, 3, H, W] in [-1, 1] -> the index each frame was drawn from."""
    values = ((pixels.mean(dim=(1, 2, 3)) + 1) * 127.5).tolist()
    return [round(v / 20) for v in values]


@pytest.fixture
def video_pairs(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(_frames(4)):
        frame.save(folder / f"{i:03d}.png")
    _write_gif(tmp_path / "four.gif", 4)
    _write_webp(tmp_path / "seven.webp", 7)
    (tmp_path / "broken.webp").write_bytes(b"RIFF\x00\x00not a video")
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    rows = [
        {"prompt": "folder vs gif", "chosen": "frames", "rejected": "four.gif"},
        {"prompt": "seven frames", "chosen": "seven.webp", "rejected": "four.gif"},
        {"prompt": "unreadable", "chosen": "broken.webp", "rejected": "four.gif"},
        {"prompt": "mp4", "chosen": "clip.mp4", "rejected": "four.gif"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_video_pairs_frame_folder_and_gif_are_read_as_clips(video_pairs):
    data = PreferenceDataset(open_pairs(str(video_pairs)), Preprocessing(16, random_flip=False, num_frames=4))
    item = data[0]
    assert item["pixels"].shape == (2, 4, 3, 16, 16)
    assert _frame_index(item["pixels"][0]) == [0, 1, 2, 3] and _frame_index(item["pixels"][1]) == [0, 1, 2, 3]


def test_video_pairs_resample_evenly_or_reject_with_a_counted_skip(video_pairs, caplog):
    source = open_pairs(str(video_pairs))
    resampled = PreferenceDataset(source, Preprocessing(16, random_flip=False, num_frames=4))[1]
    assert _frame_index(resampled["pixels"][0]) == [0, 2, 4, 6]  # 7 frames -> 4 evenly spaced
    longer = PreferenceDataset(source, Preprocessing(16, random_flip=False, num_frames=6))[0]
    assert _frame_index(longer["pixels"][1]) == [0, 1, 1, 2, 2, 3]  # 4 frames -> 6: frames repeat

    rejecting = PreferenceDataset(
        source, Preprocessing(16, random_flip=False, num_frames=4, frame_policy="reject")
    )
    batch = collate_pairs([rejecting[0], rejecting[1]])
    assert batch["size"] == 1 and len(batch["bad"]) == 1
    assert "pair 1" in batch["bad"][0] and "has 7 frames, expected 4" in batch["bad"][0]
    counter = BadRowCounter(max_bad_fraction=1.0)
    counter.update(batch)
    assert (counter.seen, counter.bad) == (2, 1)


def test_unreadable_videos_are_skipped_and_counted_naming_the_file(video_pairs):
    data = PreferenceDataset(open_pairs(str(video_pairs)), Preprocessing(16, random_flip=False, num_frames=4))
    batch = collate_pairs([data[i] for i in range(4)])
    assert batch["size"] == 2 and len(batch["bad"]) == 2
    assert "pair 2" in batch["bad"][0] and "broken.webp" in batch["bad"][0]
    assert "clip.mp4" in batch["bad"][1]
    try:
        import imageio  # noqa: F401
    except ImportError:  # MP4 needs imageio: the skip says which package to install
        assert "imageio[ffmpeg]" in batch["bad"][1]
    with pytest.raises(DataError, match="more than|unreadable"):
        BadRowCounter(max_bad_fraction=0.1, min_rows=1).update(batch)


def test_video_pairs_file_errors_come_before_any_model(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "a.gif"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: missing key\(s\) rejected"):
        open_pairs(str(tmp_path))
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"prompt": "x", "chosen": "nope", "rejected": "a.gif"}) + "\n"
    )
    with pytest.raises(DataError, match="does not exist"):
        open_pairs(str(tmp_path))


# ----------------------------------------------------------------------------------------------------
# The flow-matching denoising loss
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_wan(_offline_cache):
    from diffalign.models import load_pipeline

    return load_pipeline("tiny-wan")


def test_flow_matching_loss_is_velocity_regression_on_the_shifted_schedule(tiny_wan):
    from diffalign.denoising import FlowMatchingNoise, denoising_losses
    from diffalign.sampler import FAMILIES

    noise_process = FlowMatchingNoise.from_pipeline_config(tiny_wan.scheduler.config)
    shift, n = tiny_wan.scheduler.config.shift, 1000
    index = torch.tensor([0, 500, 999])
    sigmas, t = noise_process.sigmas_and_timesteps(index)
    plain = (n - index.double()) / n  # the unshifted training sigmas, 1 -> 1/N
    expected_sigmas = shift * plain / (1 + (shift - 1) * plain)
    assert torch.allclose(sigmas.double(), expected_sigmas, atol=1e-6) and torch.allclose(
        t, sigmas * n, atol=1e-3
    )

    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 16, 2, 4, 4, generator=generator)
    eps = torch.randn(3, 16, 2, 4, 4, generator=generator)
    cond = {"encoder_hidden_states": torch.randn(3, 7, 32, generator=generator)}
    with torch.no_grad():
        losses = denoising_losses(tiny_wan.transformer, FAMILIES["wan"], noise_process, x0, eps, index, cond)
        for i in range(3):
            s = float(expected_sigmas[i])
            x_t = (1 - s) * x0[i : i + 1] + s * eps[i : i + 1]
            v = tiny_wan.transformer(
                hidden_states=x_t,
                timestep=torch.tensor([s * n]),
                encoder_hidden_states=cond["encoder_hidden_states"][i : i + 1],
                return_dict=False,
            )[0]
            assert losses[i].item() == pytest.approx((v - (eps[i] - x0[i])).pow(2).mean().item(), rel=1e-4)


def test_logit_normal_timestep_sampling_maps_uniform_draws_to_the_logit_normal(tiny_wan):
    from diffalign.denoising import FlowMatchingNoise

    uniform = FlowMatchingNoise.from_pipeline_config(tiny_wan.scheduler.config)
    logit = FlowMatchingNoise.from_pipeline_config(tiny_wan.scheduler.config, "logit_normal", 0.5, 0.8)
    index = torch.arange(1000)
    u_sigmas, _ = uniform.sigmas_and_timesteps(index)
    l_sigmas, _ = logit.sigmas_and_timesteps(index)
    assert torch.equal(u_sigmas, uniform.scheduler.sigmas[:1000].float())
    # every draw maps to a table entry; u = index / N follows sigmoid(N(0.5, 0.8)): its logit has that
    # mean/std
    positions = (logit.scheduler.sigmas[:1000].float()[None] == l_sigmas[:, None]).float().argmax(dim=1)
    u = (positions.double() + 0.5) / 1000
    logits = torch.log(u / (1 - u))
    assert logits.mean().item() == pytest.approx(0.5, abs=0.05) and logits.std().item() == pytest.approx(
        0.8, abs=0.05
    )
    with pytest.raises(ValueError, match="expected one of logit_normal, mode, uniform"):
        FlowMatchingNoise.from_pipeline_config(tiny_wan.scheduler.config, "cosine")


def test_video_latents_use_the_pipelines_normalisation(tiny_wan):
    from diffalign.denoising import encode_images, sample_latents

    pixels = torch.rand(1, 5, 3, 16, 16) * 2 - 1
    params = encode_images(tiny_wan.vae, pixels)
    assert params.shape == (1, 32, 2, 2, 2)  # [N, 2C, 1 + (F-1)/4, H/8, W/8]
    mean = params[:, :16]
    torch.manual_seed(0)
    latents = sample_latents(tiny_wan.vae, params)
    config = tiny_wan.vae.config
    # WanPipeline decodes latents * std + mean: the sample must invert exactly that around the posterior mean
    back = latents * torch.tensor(config.latents_std).view(1, -1, 1, 1, 1) + torch.tensor(
        config.latents_mean
    ).view(1, -1, 1, 1, 1)
    assert (back - mean).abs().max() < 6 * params[:, 16:].mul(0.5).exp().max()


# ----------------------------------------------------------------------------------------------------
# End to end through `diffalign train`
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, _offline_cache):
    """Run every tiny video config for 2 steps once; name -> output folder."""
    root = tmp_path_factory.mktemp("video-runs")
    outputs = {}
    for name in TINY_VIDEO_CONFIGS:
        out = root / name.removesuffix(".yaml").replace("/", "-")
        assert (
            main(["train", str(ROOT / "configs" / name), f"train.output_dir={out}", *fast_overrides(name)])
            == 0
        )
        outputs[name] = out
    return outputs


@pytest.mark.slow
def test_every_tiny_video_config_trains_two_steps(trained):
    assert len(TINY_VIDEO_CONFIGS) >= 9
    for name, out in trained.items():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 2 and math.isfinite(rows[-1]["loss"]), name
        assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file(), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["animatediff", "wan"])
def test_video_lora_loads_in_stock_diffusers_and_changes_the_output(kind, trained):
    from diffusers import AnimateDiffPipeline, WanPipeline

    from diffalign.tiny import cached_tiny

    cls, frames = (AnimateDiffPipeline, 2) if kind == "animatediff" else (WanPipeline, 5)
    pipe = cls.from_pretrained(cached_tiny(kind))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(
        prompt="a red circle",
        num_frames=frames,
        height=16,
        width=16,
        num_inference_steps=2,
        output_type="latent",
    )
    before = pipe(generator=torch.Generator().manual_seed(0), **kw)[0]
    pipe.load_lora_weights(trained[f"tiny-{kind}/dpo.yaml"])
    after = pipe(generator=torch.Generator().manual_seed(0), **kw)[0]
    assert before.shape == after.shape and (before - after).abs().max() > 1e-4


@pytest.mark.slow
def test_wan_full_finetune_saves_a_pipeline_folder_stock_diffusers_loads(tmp_path):
    from diffusers import WanPipeline

    from diffalign.tiny import cached_tiny

    out = tmp_path / "full"
    assert (
        main(
            [
                "train",
                str(ROOT / "configs/tiny-wan/dpo.yaml"),
                f"train.output_dir={out}",
                "model.finetune=full",
                "optim.lr_warmup_steps=0",
                "train.max_steps=1",
                "train.batch_size=1",
                "eval.enabled=false",
                "log.progress_bar=false",
                "data.resolution=16",
                "train.flow_timestep_sampling=logit_normal",
            ]
        )
        == 0
    )
    pipe = WanPipeline.from_pretrained(out)

    original = WanPipeline.from_pretrained(cached_tiny("wan")).transformer.state_dict()
    changed = [k for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, original[k])]
    assert changed  # the tuned transformer was saved, not the base one


@pytest.mark.slow
def test_training_eval_writes_videos_and_scores(tmp_path):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "train",
                str(ROOT / "configs/tiny-wan/mapo.yaml"),
                f"train.output_dir={out}",
                "train.max_steps=1",
                "train.batch_size=1",
                "log.progress_bar=false",
                "data.resolution=16",
                "eval.prompts=[a cat]",
                "eval.num_steps=2",
                "eval.height=16",
                "eval.width=16",
                "eval.train_pairs=0",
            ]
        )
        == 0
    )
    scores = json.loads((out / "eval" / "scores.json").read_text())
    assert set(scores["scorers"]) == {"brightness"}
    video = Image.open(out / "eval" / "tuned" / "0000.webp")
    assert video.n_frames == 5 and video.size == (16, 16)
    assert Image.open(out / "eval" / "base_vs_tuned.png").size == (16 * 5, 32)


@pytest.mark.slow
def test_validation_grid_and_gallery_show_clips_of_eval_num_frames(tmp_path):
    from diffalign.gallery.run import load_media

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(ROOT / "configs/tiny-animatediff/dpo.yaml"),
                f"train.output_dir={out}",
                *fast_overrides("tiny-animatediff/dpo.yaml"),
                "eval.num_frames=3",
                "data.num_frames=2",
                "eval.num_steps=2",
                "log.validation_every_n_steps=2",
                "log.validation_gallery=true",
                "log.validation_prompts=[a red circle]",
            ]
        )
        == 0
    )
    grid = Image.open(out / "validation" / "step-000002.png")
    clip = load_media(
        next((out / "validation" / "gallery-step-000002" / "media" / "step-2").glob("*.anim.webp"))
    )
    assert clip.shape[0] == 3 and grid.size == (3 * clip.shape[-1], clip.shape[-2])  # frames side by side
    summary = json.loads((out / "validation" / "gallery-step-000002" / "summary.json").read_text())
    assert summary["models"]["step-2"]["status"] == "done"


def test_diffalign_pairs_writes_video_pairs_the_trainer_reads(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "pairs"
    assert (
        main(
            [
                "pairs",
                "--model",
                "tiny-animatediff",
                "--prompts",
                str(prompts),
                "--scorer",
                "brightness",
                "--out",
                str(out),
                "--num-frames",
                "3",
                "--steps",
                "1",
                "--height",
                "16",
                "--width",
                "16",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["chosen"].endswith(".webp")
    assert Image.open(out / rows[0]["chosen"]).n_frames == 3
    item = PreferenceDataset(open_pairs(str(out)), Preprocessing(16, random_flip=False, num_frames=3))[0]
    assert item["pixels"].shape == (2, 3, 3, 16, 16)
    assert np.isfinite(item["pixels"].numpy()).all()


@pytest.mark.slow
def test_diffalign_sample_writes_animatediff_videos(tmp_path):
    out = tmp_path / "out"
    assert (
        main(
            [
                "sample",
                "--model",
                "tiny-animatediff",
                "--prompt",
                "a cat",
                "--num-frames",
                "3",
                "--steps",
                "2",
                "--height",
                "16",
                "--width",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out / "00000.webp").n_frames == 3


def test_mp4_written_by_save_video_reads_back_as_a_training_clip(tmp_path):
    # imageio[ffmpeg] is in the dev extra, so this runs wherever the tests do
    from diffalign.data import read_video_frames
    from diffalign.video import save_video

    # 6 flat frames of grey 20*i; H.264 is lossy, so the index is read back from the mean, not exact pixels
    frames = torch.stack([torch.full((3, 32, 48), 20 * i / 255) for i in range(6)])
    written = save_video(frames, tmp_path / "clip", fps=8, formats=("mp4",))
    assert written == [tmp_path / "clip.mp4"] and written[0].stat().st_size > 0
    read = read_video_frames(written[0])
    assert len(read) == 6 and read[0].size == (48, 32) and read[0].mode == "RGB"

    _write_gif(tmp_path / "four.gif", 4)
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"prompt": "p", "chosen": "clip.mp4", "rejected": "four.gif"}) + "\n"
    )
    item = PreferenceDataset(open_pairs(str(tmp_path)), Preprocessing(16, random_flip=False, num_frames=3))[0]
    assert item["pixels"].shape == (2, 3, 3, 16, 16)
    assert _frame_index(item["pixels"][0]) == [0, 2, 5]  # 6 frames -> 3 evenly spaced (0, 2.5 -> 2, 5)
