"""Checkpoints: exact resume after SIGKILL for every method, atomic saves, keep-last-N, SIGTERM, faults."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.checkpoints import CheckpointError, complete_checkpoints, resolve_resume
from diffalign.config import load_config

ROOT = Path(__file__).resolve().parents[1]
FAULT_RUN = ROOT / "tests" / "helpers" / "fault_run.py"

# 8 steps cross an epoch boundary with every objective's per-item randomness on: the pair and winner sets
# hold 24 rows (6 batches of 4) and draw a flip (the configs' data.random_flip) and a blank caption per item;
# online epochs are K=3 gradient steps, so checkpoints fall mid-epoch; SePPO's pool is filled every 2 steps.
# keep_last=2 rotates checkpoints in both the uninterrupted and the resumed run.
BLANKS = "data.proportion_empty_prompts=0.25"
METHOD_OVERRIDES = {
    "dpo": [BLANKS],
    "mapo": [BLANKS],
    "seppo": ["method.pool_interval=2", BLANKS],
    "prdp": ["method.gradient_steps_per_epoch=3"],
    "ddpo": ["method.gradient_steps_per_epoch=3"],
    # DanceGRPO's per-sample random steps (the steps' RNG), shared group noise and the EMA (its state); the
    # Fast window (drawn per epoch)
    "grpo": ["method.gradient_steps_per_epoch=3", "method.timestep_selection=random",
             "method.timestep_fraction=0.5", "method.shared_group_noise=true", "method.ema=true",
             "method.ema_update_interval=3"],
    "grpo-fast": ["method.gradient_steps_per_epoch=3"],
    # reward-gradient methods draw per step (AlignProp's truncation, DRaFT-LV's re-noising); NFT has epochs
    # of K=3 steps and an old policy that moves at their end
    "alignprop": ["method.truncation_mean=6.0", "method.truncation_std=2.0"],
    "draft_lv": [],
    # ReFL's pretraining images: 6 of them in batches of 2, so its data crosses an epoch every 3 steps
    "refl": ["method.pretrain_loss_weight=0.5", f"method.pretrain_data={ROOT / 'data' / 'shapes-pairs'}",
             "data.max_pairs=6", "data.resolution=32"],
    "nft": ["method.gradient_steps_per_epoch=3"],
}
#: Methods whose tiny config is not tiny-sdxl's (DiffusionNFT needs a flow family).
CONFIG_MODEL = {"nft": "tiny-sd3"}
MAX_STEPS = 8


def overrides(method: str, out: Path, *extra: str) -> list[str]:
    return [f"train.output_dir={out}", f"train.max_steps={MAX_STEPS}", "eval.enabled=false",
            "log.validation_every_n_steps=0", "log.progress_bar=false", "log.every_n_steps=1",
            "checkpoint.every_n_steps=2", "checkpoint.keep_last=2", *METHOD_OVERRIDES[method], *extra]


def command(method: str, out: Path, *extra: str, runner=("-m", "diffalign")) -> list[str]:
    model = CONFIG_MODEL.get(method, "tiny-sdxl")
    return [sys.executable, *runner, "train", str(ROOT / "configs" / model / f"{method}.yaml"),
            *overrides(method, out, *extra)]


def run(cmd: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key] - b[key]).abs().max().item():.3g}"


def wait_for(predicate, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(
                f"the run ended (status {process.returncode}) before the awaited state:\n{err[-3000:]}"
            )
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``uninterrupted(method)``: the final LoRA weights of an uninterrupted 8-step run (run once per
    method)."""
    weights = {}

    def get(method):
        if method not in weights:
            out = tmp_path_factory.mktemp(f"full-{method}")
            full = run(command(method, out))
            assert full.returncode == 0, full.stderr[-3000:]
            weights[method] = lora(out)
        return weights[method]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
def test_sigkill_then_resume_latest_reaches_the_same_weights(method, tmp_path, uninterrupted):
    """Killed with SIGKILL once checkpoint-2 is complete, resumed with --resume latest: bitwise the weights
    of the uninterrupted run at step 8 (optimizer, schedule, RNG, data position and epoch, SePPO pool, online
    epoch), across the epoch boundary after step 6 and the checkpoint rotation."""

    out = tmp_path / "killed"
    process = subprocess.Popen(
        command(method, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wait_for(lambda: any(complete_checkpoints(out / "checkpoints")), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "pytorch_lora_weights.safetensors").exists(), "the run finished before it was killed"
    killed_at = complete_checkpoints(out / "checkpoints")[-1].name

    resumed = run([*command(method, out), "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / killed_at}" in resumed.stderr
    assert_same_weights(uninterrupted(method), lora(out))


@pytest.mark.slow
def test_killed_during_a_save_leaves_the_previous_checkpoint_and_resumes_exactly(tmp_path, uninterrupted):
    out = tmp_path / "run"
    killed = run(
        command("dpo", out, runner=(str(FAULT_RUN),)), env={"DIFFALIGN_TEST_FAULT": '{"kill_during_save": 4}'}
    )
    assert killed.returncode == -signal.SIGKILL
    checkpoints = out / "checkpoints"
    assert (checkpoints / "checkpoint-4.partial").is_dir() and not (checkpoints / "checkpoint-4").exists()
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-2"]
    assert resolve_resume("latest", checkpoints) == checkpoints / "checkpoint-2"

    resumed = run([*command("dpo", out), "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(uninterrupted("dpo"), lora(out))
    assert not (checkpoints / "checkpoint-4.partial").exists()  # the next save of step 4 replaced it
    assert [p.name for p in complete_checkpoints(checkpoints)] == [
        "checkpoint-6",
        "checkpoint-8",
    ]  # keep_last=2


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_stops_cleanly_and_resumes_exactly(tmp_path, uninterrupted):
    out = tmp_path / "run"
    process = subprocess.Popen(
        command("mapo", out, "checkpoint.every_n_steps=0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert "SIGTERM received: saved" in stderr and "--resume latest" in stderr
    saved = complete_checkpoints(out / "checkpoints")
    assert len(saved) == 1 and 2 <= int(saved[0].name.split("-")[1]) < MAX_STEPS
    assert not (out / "pytorch_lora_weights.safetensors").exists()

    resumed = run([*command("mapo", out, "checkpoint.every_n_steps=0"), "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(uninterrupted("mapo"), lora(out))  # checkpoint frequency does not change the weights


# ----------------------------------------------------------------------------------------------------
# In-process: rotation, faults, corrupt checkpoints
# ----------------------------------------------------------------------------------------------------
def train_in_process(tmp_path, *extra, method="dpo", name="run"):
    from diffalign.train import train

    out = tmp_path / name
    cfg = load_config(ROOT / "configs" / "tiny-sdxl" / f"{method}.yaml", overrides(method, out, *extra))
    train(cfg)
    return out


def test_keep_last_rotates_and_every_checkpoint_holds_only_safetensors_and_json(tmp_path):
    out = train_in_process(
        tmp_path, "train.max_steps=4", "checkpoint.every_n_steps=1", "checkpoint.keep_last=2"
    )
    saved = complete_checkpoints(out / "checkpoints")
    assert [p.name for p in saved] == ["checkpoint-3", "checkpoint-4"]
    assert not list((out / "checkpoints").glob("*.partial"))
    for path in saved[-1].rglob("*"):
        if path.is_file():
            assert path.suffix in (".safetensors", ".json"), path
    state = json.loads((saved[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["num_processes"] == 1
    # the diffusers-format LoRA export of a checkpoint loads in a stock pipeline
    from diffalign.models import load_pipeline

    pipe = load_pipeline("tiny-sdxl")
    pipe.load_lora_weights(saved[-1] / "lora")


def test_disk_full_during_a_save_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from diffalign.train import train

    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if "checkpoint-4" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml", overrides("dpo", out))
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    message = str(err.value)
    assert "checkpoint-4" in message and "No space left on device" in message
    assert f"previous checkpoint {out / 'checkpoints' / 'checkpoint-2'} is intact" in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]  # the partial folder is gone
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    train(
        load_config(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml", overrides("dpo", out, "train.resume=latest"))
    )
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_unwritable_checkpoint_folder_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the checkpoint folder should be")
    with pytest.raises(
        CheckpointError, match="could not write checkpoint .*checkpoint-2.*no earlier checkpoint"
    ):
        train_in_process(tmp_path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return train_in_process(tmp_path_factory.mktemp("resume"), "train.max_steps=2")


def _resume_copy(finished_run, tmp_path, damage):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished_run / "checkpoints", out / "checkpoints")
    checkpoint = out / "checkpoints" / "checkpoint-2"
    damage(checkpoint)
    cfg = load_config(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml", overrides("dpo", out, "train.max_steps=3",
                                                                        f"train.resume={checkpoint}"))
    from diffalign.train import train

    return checkpoint, lambda: train(cfg)


@pytest.mark.parametrize(
    "file", ["trainable.safetensors", "optimizer.safetensors", "rank-0.json", "optimizer.json"]
)
def test_a_corrupt_checkpoint_file_is_named_on_resume(finished_run, tmp_path, file):
    def truncate(checkpoint):
        path = checkpoint / file
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])

    checkpoint, resume = _resume_copy(finished_run, tmp_path, truncate)
    with pytest.raises(CheckpointError, match=file.replace(".", r"\.")):
        resume()


def test_a_missing_checkpoint_file_or_marker_is_named_on_resume(finished_run, tmp_path):
    checkpoint, resume = _resume_copy(
        finished_run, tmp_path, lambda c: (c / "trainable.safetensors").unlink()
    )
    with pytest.raises(CheckpointError, match="missing trainable.safetensors"):
        resume()
    with pytest.raises(CheckpointError, match="incomplete or not a diffalign checkpoint"):
        resolve_resume(str(tmp_path), tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_resume_with_different_lora_settings_is_refused(finished_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished_run / "checkpoints", out / "checkpoints")
    with pytest.raises(CheckpointError, match="does not match this model's trainable parameters"):
        train_in_process(tmp_path, "train.max_steps=3", "train.resume=latest", "lora.target_modules=[to_q]",
                         name="copy")


@pytest.mark.slow
def test_seppo_full_finetune_pool_files_travel_with_the_checkpoint_and_resume_exactly(tmp_path):
    """A full fine-tune's pool entries live on disk: the checkpoint keeps them (hard links), so a resume from
    it draws the same references even after the pool folder has moved on."""
    import shutil

    extra = ("model.finetune=full", "train.max_steps=5")
    full = train_in_process(tmp_path, *extra, method="seppo", name="full")
    saved = full / "checkpoints" / "checkpoint-4"
    assert (
        len(list(saved.glob("file*objective-pool-entries-*.safetensors"))) == 3
    )  # initial model, steps 2 and 4
    resumed = tmp_path / "resumed"
    shutil.copytree(saved, resumed / "checkpoints" / "checkpoint-4")
    train_in_process(tmp_path, *extra, "train.resume=latest", method="seppo", name="resumed")
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert_same_weights(load_file(str(full / unet)), load_file(str(resumed / unet)))
