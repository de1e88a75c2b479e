"""Sampling settings default to the model's own (the family entry's sizes, a built-in model's steps and
guidance), and the trainer says what a step is for every kind of method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageSequence

from diffalign.cli import main
from diffalign.config import load_config
from diffalign.families import FAMILIES
from diffalign.methods import METHODS
from diffalign.models import load_pipeline
from diffalign.sampler import Trajectory
from diffalign.sampling import SamplingSettings
from diffalign.tiny import cached_tiny
from diffalign.train import describe_step

ROOT = Path(__file__).resolve().parents[1]


def test_sample_tiny_wan_without_sizes_uses_the_models_own(tmp_path):
    """`diffalign sample --model tiny-wan` without --height/--width/--num-frames crashed in diffusers."""
    out = tmp_path / "x"
    assert main(["sample", "--model", "tiny-wan", "--prompt", "a dog running", "--steps", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    row = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    with Image.open(out / row["file"]) as video:
        frames = [frame.copy() for frame in ImageSequence.Iterator(video)]
    assert len(frames) == 5 and frames[0].size == (32, 32)


def test_wan_family_defaults_are_the_pipelines_own():
    pipe = load_pipeline(str(cached_tiny("wan")))
    assert FAMILIES["wan"].default_size(pipe) == {"height": 480, "width": 832, "num_frames": 81}
    assert SamplingSettings().for_model(pipe, "tiny-wan") == SamplingSettings(
        num_steps=50, guidance_scale=5.0, height=32, width=32, num_frames=5)
    # a value the caller gives always wins over the model's
    assert SamplingSettings(height=64, num_steps=3).for_model(pipe, "tiny-wan").height == 64


def test_image_family_defaults_come_from_the_denoisers_sample_size(tiny_sdxl):
    sizes = FAMILIES["sdxl"].default_size(tiny_sdxl)
    assert sizes == {"height": 32, "width": 32}
    assert SamplingSettings(num_frames=4).for_model(tiny_sdxl).num_frames == 4  # refusing it is the CLI's job
    assert SamplingSettings().for_model(tiny_sdxl).num_frames is None


def test_sample_toy_sdxl_defaults_to_its_own_steps_and_guidance(tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--model", "toy-sdxl", "--prompt", "a red circle on a white background",
                 "--device", "cpu", "--save-trajectories", "--out", str(out)]) == 0
    trajectory = Trajectory.load(out / "trajectories.safetensors")
    assert trajectory.num_steps == 20 and trajectory.guidance_scale == 3.0


def test_gallery_defaults_come_from_the_baseline_model(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a white background\n")
    out = tmp_path / "g"
    assert main(["gallery", "--model", "base=toy-sdxl", "--prompts", str(prompts), "--images-per-prompt", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    sampling = json.loads((out / "summary.json").read_text())["settings"]["sampling"]
    assert (sampling["num_steps"], sampling["guidance_scale"]) == (20, 3.0)


@pytest.mark.parametrize("given", [SamplingSettings(num_steps=7), SamplingSettings(guidance_scale=1.5)])
def test_named_defaults_never_override_what_is_given(given):
    filled = given.for_model_name("toy-sdxl")
    assert filled.num_steps == (given.num_steps or 20)
    assert filled.guidance_scale == (given.guidance_scale or 3.0)


def test_the_start_of_run_line_says_what_a_step_is():
    prdp = load_config(ROOT / "configs" / "tiny-sdxl" / "prdp.yaml")
    line = describe_step(prdp, METHODS["prdp"], 1)
    m = prdp.method
    assert f"each epoch samples {m.num_prompts} prompts x {m.samples_per_prompt} samples" in line
    assert f"takes {m.gradient_steps_per_epoch} gradient steps" in line and "pairs" not in line
    dpo = load_config(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml")
    assert describe_step(dpo, METHODS["dpo"], 2) == f"{2 * dpo.train.batch_size} pairs per optimizer step"
    seppo = load_config(ROOT / "configs" / "tiny-sdxl" / "seppo.yaml")
    assert "winning images per optimizer step" in describe_step(seppo, METHODS["seppo"], 1)
