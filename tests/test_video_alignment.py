"""The toy-animatediff alignment configs run end to end (mechanics, not learning: see BENCHMARKS.md,
"Alignment on toy-animatediff (video)", for whether they learn).

Each test trains from the shipped config with only its sizes cut (prompts, clips, steps, frames): the
reward, LoRA targets, method settings and evaluation path are the config's own.
"""

import json
import math
from pathlib import Path

import pytest

from diffalign.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL_EVAL = ["eval.num_steps=2", "eval.num_frames=4", "eval.seeds=[0]", "eval.batch_size=2",
              "log.progress_bar=false"]


@pytest.fixture(scope="module")
def toy_video_model(tmp_path_factory):
    """The shipped toy-animatediff when this checkout has it, else the same architecture with a random motion
    UNet (toy-sdxl's VAE and text encoder), saved in diffusers format."""
    from diffalign.toy import TOY_ANIMATEDIFF_DIR

    if (TOY_ANIMATEDIFF_DIR / "model_index.json").exists():
        return "toy-animatediff"
    from diffalign.toy.video_model import build_video_pipeline

    out = tmp_path_factory.mktemp("toy-animatediff")
    build_video_pipeline(seed=0).save_pretrained(out)
    return str(out)


def heldout_eval(cfg_path: Path, n: int = 2) -> str:
    prompts = load_config(cfg_path, check=False).eval.prompts[:n]
    return f"eval.prompts={json.dumps(prompts)}"


def check_run(out: Path) -> dict:
    """The run wrote LoRA weights and a before/after evaluation of the frame-averaged reward on its clips."""
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    scores = json.loads((out / "eval" / "scores.json").read_text())
    row = scores["scorers"]["toy_saturation"]
    assert math.isfinite(row["base_mean"]) and math.isfinite(row["tuned_mean"])
    assert row["delta"] == pytest.approx(row["tuned_mean"] - row["base_mean"])
    assert 0.0 <= row["base_mean"] <= 1.0
    return scores


@pytest.mark.slow
def test_toy_animatediff_prdp_config_runs_end_to_end(tmp_path, toy_video_model, one_thread):
    from diffalign.train import train

    path = ROOT / "configs" / "toy-animatediff" / "prdp.yaml"
    cfg = load_config(path, [
        f"model.name={toy_video_model}", f"train.output_dir={tmp_path / 'prdp'}", "train.max_steps=1",
        "method.num_prompts=1", "method.samples_per_prompt=2", "method.num_steps=2",
        "method.num_frames=4", "method.train_timesteps=1", "method.gradient_steps_per_epoch=1",
        "method.micro_batch_prompts=1", "method.recompute_chunk_size=1", heldout_eval(path), *SMALL_EVAL])
    assert cfg.method.reward == "toy_saturation" and cfg.method.prompts.endswith(
        "toy-video-train-prompts.txt"
    )
    train(cfg)
    check_run(tmp_path / "prdp")
    metrics = [json.loads(line) for line in (tmp_path / "prdp" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_mean" in m or "loss" in m for m in metrics)


@pytest.mark.slow
def test_toy_animatediff_mapo_config_runs_end_to_end_on_generated_video_pairs(
    tmp_path, toy_video_model, one_thread
):
    from diffalign.models import load_pipeline
    from diffalign.pairs import generate_pairs
    from diffalign.sampling import SamplingSettings
    from diffalign.scorers import make_scorer
    from diffalign.toy.video_data import video_prompts
    from diffalign.train import train

    pipe = load_pipeline(toy_video_model)
    pipe.set_progress_bar_config(disable=True)
    info = generate_pairs(
        pipe,
        video_prompts("train", n=2, seed=0),
        make_scorer("toy_saturation"),
        tmp_path / "pairs",
        images_per_prompt=2,
        seed=0,
        progress=False,
        sampling=SamplingSettings(num_steps=2, guidance_scale=3.0, num_frames=4),
    )
    assert info["pairs"] >= 1
    path = ROOT / "configs" / "toy-animatediff" / "mapo.yaml"
    cfg = load_config(
        path,
        [
            f"model.name={toy_video_model}",
            f"data.source={tmp_path / 'pairs'}",
            f"train.output_dir={tmp_path / 'mapo'}",
            "train.max_steps=2",
            "train.batch_size=1",
            "data.num_frames=4",
            "eval.train_pairs=1",
            heldout_eval(path),
            *SMALL_EVAL,
        ],
    )
    assert cfg.method.name == "mapo"
    train(cfg)
    check_run(tmp_path / "mapo")
