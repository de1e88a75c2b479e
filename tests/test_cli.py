"""The command line: sample / score / tiny end to end, and bad input rejected before any model loads."""

import json

import pytest
import torch

from diffalign import models
from diffalign.cli import main
from diffalign.sampler import Trajectory


@pytest.fixture
def no_model_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(models, "load_pipeline", forbidden)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "tiny-nope", "--prompt", "x"], "unknown model 'tiny-nope'"),
        (["--model", "./missing/model", "--prompt", "x"], "does not exist"),
        (["--model", "tiny-sdxl", "--prompt", "x", "--steps", "0"], "--steps must be >= 1"),
        (["--model", "tiny-sdxl", "--prompt", "x", "--eta", "-1"], "--eta must be >= 0"),
        (["--model", "tiny-sdxl", "--prompt", "x", "--num-images", "0"], "--num-images must be >= 1"),
        (["--model", "tiny-sdxl", "--prompt", "x", "--scorer", "nope"], "unknown scorer 'nope'"),
        (["--model", "tiny-sdxl", "--prompts", "missing.txt"], "prompt file missing.txt does not exist"),
    ],
)
def test_sample_rejects_bad_input_before_loading(argv, message, tmp_path, capsys, no_model_loading):
    assert main(["sample", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_empty_prompt_file_and_unwritable_output(tmp_path, capsys, no_model_loading):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert (
        main(["sample", "--model", "tiny-sdxl", "--prompts", str(empty), "--out", str(tmp_path / "o")]) == 2
    )
    assert "has no prompts" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["sample", "--model", "tiny-sdxl", "--prompt", "x", "--out", str(blocker / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_sample_writes_images_jsonl_and_trajectories(tmp_path, tiny_sdxl_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square"}\n')
    out = tmp_path / "out"
    argv = [
        "sample",
        "--model",
        str(tiny_sdxl_path),
        "--prompts",
        str(prompts),
        "--num-images",
        "2",
        "--steps",
        "4",
        "--guidance",
        "4",
        "--eta",
        "1",
        "--seed",
        "7",
        "--batch-size",
        "3",
        "--out",
        str(out),
        "--save-trajectories",
        "--scorer",
        "brightness",
        "--scorer",
        "jpeg_compressibility",
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert [r["seed"] for r in rows] == [7, 8, 9, 10]
    assert all(
        (out / r["file"]).exists() and set(r["scores"]) == {"brightness", "jpeg_compressibility"}
        for r in rows
    )
    traj = Trajectory.load(out / "trajectories.safetensors")
    assert (
        traj.latents.shape == (4, 5, 4, 16, 16)
        and traj.log_probs.shape == (4, 4)
        and traj.timesteps.shape == (4,)
    )
    assert traj.step_rule == {"kind": "ddim", "eta": 1.0} and traj.guidance_scale == 4.0
    assert traj.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    # the same seed reproduces the same image
    assert main(argv[:-5] + ["--out", str(tmp_path / "again")]) == 0
    first = (out / "00002.png").read_bytes()
    assert (tmp_path / "again" / "00002.png").read_bytes() == first

    assert main(["score", "--scorer", "brightness", "--images", str(out)]) == 0
    scored = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in scored] == [r["prompt"] for r in rows]
    for s, r in zip(scored, rows, strict=True):
        # PNG round trip quantizes to 8 bits: scores agree to 1/255
        assert s["scores"]["brightness"] == pytest.approx(r["scores"]["brightness"], abs=1 / 255)
    assert "brightness: mean" in capsys.readouterr().out


def test_tiny_command_writes_loadable_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    assert main(["tiny", "sd", str(tmp_path / "sd"), "--seed", "5"]) == 0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert torch.isfinite(next(pipe.unet.parameters())).all()


def test_score_rejects_bad_input(tmp_path, capsys):
    assert main(["score", "--scorer", "brightness", "--images", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["score", "--scorer", "brightness", "--images", str(tmp_path)]) == 2
    assert "no images" in capsys.readouterr().err


def test_cli_tiny_kinds_match_builders():
    from diffalign import cli, tiny

    assert cli.TINY_KINDS == tiny.TINY_KINDS
