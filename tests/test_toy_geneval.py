"""The toy GenEval: the ``toy_geneval`` reward on scenes drawn with known attributes, and
``diffalign toy eval`` (several seeds, both splits, 95 % intervals, the change against a base on the same
noise, LoRA runs)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from diffalign.images import to_tensor
from diffalign.scorers import make_scorer
from diffalign.toy import data, video_data

#: Scenes that exercise every attribute value at least once (single objects name a position).
SCENES = [
    data.Scene(1, "large", "red", "circle", "center", "white"),
    data.Scene(1, "small", "blue", "square", "left", "black"),
    data.Scene(1, "large", "green", "triangle", "top", "grey"),
    data.Scene(1, "small", "yellow", "circle", "right", "black"),
    data.Scene(1, "large", "purple", "square", "bottom", "white"),
    data.Scene(2, "large", "orange", "circle", None, "grey"),
    data.Scene(3, "small", "red", "square", None, "white"),
]


def _render(scene: data.Scene, seed: int = 1) -> torch.Tensor:
    # The reader reads about 98 % of renders fully right (test_toy.py); with this jitter seed it reads all of
    # these.
    return to_tensor(data.render(scene, random.Random(seed)))


def _other_value(scene: data.Scene, name: str):
    """The scene's next value of attribute ``name`` that keeps it a valid scene of the same kind."""
    values = data.VOCAB[name]
    if name == "count":  # several objects stay several (a single object names a position, several do not)
        values = (2, 3) if scene.count > 1 else ()
    current = getattr(scene, name)
    return (
        values[(values.index(current) + 1) % len(values)] if current in values and len(values) > 1 else None
    )


def test_a_correctly_drawn_scene_scores_one_and_each_wrong_attribute_drops_exactly_that_attribute():
    geneval, fraction = make_scorer("toy_geneval"), make_scorer("toy_geneval:measure=fraction")
    checked = set()
    for scene in SCENES:
        caption = scene.caption()
        right = _render(scene)
        assert geneval(right, [caption]).item() == 1.0 and fraction(right, [caption]).item() == 1.0, caption
        named = geneval.hits(right, [caption])[0]
        assert set(named) == {"color", "shape", "background", "size", "count"} | (
            {"position"} if scene.count == 1 else set()
        )
        for name in named:
            value = _other_value(scene, name)
            if value is None:
                continue
            wrong = _render(dataclasses.replace(scene, **{name: value}))
            hits = geneval.hits(wrong, [caption])[0]
            assert hits == {n: float(n != name) for n in named}, (caption, name, value, hits)
            assert geneval(wrong, [caption]).item() == 0.0
            assert fraction(wrong, [caption]).item() == pytest.approx((len(named) - 1) / len(named))
            assert make_scorer(f"toy_geneval:measure={name}")(wrong, [caption]).item() == 0.0
            checked.add(name)
    assert checked == set(data.VOCAB)


def test_toy_geneval_scores_batches_pil_images_and_rejects_bad_input():
    geneval = make_scorer("toy_geneval")
    assert not geneval.differentiable and geneval.needs_prompts
    captions = [s.caption() for s in SCENES]
    images = torch.cat([_render(s) for s in SCENES])
    assert geneval(images, captions).tolist() == [1.0] * len(SCENES)
    shuffled = captions[1:] + captions[:1]
    assert geneval(images, shuffled).sum() == 0  # every image against another scene's caption
    pil = data.render(SCENES[0], random.Random(0))
    assert geneval([pil], [captions[0]]).item() == 1.0
    with pytest.raises(ValueError, match="toy caption"):
        geneval(images[:1], ["a photo of a dog"])
    with pytest.raises(ValueError, match="prompt"):
        geneval(images[:1])
    with pytest.raises(ValueError, match="measure"):
        make_scorer("toy_geneval:measure=colour")
    with pytest.raises(ValueError, match="not an attribute of toy images"):
        make_scorer("toy_geneval:measure=direction")(images[:1], captions[:1])
    # Position is named only for single objects: on a scene of several it does not count against it.
    assert make_scorer("toy_geneval:measure=position")(images[-1:], captions[-1:]).item() == 1.0


def test_toy_geneval_reads_videos_frame_by_frame_and_their_motion():
    geneval, fraction = make_scorer("toy_geneval"), make_scorer("toy_geneval:measure=fraction")
    clip = video_data.Clip("large", "red", "circle", "left", "white")
    frames = torch.stack([to_tensor(f)[0] for f in video_data.render_clip(clip, random.Random(0))]).unsqueeze(
        0
    )
    assert geneval(frames, [clip.caption()]).item() == 1.0
    hits = geneval.hits(frames, [clip.caption()])[0]
    assert hits == dict.fromkeys(("color", "shape", "background", "size", "count", "direction"), 1.0)
    backwards = dataclasses.replace(clip, direction="right").caption()
    assert geneval(frames, [backwards]).item() == 0.0
    assert fraction(frames, [backwards]).item() == pytest.approx(5 / 6)
    assert make_scorer("toy_geneval:measure=direction")(frames, [backwards]).item() == 0.0
    # A frozen clip: every frame right, no motion.
    frozen = frames[:, :1].expand(-1, frames.shape[1], -1, -1, -1)
    assert geneval.hits(frozen, [clip.caption()])[0]["direction"] == 0.0
    # One blue frame of eight: colour 7/8 right, so the clip is not all right.
    blue = to_tensor(video_data.render_clip(dataclasses.replace(clip, color="blue"), random.Random(0))[3])[0]
    mixed = frames.clone()
    mixed[0, 3] = blue
    assert geneval.hits(mixed, [clip.caption()])[0]["color"] == pytest.approx(7 / 8)
    assert geneval(mixed, [clip.caption()]).item() == 0.0
    with pytest.raises(ValueError, match="video caption"):
        geneval(frames, [SCENES[0].caption()])


# ----------------------------------------------------------------------------------------------------
# diffalign toy eval: any model spec, both splits, several seeds, intervals, change against a base
# ----------------------------------------------------------------------------------------------------
def test_bootstrap_resamples_captions_not_images():
    import numpy as np

    from diffalign.toy.geneval import bootstrap_mean

    flat = bootstrap_mean(np.full(6, 0.5), np.arange(6))
    assert flat == {"mean": 0.5, "low": 0.5, "high": 0.5}
    values = np.array([1.0] * 10 + [0.0] * 10)
    by_image = bootstrap_mean(values, np.arange(20))
    by_caption = bootstrap_mean(values, np.array([0] * 10 + [1] * 10))  # two captions, ten seeds each
    assert by_image["mean"] == by_caption["mean"] == 0.5
    assert by_caption["high"] - by_caption["low"] > by_image["high"] - by_image["low"]
    assert by_image["low"] < 0.5 < by_image["high"]


@pytest.fixture
def no_model_loading(monkeypatch):
    from diffalign import models

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(models, "load_pipeline", forbidden)


@pytest.fixture
def lora_run(tmp_path):
    """A LoRA run folder as 'diffalign train' writes one (config.yaml, adapters by the trainer's save_lora),
    with adapters that visibly change toy-sdxl."""
    from peft import LoraConfig

    from diffalign.config import load_config
    from diffalign.export import save_lora
    from diffalign.models import load_pipeline

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("configs/toy-sdxl/prdp.yaml", [f"train.output_dir={run}"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    pipe = load_pipeline("toy-sdxl")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    save_lora(pipe, pipe.unet, run)
    return run


def _eval(argv, tmp_path, capsys):
    from diffalign.cli import main

    out = tmp_path / "report.json"
    assert main(["toy", "eval", *argv, "--steps", "2", "--threads", "1", "--out", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_toy_eval_of_a_model_against_itself_changes_nothing_and_seed_0_is_the_old_eval(
    tmp_path, capsys, one_thread
):
    from diffalign.models import load_pipeline
    from diffalign.toy.evaluate import caption_accuracy

    report, text = _eval(
        [
            "--model",
            "toy-sdxl",
            "--base",
            "toy-sdxl",
            "--split",
            "both",
            "--num-prompts",
            "3",
            "--seeds",
            "0",
            "2",
        ],
        tmp_path,
        capsys,
    )
    assert set(report["splits"]) == {"train", "heldout"} and report["models"] == {
        "base": "toy-sdxl",
        "model": "toy-sdxl",
    }
    assert len(report["images"]) == 2 * 2 * 3
    assert len({(r["split"], r["noise_seed"]) for r in report["images"]}) == 12
    for entry in report["splits"].values():
        assert entry["n"] == 6
        for name, stat in entry["change"]["model"].items():
            assert stat == {"mean": 0.0, "low": 0.0, "high": 0.0}, name
        for stat in entry["accuracy"]["model"].values():
            assert 0.0 <= stat["low"] <= stat["mean"] <= stat["high"] <= 1.0
    assert "toy GenEval, heldout split: 6 images" in text and "change model" in text
    # Seed 0 draws the captions and noise of the one-seed evaluation, read by the same reader.
    pipe = load_pipeline("toy-sdxl")
    pipe.set_progress_bar_config(disable=True)
    prompts = data.toy_prompts("heldout", 3, seed=0)
    old = caption_accuracy(pipe, prompts, seed=0, num_steps=2)["accuracy"]
    rows = [r["model"] for r in report["images"] if r["split"] == "heldout" and r["seed"] == 0]
    assert [r["caption"] for r in report["images"] if r["split"] == "heldout" and r["seed"] == 0] == prompts
    for name, value in old.items():
        named = [r[name] for r in rows if name in r]
        assert (sum(named) / len(named) if named else float("nan")) == pytest.approx(value, nan_ok=True), name


def test_toy_eval_loads_a_lora_run_onto_its_recorded_base_and_reports_the_paired_change(
    lora_run, tmp_path, capsys, one_thread
):
    from diffalign.models import load_pipeline, resolve_model
    from diffalign.sampler import sample

    spec = resolve_model(f"{lora_run}:lora")
    assert spec.name == "toy-sdxl" and spec.lora == str(lora_run)
    tuned, base = load_pipeline(spec), load_pipeline("toy-sdxl")
    prompt = [data.toy_prompts("heldout")[0]]
    a = sample(tuned, prompt, seeds=[0], num_steps=2, guidance_scale=3.0).images
    b = sample(base, prompt, seeds=[0], num_steps=2, guidance_scale=3.0).images
    assert (a - b).abs().max() > 0.05  # the adapters are on: same noise, another image

    report, text = _eval(
        ["--model", f"{lora_run}:lora", "--base", "toy-sdxl", "--num-prompts", "4", "--seeds", "0", "1"],
        tmp_path,
        capsys,
    )
    entry = report["splits"]["heldout"]
    rows = [r for r in report["images"] if r["split"] == "heldout"]
    for name, stat in entry["change"]["model"].items():
        named = [r for r in rows if name in r["model"]]
        expected = sum(r["model"][name] - r["base"][name] for r in named) / len(named)
        assert stat["mean"] == pytest.approx(expected) and stat["low"] <= stat["mean"] <= stat["high"], name
    assert f"model: {lora_run}:lora" in text


def test_toy_eval_reads_video_models_with_motion(tmp_path, capsys, one_thread):
    report, text = _eval(
        ["--model", "toy-animatediff", "--num-prompts", "2", "--batch-size", "2"], tmp_path, capsys
    )
    assert report["video"] is True
    assert set(report["splits"]["heldout"]["accuracy"]["model"]) == {
        "color",
        "shape",
        "background",
        "size",
        "count",
        "direction",
        "all",
    }
    assert "2 clips" in text


@pytest.mark.parametrize("argv, message", [
    (["--model", "missing-run:lora"], "LoRA folder missing-run does not exist"),
    (["--model", "toy-sdxl", "--base", "tiny-nope"], "unknown model 'tiny-nope'"),
    (["--seeds", "0", "0"], "seeds must be distinct"),
    (["--num-prompts", "-1"], "--num-prompts must be >= 0"),
    (["--steps", "0"], "num_steps and batch_size must be >= 1"),
])
def test_toy_eval_rejects_bad_input_before_loading(argv, message, capsys, no_model_loading):
    from diffalign.cli import main

    assert main(["toy", "eval", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_lora_run_without_its_config_names_what_is_missing(lora_run, capsys, no_model_loading):
    from diffalign.cli import main

    (lora_run / "config.yaml").unlink()
    assert main(["toy", "eval", "--model", f"{lora_run}:lora"]) == 2
    assert "no base model is known (no diffalign config.yaml records one)" in capsys.readouterr().err


def test_toy_geneval_scores_the_same_images_with_extra_scorers(one_thread):
    from diffalign.models import load_pipeline
    from diffalign.sampler import sample
    from diffalign.toy.geneval import GenEvalSettings, toy_geneval

    pipe = load_pipeline("toy-sdxl")
    pipe.set_progress_bar_config(disable=True)
    settings = GenEvalSettings(seeds=[1], num_prompts=2, num_steps=2)
    report = toy_geneval({"toy": pipe}, settings, scorers={"toy_saturation": make_scorer("toy_saturation")},
                         progress=False)
    rows = report["images"]
    images = sample(pipe, [r["caption"] for r in rows], seeds=[r["noise_seed"] for r in rows], num_steps=2,
                    guidance_scale=settings.guidance_scale).images
    expected = make_scorer("toy_saturation")(images).tolist()
    assert [r["scores"]["toy"]["toy_saturation"] for r in rows] == pytest.approx(expected)
    assert report["splits"]["heldout"]["scores"]["toy"]["toy_saturation"] == pytest.approx(sum(expected) / 2)
    assert [r["noise_seed"] for r in rows] == [100_000, 100_001]
