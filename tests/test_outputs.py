"""What a run hands over is what it trained: LoRA files that stock diffusers loads completely (every family,
every target set), the tuned evaluation sampled from what a user loads, files with the user's umask, and
what ``--resume`` does with a finished run or a config without checkpoints."""

import contextlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers.lora_loading import load_messages, lost_keys
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file

from diffalign.config import LoraConfig as LoraSettings
from diffalign.config import load_config
from diffalign.evaluation import generate_and_score
from diffalign.export import save_lora
from diffalign.families import family_of
from diffalign.models import BUILTIN_MODELS, LORA_WEIGHTS_FILE
from diffalign.sampler import sample
from diffalign.train import lora_config, train

ROOT = Path(__file__).resolve().parents[1]

FAMILIES = ["tiny-sd", "tiny-sdxl", "tiny-animatediff", "tiny-wan"]
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# attention + the transformer blocks' projections and MLP (UNets: proj_in/proj_out, ff; Wan: ffn)
MIXED = [*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "ffn.net.0.proj", "ffn.net.2"]


def stock_pipeline(model: str):
    """The built-in model loaded as a user loads a diffusers folder."""
    return DiffusionPipeline.from_pretrained(str(BUILTIN_MODELS[model]()))


def denoiser(pipe):
    return getattr(pipe, family_of(pipe).denoiser_attr)


def all_linear(module: torch.nn.Module) -> list[str]:
    return sorted(name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear))


def assert_all_bound(messages: list[str]) -> None:
    lost = lost_keys(messages)
    assert not lost, f"the loader dropped adapter keys: {lost[0][:300]}"


def images(pipe, seed: int = 0) -> torch.Tensor:
    frames = {"num_frames": 5} if family_of(pipe).video else {}  # Wan takes 4k+1 frames
    return sample(pipe, ["a red circle on a blue background"], seeds=[seed], num_steps=2, guidance_scale=3.0,
                  height=32, width=32, **frames).images


@pytest.mark.parametrize("targets", ["attention", "mixed", "all-linear"])
@pytest.mark.parametrize("model", FAMILIES)
def test_exported_lora_loads_completely_in_the_stock_pipeline(model, targets, tmp_path):
    """Every family and target set: the exported file binds every tensor in a stock ``load_lora_weights``
    (no PEFT / diffusers "missing" or "inconsistent" message), bit for bit, and changes the samples."""
    trained_pipe = stock_pipeline(model)
    net = denoiser(trained_pipe)
    modules = {"attention": ATTENTION, "mixed": MIXED, "all-linear": None}[targets] or all_linear(net)
    torch.manual_seed(0)
    net.add_adapter(lora_config(net, LoraSettings(rank=4, alpha=4, init="gaussian", target_modules=modules)))
    with torch.no_grad():  # B starts at zero: give the adapters an effect
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    trained = get_peft_model_state_dict(net)
    save_lora(trained_pipe, net, tmp_path)
    assert len(load_file(str(tmp_path / LORA_WEIGHTS_FILE))) == len(trained)

    user_pipe = stock_pipeline(model)
    base = images(user_pipe)
    with load_messages() as messages:
        user_pipe.load_lora_weights(tmp_path)
    assert_all_bound(messages)
    loaded = get_peft_model_state_dict(denoiser(user_pipe), adapter_name="default_0")
    assert loaded.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(loaded[key], value), key
    tuned = images(user_pipe)
    assert torch.allclose(tuned, images(trained_pipe), atol=1e-5)
    assert (tuned - base).abs().max() > 1e-2, "the loaded LoRA does not change the samples"


# ----------------------------------------------------------------------------------------------------
# End to end: the trainer's tuned evaluation is what a user loads
# ----------------------------------------------------------------------------------------------------
E2E = {  # family -> (config, overrides)
    "sd": ("tiny-sdxl/dpo.yaml", ["model.name=tiny-sd"]),
    "sdxl": ("tiny-sdxl/dpo.yaml", []),
    "animatediff": ("tiny-animatediff/dpo.yaml", []),
    "wan": ("tiny-wan/dpo.yaml", []),
}


def read_sample(path: Path) -> np.ndarray:
    """A PNG, or every frame of an animated WebP, as float [0, 1]."""
    with Image.open(path) as image:
        frames = []
        for i in range(getattr(image, "n_frames", 1)):
            image.seek(i)
            frames.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)
    return np.stack(frames)


def as_saved(media: torch.Tensor) -> np.ndarray:
    """A sample [3, H, W] or [F, 3, H, W] as [F, H, W, 3] rounded to 8 bits, as the trainer saved it."""
    media = media if media.ndim == 4 else media[None]
    return (media.permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round() / 255


@pytest.mark.slow
@pytest.mark.parametrize("family", list(E2E))
def test_stock_loaded_run_samples_what_the_trainer_evaluated(family, tmp_path):
    """Train LoRA on attention + projections + MLP, load the run with stock diffusers, sample the first
    evaluation prompt with the evaluation's settings: the trainer's own ``eval/tuned`` sample, to 8-bit
    rounding; and the tuned model is not the base one."""
    config, extra = E2E[family]
    out = tmp_path / "run"
    cfg = load_config(
        ROOT / "configs" / config,
        [
            f"train.output_dir={out}",
            "train.max_steps=3",
            "optim.learning_rate=2e-2",
            "optim.lr_warmup_steps=0",
            f"lora.target_modules=[{','.join(MIXED)}]",
            "log.validation_every_n_steps=0",
            "log.progress_bar=false",
            "checkpoint.every_n_steps=0",
            "eval.seeds=[0]",
            "eval.train_pairs=0",
            *extra,
        ],
    )
    cfg.eval.prompts = cfg.eval.prompts[:1]
    train(cfg)

    user_pipe = stock_pipeline(cfg.model.name)
    with load_messages() as messages:
        user_pipe.load_lora_weights(out)
    assert_all_bound(messages)
    user_pipe.set_progress_bar_config(disable=True)
    ours = generate_and_score(user_pipe, cfg.eval.prompts, cfg.eval.seeds, [], cfg.eval, None)["images"][0]
    tuned_file = next((out / "eval" / "tuned").glob("0000.*"))
    saved = read_sample(tuned_file)
    assert np.abs(as_saved(ours) - saved).max() <= 1.5 / 255
    base = read_sample(next((out / "eval" / "base").glob("0000.*")))
    assert np.abs(saved - base).max() > 4 / 255, (
        "training changed nothing visible: the comparison proves nothing"
    )


# ----------------------------------------------------------------------------------------------------
# Files keep the user's umask
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_outputs_keep_the_umask(tmp_path):
    """Under umask 027 every file a run, a tiny model, a scorer model and a trajectory save write is 0640
    and every folder 0750 (safetensors and tempfile would make them 0600 / 0700)."""
    from diffalign.scorers.tiny_models import save_tiny_scorer
    from diffalign.tiny import save_tiny

    with umask(0o027):
        out = tmp_path / "run"
        cfg = load_config(
            ROOT / "configs" / "tiny-sdxl" / "dpo.yaml",
            [
                f"train.output_dir={out}",
                "train.max_steps=2",
                "checkpoint.every_n_steps=1",
                "checkpoint.keep_last=1",
                "eval.enabled=false",
                "log.validation_every_n_steps=0",
                "log.progress_bar=false",
            ],
        )
        train(cfg)
        save_tiny("sdxl", tmp_path / "tiny-sdxl")
        save_tiny_scorer("pickscore", tmp_path / "pickscore")
        pipe = stock_pipeline("tiny-sdxl")
        sample(pipe, ["a red circle"], seeds=[0], num_steps=2).trajectory.save(
            tmp_path / "trajectories.safetensors"
        )
    found = modes(tmp_path)
    assert (
        f"run/{LORA_WEIGHTS_FILE}" in found and "run/checkpoints/checkpoint-2/trainable.safetensors" in found
    )
    assert (
        "tiny-sdxl/unet/diffusion_pytorch_model.safetensors" in found and "trajectories.safetensors" in found
    )
    wrong = {name: oct(mode) for name, mode in found.items()
             if mode != (0o750 if (tmp_path / name).is_dir() else 0o640)}
    assert not wrong, wrong


# ----------------------------------------------------------------------------------------------------
# --resume semantics
# ----------------------------------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "diffalign", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_resume_refuses_a_finished_run_and_says_what_latest_does(tmp_path):
    out = tmp_path / "run"
    common = [
        "train",
        str(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml"),
        f"train.output_dir={out}",
        "train.max_steps=2",
        "eval.enabled=false",
        "log.validation_every_n_steps=0",
        "log.progress_bar=false",
    ]
    # no checkpoint yet, checkpoints disabled: starts from scratch, and says so (with why none will appear)
    first = cli(*common, "checkpoint.every_n_steps=0", "--resume", "latest")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "no complete checkpoint" in first.stderr and "starting from scratch" in first.stderr
    assert "checkpoint.every_n_steps=0" in first.stderr
    weights = (out / LORA_WEIGHTS_FILE).read_bytes()

    # finished, no checkpoint: refused with one line before anything loads, and the run is untouched
    again = cli(*common, "checkpoint.every_n_steps=0", "--resume", "latest")
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "holds a finished run" in again.stderr, again.stderr[
        -2000:
    ]
    assert (out / LORA_WEIGHTS_FILE).read_bytes() == weights

    # a finished run whose last checkpoint is at its end: refused; with train.max_steps raised: continues
    out2 = tmp_path / "run2"
    with_ckpt = [*common[:2], f"train.output_dir={out2}", *common[3:], "checkpoint.every_n_steps=1"]
    assert cli(*with_ckpt).returncode == 0
    done = cli(*with_ckpt, "--resume", "latest")
    assert done.returncode == 2 and "checkpoint-2 is at step 2" in done.stderr, done.stderr[-2000:]
    longer = cli(*with_ckpt, "train.max_steps=3", "--resume", "latest")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert f"resumed from {out2 / 'checkpoints' / 'checkpoint-2'}" in longer.stderr
