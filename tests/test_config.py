"""Typed configs: YAML maps one-to-one onto the dataclasses; bad input is rejected with the key path."""

from pathlib import Path

import pytest
import yaml

from diffalign.config import ConfigError, apply_overrides, config_from_dict, load_config
from diffalign.methods.dpo import DPOConfig
from diffalign.methods.mapo import MaPOConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name != "accelerate")


def _minimal(**sections):
    raw = {"model": {"name": "tiny-sdxl"}, "data": {"source": str(ROOT / "data/shapes-pairs")},
           "method": {"name": "dpo"}, "eval": {"prompts": ["a red circle"]}}
    raw.update(sections)
    return raw


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_shipped_configs_parse(path):
    # Real-model configs name hub ids and datasets that are not here: type-check them only.
    runnable_here = {"tiny-sdxl/dpo.yaml", "tiny-sdxl/mapo.yaml", "toy-sdxl/dpo.yaml", "toy-sdxl/mapo.yaml"}
    cfg = load_config(path, check=f"{path.parent.name}/{path.name}" in runnable_here)
    assert cfg.method.name in ("dpo", "mapo") or cfg.method is not None
    assert cfg.to_dict()["method"]["name"] == cfg.method.name


def test_paper_settings():
    dpo = load_config(ROOT / "configs/sdxl/dpo.yaml", check=False)
    assert isinstance(dpo.method, DPOConfig) and dpo.method.beta == 5000
    assert dpo.optim.optimizer == "adafactor" and dpo.model.gradient_checkpointing
    assert dpo.train.batch_size * dpo.train.gradient_accumulation_steps * 16 == 2048  # on 16 GPUs
    mapo = load_config(ROOT / "configs/sdxl/mapo.yaml", check=False)
    assert isinstance(mapo.method, MaPOConfig) and mapo.method.beta == 0.1 and mapo.method.snr_value == 0.5
    assert mapo.optim.lr_scheduler == "cosine"


def test_roundtrip_yaml(tmp_path):
    cfg = load_config(ROOT / "configs/tiny-sdxl/dpo.yaml")
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_overrides_are_typed():
    cfg = load_config(
        ROOT / "configs/tiny-sdxl/dpo.yaml",
        [
            "optim.learning_rate=1e-5",
            "train.max_steps=3",
            "method.loss_type=hinge",
            "lora.target_modules=[to_q,to_v]",
            "optim.max_grad_norm=null",
            "data.random_flip=false",
        ],
    )
    assert cfg.optim.learning_rate == 1e-5 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.train.max_steps == 3 and cfg.method.loss_type == "hinge"
    assert cfg.lora.target_modules == ["to_q", "to_v"] and cfg.optim.max_grad_norm is None
    assert cfg.data.random_flip is False


def test_yaml_1_1_no_is_the_word_a_choice_of_words_means(tmp_path):
    """YAML 1.1 reads `no` as false: `train.mixed_precision=no` (and `mixed_precision: no` in a file) is the
    choice 'no', not a type error; a bool where no word of the choice means it stays an error."""
    cfg = load_config(ROOT / "configs/tiny-sdxl/dpo.yaml", ["train.mixed_precision=no"], check=False)
    assert cfg.train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_minimal(train={"mixed_precision": False})))
    assert load_config(path, check=False).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        load_config(ROOT / "configs/tiny-sdxl/dpo.yaml", ["train.mixed_precision=yes"], check=False)


def test_switching_method_by_override():
    cfg = load_config(ROOT / "configs/tiny-sdxl/mapo.yaml", ["method.beta=0.5"])
    assert isinstance(cfg.method, MaPOConfig) and cfg.method.beta == 0.5


@pytest.mark.parametrize(
    ("raw", "path", "fragment"),
    [
        (_minimal(optim={"learnin_rate": 1e-4}), "optim.learnin_rate", "no such key"),
        (_minimal(bogus={}), "bogus", "no such section"),
        (_minimal(train={"max_steps": "ten"}), "train.max_steps", "an integer"),
        (_minimal(train={"max_steps": 0}), "train.max_steps", ">= 1"),
        (_minimal(train={"max_steps": 1.5}), "train.max_steps", "an integer"),
        (_minimal(train={"mixed_precision": "fp8"}), "train.mixed_precision", "'no', 'fp16', 'bf16'"),
        (_minimal(data={"source": "x", "resolution": 30}), "data.resolution", "multiple of 8"),
        (
            _minimal(data={"source": str(ROOT), "proportion_empty_prompts": 1.5}),
            "data.proportion_empty_prompts",
            "[0, 1]",
        ),
        (_minimal(data={"source": str(ROOT), "cache": True}), "data.random_flip", "false when data.cache"),
        (_minimal(method={"name": "dop"}), "method.name", "'dpo'"),
        (_minimal(method={"name": "mapo", "loss_type": "sigmoid"}), "method.loss_type", "no such key"),
        (_minimal(method={"name": "dpo", "beta": -1}), "method.beta", "> 0"),
        (_minimal(method={"name": "dpo", "loss_type": "logistic"}), "method.loss_type", "'sigmoid'"),
        (_minimal(model={"name": "./no/such/folder"}), "model.name", "exists"),
        (_minimal(model={"name": "tiny-sdxl", "finetune": "qlora"}), "model.finetune", "'lora', 'full'"),
        (_minimal(lora={"rank": 0}), "lora.rank", ">= 1"),
        (_minimal(lora={"target_modules": "to_q"}), None, None),  # a single string becomes a list
        (_minimal(log={"report_to": ["mlflow"]}), "log.report_to[0]", "'tensorboard' or 'wandb'"),
        (
            _minimal(eval={"scorers": ["no_such_scorer"], "prompts": ["p"]}),
            "eval.scorers[0]",
            "unknown scorer",
        ),
        (_minimal(train={"resume": "/no/such/checkpoint"}), "train.resume", "'latest'"),
        (_minimal(optim={"optimizer": "sgd"}), "optim.optimizer", "'adamw'"),
        (_minimal(optim={"learning_rate": True}), "optim.learning_rate", "a number"),
    ],
)
def test_bad_values_name_key_value_and_expectation(raw, path, fragment):
    if path is None:
        config_from_dict(raw)
        return
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    message = str(info.value)
    assert info.value.path == path and repr(path) in message
    assert fragment in message


def test_bad_overrides():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["train.max_steps"])
    with pytest.raises(ConfigError, match="section"):
        apply_overrides({"train": 3}, ["train.max_steps=3"])
    with pytest.raises(ConfigError, match="train.max_stepz"):
        load_config(ROOT / "configs/tiny-sdxl/dpo.yaml", ["train.max_stepz=3"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_cli_rejects_bad_config_before_loading_a_model(tmp_path, capsys):
    from diffalign.cli import main

    code = main(["train", str(ROOT / "configs/tiny-sdxl/dpo.yaml"), "optim.lr=3"])
    assert code == 2
    assert "optim.lr" in capsys.readouterr().err


def test_eval_scorers_accept_specs_and_reject_unknown_names():
    from pathlib import Path

    from diffalign.config import ConfigError, load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "tiny-sdxl" / "dpo.yaml"
    cfg = load_config(path, ["eval.scorers=[brightness, '2*brightness+jpeg_compressibility:quality=90']"])
    assert cfg.eval.scorers[1] == "2*brightness+jpeg_compressibility:quality=90"
    with pytest.raises(ConfigError, match=r"eval.scorers\[0\].*unknown scorer 'nope'"):
        load_config(path, ["eval.scorers=[nope]"])


# ----------------------------------------------------------------------------------------------------
# Shipped configs: layout, trackers, relative paths
# ----------------------------------------------------------------------------------------------------
def test_configs_are_grouped_by_model_and_hold_no_data():
    assert not list((ROOT / "configs").glob("*.yaml")), "configs live in configs/<model>/<method>.yaml"
    assert not (ROOT / "configs" / "data").exists()
    for path in CONFIGS:
        cfg = load_config(path, check=False)
        # <method>.yaml or <method>-<variant>.yaml (grpo-fast; toy-sdxl/dpo-geneval: the README main job)
        assert path.stem == cfg.method.name or path.stem.startswith(f"{cfg.method.name}-"), path
        assert "REFERENCE.md" not in path.read_text(), f"{path} cites a file that is not in the project"


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_shipped_configs_report_only_to_installed_trackers(path):
    import importlib.util

    for tracker in load_config(path, check=False).log.report_to:
        assert importlib.util.find_spec(tracker) is not None, (
            f"{path}: log.report_to names {tracker}, not installed"
        )


def test_relative_paths_in_a_config_resolve_against_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anywhere but the repository
    cfg = load_config(ROOT / "configs" / "toy-sdxl" / "dpo.yaml")
    assert Path(cfg.data.source) == ROOT / "data" / "toy-pairs"
    prdp = load_config(ROOT / "configs" / "tiny-sdxl" / "prdp.yaml")
    assert Path(prdp.method.prompts) == ROOT / "data" / "tiny-prompts.txt"
    # an override is the user's own: relative to the current folder
    (tmp_path / "mine.txt").write_text("a red circle\n")
    assert (
        load_config(ROOT / "configs" / "tiny-sdxl" / "prdp.yaml", ["method.prompts=mine.txt"]).method.prompts
        == "mine.txt"
    )
    # a hub id or built-in id stays as written
    assert cfg.model.name == "toy-sdxl"


def test_a_missing_local_pairs_folder_is_not_a_hub_failure(tmp_path, monkeypatch, capsys):
    from diffalign.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    code = main(["train", str(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml"), "data.source=data/missing-pairs",
                 f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "folder data has no 'missing-pairs'" in err and "hub" not in err


def test_a_renamed_sampling_key_names_its_new_name(tmp_path):
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "tiny-sdxl" / "dpo.yaml").read_text())
    raw["eval"]["num_inference_steps"] = raw["eval"].pop("num_steps")
    raw["data"]["source"] = str(ROOT / "data" / "shapes-pairs")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"eval\.num_inference_steps.*eval\.num_steps \(renamed"):
        load_config(path)
