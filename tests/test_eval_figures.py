"""The trainer's readable evaluation outputs: the labelled before/after grid, the held-out curve over
training steps and the base-vs-tuned gallery page, each drawn from the evaluations that really ran."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.config import load_config
from diffalign.figures import RIGHT, WRONG, before_after_grid, score_curve

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ["a large red circle in the center on a white background",
           "two small purple squares on a white background",
           "a small red triangle on the left on a grey background"]


def _has_ink(image: np.ndarray, colour) -> bool:
    return bool((np.abs(image.astype(int) - np.array(colour)).sum(-1) < 60).any())


def test_grid_draws_each_image_enlarged_with_its_ticks_and_crosses(tmp_path):
    images = {"base": torch.rand(3, 3, 32, 32), "tuned": torch.rand(3, 3, 32, 32)}
    checks = {"base": [{"color": 1.0, "shape": 1.0}] * 3, "tuned": [{"color": 0.0, "shape": 1.0}] * 3}
    path = before_after_grid(images, HELDOUT, tmp_path / "grid.png", checks=checks, tile=64, columns=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape[1] == 2 * (64 + 6) + 6  # two columns of 64-pixel tiles
    # the first cell's base tile is the base image, enlarged 2x without smoothing
    top = next(y for y in range(grid.shape[0]) if (grid[y, 6:70] != 255).any(axis=-1).sum() > 60)
    tile = grid[top : top + 64, 6:70]
    expected = np.asarray(Image.fromarray((images["base"][0].permute(1, 2, 0).numpy() * 255).round()
                                          .astype(np.uint8)).resize((64, 64), Image.NEAREST))
    assert np.array_equal(tile, expected)
    below_base = grid[top + 64 : top + 64 + 20, 6:70]
    assert _has_ink(below_base, RIGHT) and not _has_ink(below_base, WRONG)  # base: every check right
    assert _has_ink(grid, WRONG)  # tuned: a colour cross somewhere
    with pytest.raises(ValueError, match="every model needs 3 images"):
        before_after_grid({"base": images["base"][:2]}, HELDOUT, tmp_path / "bad.png")


def test_curve_needs_scores_and_writes_a_figure(tmp_path):
    points = [{"step": s, "scores": {"toy_geneval": v}, "checks": {"toy_geneval": {"color": v}}}
              for s, v in [(0, 0.4), (10, 0.5)]]
    assert Image.open(score_curve(points, tmp_path / "curve.png")).size[0] > 400
    with pytest.raises(ValueError, match="no scores"):
        score_curve([], tmp_path / "empty.png")


def test_bad_evaluation_settings_are_refused_naming_the_key():
    from diffalign.config import ConfigError

    config = ROOT / "configs" / "toy-sdxl" / "dpo-geneval.yaml"
    with pytest.raises(ConfigError, match="eval.every_n_steps"):
        load_config(config, ["eval.every_n_steps=-1"])
    with pytest.raises(ConfigError, match="eval.seeds.*noise_per_prompt"):
        load_config(config, ["eval.seeds=[50000]"])


def test_noise_per_prompt_gives_each_caption_the_toy_genevals_noise(tmp_path, one_thread):
    """With ``eval.noise_per_prompt`` the trainer's held-out images are the toy GenEval's (noise seed
    ``s * 100000 + i``), so its accuracy is ``diffalign toy eval``'s on the same captions."""
    from diffalign.evaluation import generate_and_score
    from diffalign.models import load_pipeline
    from diffalign.scorers import make_scorer
    from diffalign.toy.geneval import GenEvalSettings, sample_hits

    cfg = load_config(ROOT / "configs" / "toy-sdxl" / "dpo-geneval.yaml", ["eval.num_steps=4"])
    assert cfg.eval.noise_per_prompt
    pipe = load_pipeline("toy-sdxl")
    pipe.set_progress_bar_config(disable=True)
    result = generate_and_score(pipe, HELDOUT, [1], [make_scorer("toy_geneval")], cfg.eval, tmp_path)
    assert [s for _, s in result["jobs"]] == [100_000, 100_001, 100_002]
    settings = GenEvalSettings(num_steps=4, guidance_scale=cfg.eval.guidance_scale)
    hits, _ = sample_hits(pipe, HELDOUT, [100_000, 100_001, 100_002], settings)
    assert result["checks"]["toy_geneval"] == hits
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [100_000, 100_001, 100_002]


@pytest.mark.slow
def test_main_job_writes_grid_curve_and_gallery_from_its_evaluations(tmp_path, one_thread):
    """The README main job's config, shortened: every curve point is a real held-out evaluation (step 0 =
    the base's, the last = the exported model's, step 1 = what checkpoint 1 samples), the grid holds the
    evaluation's own images, and the gallery page compares base and tuned on the held-out prompts."""
    from diffalign.evaluation import generate_and_score
    from diffalign.models import load_pipeline
    from diffalign.scorers import make_scorer
    from diffalign.train import train

    cfg = load_config(ROOT / "configs" / "toy-sdxl" / "dpo-geneval.yaml", [
        f"train.output_dir={tmp_path}", "train.max_steps=2", "data.max_pairs=8", "log.progress_bar=false",
        "optim.learning_rate=1e-2", "optim.lr_warmup_steps=0", "checkpoint.every_n_steps=1",
        f"eval.prompts={json.dumps(HELDOUT)}", "eval.num_steps=6", "eval.every_n_steps=1",
        "eval.train_pairs=0",
    ])
    assert cfg.eval.gallery and cfg.eval.scorers == ["toy_geneval", "toy_saturation"]
    out = train(cfg)
    ev = out / "eval"
    scores = json.loads((ev / "scores.json").read_text())["scorers"]
    points = json.loads((ev / "curve.json").read_text())["points"]
    assert [p["step"] for p in points] == [0, 1, 2]
    for name in ("toy_geneval", "toy_saturation"):
        assert points[0]["scores"][name] == pytest.approx(scores[name]["base_mean"])
        assert points[-1]["scores"][name] == pytest.approx(scores[name]["tuned_mean"])
    assert points[0]["checks"]["toy_geneval"] == scores["toy_geneval"]["checks"]["base"]
    assert set(points[0]["checks"]["toy_geneval"]) == {"color", "shape", "background", "size", "count",
                                                       "position"}
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    at_step_1 = next(m for m in logged if m["step"] == 1 and "heldout/toy_saturation" in m)
    assert at_step_1["heldout/toy_saturation"] == pytest.approx(points[1]["scores"]["toy_saturation"])
    # step 1's point is what the model of step 1 samples
    pipe = load_pipeline(f"{out}/checkpoints/checkpoint-1/lora:lora")
    pipe.set_progress_bar_config(disable=True)
    again = generate_and_score(pipe, HELDOUT, cfg.eval.seeds, [make_scorer("toy_saturation")], cfg.eval, None)
    assert np.mean(again["scores"]["toy_saturation"]) == pytest.approx(
        points[1]["scores"]["toy_saturation"], abs=2e-3)
    assert Image.open(ev / "curve.png").size[0] > 400

    grid = np.asarray(Image.open(ev / "before_after.png"))
    assert grid.shape[1] == 3 * (160 + 6) + 6  # the three held-out captions side by side, 160-pixel tiles
    assert _has_ink(grid, RIGHT) or _has_ink(grid, WRONG)

    summary = json.loads((ev / "gallery" / "summary.json").read_text())
    assert {m: v["images"] for m, v in summary["models"].items()} == {"base": 3, "tuned": 3}
    assert summary["generated"] == {"base": 0, "tuned": 3}  # the base half was sampled before training
    media = ev / "gallery" / "media"
    assert any(np.asarray(Image.open(f)).tolist() != np.asarray(Image.open(media / "tuned" / f.name)).tolist()
               for f in sorted((media / "base").glob("*.png")))
    assert (ev / "gallery" / "index.html").is_file()
