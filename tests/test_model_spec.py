"""One model-spec grammar (ID, FOLDER, FOLDER:lora) for every command, and the errors a new user meets."""

import json
import re
from pathlib import Path

import pytest
import torch

from diffalign.cli import main
from diffalign.config import load_config
from diffalign.gallery.run import parse_model_arg, validate_models
from diffalign.models import load_pipeline, resolve_model
from diffalign.sampler import sample
from diffalign.train import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["log.progress_bar=false", "checkpoint.every_n_steps=2", "eval.enabled=false", "data.max_pairs=2",
        "train.batch_size=2", "train.max_steps=2", "data.resolution=32", "optim.lr_warmup_steps=0",
        "optim.learning_rate=1e-2", "lora.init=default"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_sdxl_path):
    """A 2-step LoRA run on a tiny SDXL folder (its base recorded in config.yaml)."""
    out = tmp_path_factory.mktemp("lora-run")
    train(load_config(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml",
                      [f"train.output_dir={out}", f"model.name={tiny_sdxl_path}", *FAST]))
    return out


def test_a_lora_run_is_a_model_spec_with_its_recorded_base(lora_run, tiny_sdxl_path):
    source = resolve_model(f"{lora_run}:lora")
    assert source.name == str(tiny_sdxl_path) and source.lora == str(lora_run)
    # a checkpoint's LoRA folder finds the run's config.yaml three folders up
    checkpoint = resolve_model(f"{lora_run}/checkpoints/checkpoint-2/lora:lora")
    assert checkpoint.name == str(tiny_sdxl_path)
    # the spec loads the base with the LoRA merged: the same samples as stock load_lora_weights
    merged = load_pipeline(f"{lora_run}:lora")
    stock = load_pipeline(str(tiny_sdxl_path))
    stock.load_lora_weights(str(lora_run))
    base = load_pipeline(str(tiny_sdxl_path))
    args = dict(seeds=[0], num_steps=2, guidance_scale=3.0, eta=1.0, height=32, width=32)
    a, b, c = (sample(p, ["a red circle"], **args).images for p in (merged, stock, base))
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-4)  # the LoRA changed something


def test_a_lora_folder_given_as_a_model_says_how_to_name_it(lora_run, tmp_path, capsys):
    assert main(["sample", "--model", str(lora_run), "--prompt", "x", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"diffalign sample: error: model folder {lora_run} is a LoRA folder: use {lora_run}:lora"
    assert not (tmp_path / "s").exists()


def test_sample_and_gallery_take_the_lora_spec(lora_run, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--model", f"{lora_run}:lora", "--prompt", "a red circle", "--steps", "2",
                 "--height", "32", "--width", "32", "--out", str(out)]) == 0
    assert (out / "00000.png").is_file()
    # the gallery's LoRA gets the run's recorded base, with no --lora-base
    (spec,) = validate_models([parse_model_arg(f"tuned={lora_run}:lora")])
    assert spec.lora and spec.base == resolve_model(f"{lora_run}:lora").name


def test_a_config_can_start_from_a_lora_run(lora_run, tmp_path):
    cfg = load_config(
        ROOT / "configs" / "tiny-sdxl" / "dpo.yaml",
        [
            f"train.output_dir={tmp_path}",
            f"model.name={lora_run}:lora",
            *FAST,
            "train.max_steps=1",
            "checkpoint.every_n_steps=0",
        ],
    )
    assert train(cfg) == tmp_path
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    # its own spec merges the run it started from, then its LoRA
    chained = resolve_model(f"{tmp_path}:lora")
    assert chained.base_loras == (str(lora_run),) and chained.lora == str(tmp_path)
    assert type(load_pipeline(chained)).__name__ == "StableDiffusionXLPipeline"


def test_the_model_card_loads_as_written(lora_run):
    card = (lora_run / "README.md").read_text()
    assert "BASE" not in card and "THIS_FOLDER" not in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the card's own snippet, as a user would paste it
    assert type(namespace["pipe"]).__name__ == "StableDiffusionXLPipeline"
    assert f"--model {lora_run}:lora" in card


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "unet", "holds one component (UNet2DConditionModel), not a diffusers pipeline"),
    (lambda p: p / "text_encoder", "holds one component"),
])
def test_a_component_folder_is_not_a_pipeline(make, message, tiny_sdxl_path, tmp_path, capsys):
    assert (
        main(["sample", "--model", str(make(tiny_sdxl_path)), "--prompt", "x", "--out", str(tmp_path / "s")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_a_scorer_folder_is_not_a_pipeline(tmp_path, capsys):
    assert main(["tiny", "pickscore", str(tmp_path / "pick")]) == 0
    capsys.readouterr()
    assert (
        main(["sample", "--model", str(tmp_path / "pick"), "--prompt", "x", "--out", str(tmp_path / "s")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a transformers model" in err and "--scorer NAME:model=" in err


def test_an_offline_hub_id_is_one_line_with_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(
        ["sample", "--model", "nobody-here/no-such-model", "--prompt", "x", "--out", str(tmp_path / "s")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "could not load 'nobody-here/no-such-model'" in err
    assert "stacktrace" not in err


def test_train_reports_a_model_that_does_not_load_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["train", str(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml"), f"train.output_dir={tmp_path}",
                 "model.name=nobody-here/no-such-model"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and "could not load 'nobody-here/no-such-model'" in err


@pytest.mark.parametrize("command", [
    ["sample", "--model", "tiny-sdxl", "--prompt", "x", "--num-frames", "4"],
    ["pairs", "--model", "tiny-sdxl", "--prompts", "smoke", "--scorer", "brightness", "--num-frames", "4"],
    ["gallery", "--model", "a=tiny-sdxl", "--prompts", "smoke", "--num-frames", "4"],
])
def test_num_frames_on_an_image_model_is_refused_up_front(command, tmp_path, capsys):
    assert main([*command, "--out", str(tmp_path / "o")]) == 2
    assert "is for video pipelines; tiny-sdxl is an image model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_num_frames_on_an_image_model_is_a_config_error(tmp_path, capsys):
    code = main(["train", str(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml"), f"train.output_dir={tmp_path}",
                 "eval.num_frames=4"])
    assert code == 2 and "eval.num_frames" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["sample", "--model", "toy-sdxl", "--prompt", "a red circle on a white background"],
    ["pairs", "--model", "toy-sdxl", "--prompts", "smoke"],
    ["gallery", "--model", "a=toy-sdxl", "--prompts", "smoke"],
])
def test_toy_faithfulness_refuses_other_captions_before_loading(command, tmp_path, capsys):
    assert main([*command, "--scorer", "toy_faithfulness", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "scorer 'toy_faithfulness': not a toy caption" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_hpsv2_version_with_a_checkpoint_file_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / "hps.pt"
    checkpoint.write_bytes(b"")
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(images / "a.png")
    assert main(["score", "--scorer", f"hpsv2:model={checkpoint},version=v2.1", "--images", str(images)]) == 2
    assert "version=v2.1 picks" in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    for command in ("sample", "gallery", "pairs"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "(default: 0)" in text, command  # --seed
        assert "model's own" in text, command  # --steps / --guidance: the model's defaults, else a fixed one


def test_toy_prompt_set_is_built_in(tmp_path):
    from diffalign.prompt_sets import load_prompts
    from diffalign.toy.data import parse_caption

    prompts = load_prompts("toy")
    assert len(prompts) == 8 and all(parse_caption(p) for p in prompts)
    assert json.dumps(prompts)  # plain strings
