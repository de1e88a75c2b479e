"""FSDP2 on two CPU processes (gloo), and every process stopping together when one fails.

The FSDP runs use configs/accelerate/cpu_fsdp.yaml (FSDP2, transformer and ResNet blocks sharded) through
tests/mp_launch.py, which ends a non-main rank at its first write under the run's folder (so only the main
process wrote outputs and checkpoints) and prints each rank's local loss.

What is compared, and why these tolerances:

* DPO, full fine-tune: 2 FSDP processes with batch b against 1 process with batch 2b. As for DDP
  (tests/test_multiprocess.py), every draw of a pair is keyed by its dataset index, so the runs see the
  same pairs, noise and timesteps; what differs is float32 summation order (batched convolutions over b vs
  2b rows, gloo's reduce-scatter instead of one process's sum). Measured on the 2-core sandbox after 3
  steps at lr 1e-4: 1.9e-5 at most on the weights for FSDP and for DDP alike against one process (5.6e-6
  FSDP against DDP), while the weights moved by 3.0e-4 (Adam moves a weight by about lr per step, so a
  weight whose tiny gradient changes sign moves the most); the bound, 6e-5, is five times below the
  movement and three times above the noise. The FSDP run checkpoints its blocks' activations
  (``model.gradient_checkpointing``, counted on both ranks): recomputing a forward changes nothing.
* PRDP, LoRA: an online method samples per process (each rank's prompts and seeds depend on its index),
  so one process with twice the prompts draws other samples and no match is expected. The same launch
  under DDP draws the same samples: FSDP must train exactly what DDP trains, within the same float32
  tolerance as the DDP test (5e-4 on weights after lr-1e-3 steps).
* Resume: a run killed by SIGTERM after its first step (it saves a checkpoint) and resumed under FSDP ends
  where an uninterrupted FSDP run ends (weights, optimizer state, online epoch, RNG restored), to 1e-6.
* SePPO, LoRA and full fine-tune: its reference is drawn alike on every process and its x_ref sampled with
  per-process seeds, so, as for PRDP, FSDP must train what the same launch under DDP trains. LoRA, 5
  steps at lr 1e-3: measured 4e-6 on the weights (the losses within 2e-4 relative), while leaving out
  the one swap of an older policy into the shards moves them by 8e-4: the bound is 1e-4. Full fine-tune
  at lr 1e-4: 6e-5, as for DPO. The pool is filled every step and capped at 2, so the 4th step's
  reference (drawn from seed 0's stream: steps 0, 1, 0, 2, 4) is a policy two steps old, swapped into
  the shards and out again; a resume from step 3 (in the second epoch of 8 winners, 4 per step)
  crosses into the third and is exact.
"""

from __future__ import annotations

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

from diffalign.methods import METHODS
from diffalign.models import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "tests" / "mp_launch.py"
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "cpu_fsdp.yaml"
DDP_CONFIG = ROOT / "configs" / "accelerate" / "cpu.yaml"
FAST = ["log.progress_bar=false", "log.validation_every_n_steps=0", "checkpoint.every_n_steps=0",
        "eval.enabled=false", "log.every_n_steps=1"]
PRDP = ["method.num_prompts=2", "method.samples_per_prompt=2", "method.num_steps=3",
        "method.train_timesteps=2", "method.sample_batch_size=2", "method.gradient_steps_per_epoch=2",
        "optim.lr_warmup_steps=0"]
LORA = "pytorch_lora_weights.safetensors"
#: gloo's default collective timeout (torch.distributed's default_pg_timeout) is 30 minutes: a run that
#: hangs waits that long; one that stops together ends in the time it takes to start and fail
STOP_WITHIN_S = 150


def _command(config: Path, method_config: str, out: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(LAUNCHER),
            "train", str(ROOT / "configs" / method_config), f"train.output_dir={out}", *FAST, *overrides]


def _env(out: Path, extra: dict | None = None) -> dict:
    return os.environ | {"DIFFALIGN_GUARD_DIRS": str(out), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                         "TRANSFORMERS_OFFLINE": "1", **(extra or {})}


def _launch(config: Path, method_config: str, out: Path, overrides: list[str], env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(config, method_config, out, overrides), cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=_env(out, env))
    log = result.stdout + result.stderr
    assert "GUARD:" not in log, log[-6000:]
    if check:
        assert result.returncode == 0, log[-6000:]
    return result


def _traces(result: subprocess.CompletedProcess) -> dict[int, list[dict]]:
    """Each rank's objective calls (tests/mp_launch.py's ``TRACE`` lines), in order."""
    ranks: dict[int, list[dict]] = {}
    for line in result.stderr.splitlines():
        if line.startswith("TRACE "):
            trace = json.loads(line.split("TRACE ", 1)[1])
            ranks.setdefault(trace.pop("rank"), []).append(trace)
    return ranks


def _lora_runs_agree(full: Path, ddp: Path, resumed: Path, against_ddp: float) -> dict[Path, list[float]]:
    """An FSDP run's LoRA output trained, within ``against_ddp`` of the same launch under DDP and 1e-6 of
    the FSDP run interrupted and resumed; each run's logged losses."""
    w_fsdp, w_ddp, w_resumed = (load_file(str(o / LORA)) for o in (full, ddp, resumed))
    moved = max(w.abs().max().item() for k, w in w_fsdp.items() if "lora_B" in k)  # B starts at 0
    assert moved > 2e-3, moved
    assert _max_difference(w_fsdp, w_ddp) < against_ddp
    assert _max_difference(w_fsdp, w_resumed) < 1e-6
    return {o: [json.loads(line)["loss"] for line in (o / "metrics.jsonl").read_text().splitlines()]
            for o in (full, ddp, resumed)}


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------------------------------
# What is refused, clearly (fast)
# ----------------------------------------------------------------------------------------------------
def test_fsdp2_is_accepted_for_every_method_and_fsdp1_is_refused_clearly():
    from accelerate.utils import DistributedType

    from diffalign.distributed import check_distributed

    for name in METHODS:
        check_distributed(DistributedType.FSDP, None, METHODS[name], fsdp_version=2)
    with pytest.raises(NotImplementedError, match="fsdp_version: 2"):
        check_distributed(DistributedType.FSDP, None, METHODS["dpo"], fsdp_version=1)
    check_distributed(DistributedType.FSDP, None, METHODS["seppo"], fsdp_version=2)
    with pytest.raises(NotImplementedError, match="model.gradient_checkpointing=true") as err:
        check_distributed(DistributedType.FSDP, None, METHODS["prdp"], fsdp_activation_checkpointing=True)
    assert "fsdp_activation_checkpointing" in str(err.value)
    with pytest.raises(NotImplementedError, match="fsdp_offload_params needs GPUs"):
        check_distributed(DistributedType.FSDP, None, METHODS["dpo"], fsdp_offload_on_cpu=True)


def test_together_leaves_one_process_errors_as_they_are():
    from accelerate import Accelerator

    from diffalign.data import DataError
    from diffalign.parallel import together

    accelerator = Accelerator(cpu=True)
    assert together(accelerator, lambda x: x + 1, 1) == 2

    def fail():
        raise DataError("pairs.jsonl line 3: no image")

    with pytest.raises(DataError, match="line 3"):
        together(accelerator, fail)


# ----------------------------------------------------------------------------------------------------
# One process fails: every process stops, soon, with the same line
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method, failure, launch, status", [
    ("dpo", "data", "fsdp", 2),           # the unreadable-row counter raises on rank 1 at its 2nd batch
    ("prdp", "reward", "ddp", 1),         # the scorer raises on rank 1 in the first epoch
    ("prdp", "nan_reward", "fsdp", 1),    # every reward NaN on rank 1: RewardError there only
])
def test_a_failing_process_stops_every_process_with_one_message(method, failure, launch, status, tmp_path):
    pairs = ["train.batch_size=2", "data.max_pairs=8"]
    overrides = ["train.max_steps=3", *(PRDP if method == "prdp" else pairs)]
    start = time.monotonic()
    result = _launch(FSDP_CONFIG if launch == "fsdp" else DDP_CONFIG, f"tiny-sdxl/{method}.yaml",
                     tmp_path / "run", overrides, env={"DIFFALIGN_FAIL": f"1:{failure}:2"}, check=False)
    elapsed = time.monotonic() - start
    log = result.stdout + result.stderr
    lines = [line for line in log.splitlines() if line.startswith("diffalign train: error:")]
    assert len(lines) == 2 and lines[0] == lines[1], log[-6000:]  # one line from each process, the same
    assert "(process 1 of 2; every process stopped)" in lines[0]
    expected = {"data": "injected unreadable data on rank 1",
                "reward": "reward scorer 'brightness' raised OSError: injected scorer failure on rank 1",
                "nan_reward": "rewards are NaN/inf"}[failure]
    assert expected in lines[0]
    assert result.returncode != 0 and f"exitcode: {status}" in log, log[-3000:]
    assert "Connection closed by peer" not in log  # no process was left in a collective
    assert elapsed < STOP_WITHIN_S, f"took {elapsed:.0f} s"


# ----------------------------------------------------------------------------------------------------
# FSDP trains what one process with twice the batch trains (DPO, full fine-tune)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp_dpo_full_finetune_with_checkpointing_matches_one_process_with_twice_the_batch(tmp_path,
                                                                                        tiny_sdxl_path):
    from diffalign.config import load_config
    from diffalign.train import train

    common = ["model.finetune=full", "optim.learning_rate=1e-4", "optim.lr_warmup_steps=0",
              "train.max_steps=3", "data.max_pairs=8", *FAST]
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml",
                      [f"train.output_dir={one}", *common, "train.batch_size=4"]))
    # the FSDP run with diffusers' gradient checkpointing of the sharded blocks: the same weights
    result = _launch(FSDP_CONFIG, "tiny-sdxl/dpo.yaml", two,
                     [*common, "train.batch_size=2", "checkpoint.every_n_steps=3",
                      "model.gradient_checkpointing=true"], env={"DIFFALIGN_COUNT_CHECKPOINTS": "1"})
    assert "FSDP2: the denoiser is sharded over 2 processes" in result.stderr
    assert "and its frozen reference copy too" in result.stderr
    checkpointed = {rank: t[-1]["checkpointed"] for rank, t in _traces(result).items()}
    assert set(checkpointed) == {0, 1} and min(checkpointed.values()) > 0, checkpointed

    name = "unet/diffusion_pytorch_model.safetensors"
    w1, w2 = load_file(str(one / name)), load_file(str(two / name))
    base = load_pipeline(str(tiny_sdxl_path)).unet.state_dict()
    moved = _max_difference(w1, base)
    difference = _max_difference(w1, w2)
    assert moved > 3e-4 * 0.5, moved
    assert difference < 6e-5, f"FSDP x2 vs 1 process x 2b: max weight difference {difference:.3g}"
    for m1, m2 in zip(*(map(json.loads, (o / "metrics.jsonl").read_text().splitlines()) for o in (one, two)),
                      strict=True):
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-3)
    # the checkpoint holds the whole weights in our format, the same as the output
    saved = load_file(str(two / "checkpoints" / "checkpoint-3" / "trainable.safetensors"))
    assert len(saved) == len(w2) and _max_difference(saved, w2) == 0.0
    state = json.loads((two / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["sharded"] is True and state["num_processes"] == 2


# ----------------------------------------------------------------------------------------------------
# PRDP with LoRA under FSDP: the same as DDP, and resumed exactly
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp_prdp_lora_matches_ddp_and_resumes_exactly(tmp_path, tiny_sdxl_path):
    from diffalign.checkpoints import CheckpointError, checkpoint_step, complete_checkpoints
    from diffalign.config import load_config
    from diffalign.train import train

    full, ddp, resumed = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "resumed"
    _launch(FSDP_CONFIG, "tiny-sdxl/prdp.yaml", full, [*PRDP, "train.max_steps=4"])
    _launch(DDP_CONFIG, "tiny-sdxl/prdp.yaml", ddp, [*PRDP, "train.max_steps=4"])
    # killed (SIGTERM to the launcher, as a scheduler preempts) after its first step: every process agrees,
    # a checkpoint is saved, exit 143; then resumed to step 4 under FSDP
    log = tmp_path / "killed.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            _command(FSDP_CONFIG, "tiny-sdxl/prdp.yaml", resumed, [*PRDP, "train.max_steps=4"]),
            cwd=ROOT, env=_env(resumed), stdout=sink, stderr=subprocess.STDOUT)
        metrics = resumed / "metrics.jsonl"
        deadline = time.monotonic() + 400
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=300)
    stderr = log.read_text()
    assert "GUARD:" not in stderr and "SIGTERM received: saved" in stderr, stderr[-4000:]
    saved = complete_checkpoints(resumed / "checkpoints")
    assert len(saved) == 1 and 1 <= checkpoint_step(saved[0]) < 4, stderr[-4000:]
    assert not (resumed / "pytorch_lora_weights.safetensors").exists()
    _launch(FSDP_CONFIG, "tiny-sdxl/prdp.yaml", resumed, [*PRDP, "train.max_steps=4", "--resume", "latest"])

    losses = _lora_runs_agree(full, ddp, resumed, against_ddp=5e-4)
    assert losses[resumed][-2:] == pytest.approx(losses[full][-2:], rel=1e-5)
    w_resumed = load_file(str(resumed / LORA))

    # another process count: refused before anything trains, naming both counts
    with pytest.raises(CheckpointError, match="written by 2 processes; this run has 1"):
        train(load_config(ROOT / "configs" / "tiny-sdxl" / "prdp.yaml",
                          [f"train.output_dir={resumed}", *PRDP, *FAST, "train.max_steps=6",
                           "train.resume=latest"]))
    assert _max_difference(load_file(str(resumed / LORA)), w_resumed) == 0.0  # nothing was overwritten


# ----------------------------------------------------------------------------------------------------
# Every method FSDP supports trains under it, LoRA and full fine-tune
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method, finetune, precision", [("dpo", "lora", "no"), ("mapo", "full", "bf16"),
                                                         ("prdp", "full", "no"), ("ddpo", "lora", "no")])
def test_every_method_trains_under_fsdp(method, finetune, precision, tmp_path, tiny_sdxl_path):
    """Under bf16 mixed precision (FSDP2's MixedPrecisionPolicy) the trained weights stay fp32 masters, and
    the output holds them, not the bf16 copies a forward gathers. (The online methods are not run in bf16:
    on the CPU their sampled bf16 latents reach the fp32 VAE and fail on one process too, FSDP or not.)"""
    out = tmp_path / "run"
    overrides = ["train.max_steps=2", f"model.finetune={finetune}", "optim.lr_warmup_steps=0",
                 f"train.mixed_precision={precision}"]
    overrides += PRDP if method in ("prdp", "ddpo") else ["train.batch_size=2", "data.max_pairs=8"]
    if finetune == "full":
        overrides.append("optim.learning_rate=1e-4")
    if method == "dpo":  # the main process evaluates before and after, and validates, while the others wait
        overrides += ["eval.enabled=true", "eval.prompts=[a red circle on a blue background]",
                      "eval.seeds=[0]", "eval.num_steps=2", "eval.train_pairs=4", "eval.train_pair_draws=1",
                      "log.validation_every_n_steps=2", "log.validation_prompts=[a red circle]"]
    result = _launch(FSDP_CONFIG, f"tiny-sdxl/{method}.yaml", out, overrides)
    assert "FSDP2: the denoiser is sharded over 2 processes" in result.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] == m["loss"] for m in metrics)  # not NaN
    if finetune == "lora":
        weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
        assert max(w.abs().max().item() for k, w in weights.items() if "lora_B" in k) > 0  # trained
    else:
        weights = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}
    if method == "dpo":
        assert json.loads((out / "eval" / "scores.json").read_text())["scorers"]
        assert (out / "validation" / "step-000002.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method_config, blocks", [("tiny-sdxl/draft_k.yaml", None),
                                                   ("tiny-sd3/nft.yaml", "JointTransformerBlock")])
def test_reward_gradient_and_nft_train_under_fsdp(method_config, blocks, tmp_path):
    """The 2026 methods' own objectives (a checkpointed differentiable chain; NFT's old policy copied in
    and out of the sharded transformer) under FSDP2; SD3's blocks named on the launch's command line, as a
    user of configs/accelerate/fsdp.yaml does for a flow model."""
    out = tmp_path / "run"
    overrides = ["train.max_steps=2", "method.num_steps=3", "optim.lr_warmup_steps=0"]
    if "nft" in method_config:
        overrides += ["method.num_prompts=1", "method.samples_per_prompt=2", "method.train_batch_size=2",
                      "method.gradient_steps_per_epoch=1"]
    command = _command(FSDP_CONFIG, method_config, out, overrides)
    if blocks:  # accelerate's own flag, before the script
        command[5:5] = ["--fsdp_transformer_layer_cls_to_wrap", blocks]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env(out))
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "FSDP2: the denoiser is sharded over 2 processes" in result.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] == m["loss"] for m in metrics)
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert max(w.abs().max().item() for k, w in weights.items() if "lora_B" in k) > 0  # trained


# ----------------------------------------------------------------------------------------------------
# SePPO under FSDP: the same as DDP, its pool whole in checkpoints, resumed exactly
# ----------------------------------------------------------------------------------------------------
SEPPO = ["train.batch_size=2", "data.max_pairs=8", "method.pool_interval=1", "method.pool_size=2",
         "method.ref_num_steps=2", "optim.lr_warmup_steps=0"]
TRACE = {"DIFFALIGN_TRACE_LOSS": "1"}


def _references(result: subprocess.CompletedProcess, steps: int) -> list[float]:
    """The reference step each call drew, checked to be the same on both ranks."""
    ranks = _traces(result)
    drawn = [[t["reference_step"] for t in ranks[r]] for r in (0, 1)]
    assert len(drawn[0]) == steps and drawn[0] == drawn[1], drawn
    return drawn[0]


@pytest.mark.slow
def test_fsdp_seppo_lora_matches_ddp_and_resumes_exactly_with_its_pool(tmp_path, tiny_sdxl_path):
    from diffalign.checkpoints import read_tree

    full, ddp, resumed = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "resumed"
    runs = {out: _launch(config, "tiny-sdxl/seppo.yaml", out, [*SEPPO, "train.max_steps=5"], env=TRACE)
            for out, config in ((full, FSDP_CONFIG), (ddp, DDP_CONFIG))}
    assert "FSDP2: the denoiser is sharded over 2 processes" in runs[full].stderr
    drawn = _references(runs[full], 5)
    assert _references(runs[ddp], 5) == drawn
    # the 4th step's reference is an older policy than the current one (a real swap), the 5th the newest
    assert drawn[3] == 2 and drawn[4] == 4, drawn
    _launch(FSDP_CONFIG, "tiny-sdxl/seppo.yaml", resumed,
            [*SEPPO, "train.max_steps=3", "checkpoint.every_n_steps=3"])
    after = _launch(FSDP_CONFIG, "tiny-sdxl/seppo.yaml", resumed,
                    [*SEPPO, "train.max_steps=5", "--resume", "latest"], env=TRACE)
    assert _references(after, 2) == drawn[3:]

    losses = _lora_runs_agree(full, ddp, resumed, against_ddp=1e-4)
    assert losses[full] == pytest.approx(losses[ddp], rel=1e-3)
    assert losses[full][3] != pytest.approx(0.6931, abs=1e-3)  # ln 2: the reference was not the policy
    assert losses[resumed][-2:] == pytest.approx(losses[full][-2:], rel=1e-5)

    # the checkpoint's pool: whole LoRA tensors, the same on both ranks; the newest entry is the policy
    checkpoint = resumed / "checkpoints" / "checkpoint-3"
    trained = load_file(str(checkpoint / "trainable.safetensors"))
    pools = [read_tree(checkpoint, f"rank-{r}")["objective"]["pool"]["entries"] for r in (0, 1)]
    assert [e["step"] for e in pools[0]] == [0, 2, 3] and pools[0][0]["lora"] is None
    for mine, theirs in zip(pools[0][1:], pools[1][1:], strict=True):
        assert _max_difference(mine["lora"], theirs["lora"]) == 0.0
        assert {k: v.shape for k, v in mine["lora"].items()} == {k: v.shape for k, v in trained.items()}
    assert _max_difference(pools[0][-1]["lora"], trained) == 0.0


@pytest.mark.slow
def test_fsdp_seppo_full_finetune_matches_ddp_through_a_resume(tmp_path, tiny_sdxl_path):
    """The pool's files are the whole denoiser, gathered by the main process alone (the guard would end a
    rank writing them), and a reference is loaded into the sharded frozen copy from them; the FSDP run is
    interrupted after step 3 and resumed, so the 4th step loads the older policy from a restored file."""
    full = [*SEPPO, "model.finetune=full", "optim.learning_rate=1e-4"]
    ddp, resumed = tmp_path / "ddp", tmp_path / "resumed"
    drawn = _references(_launch(DDP_CONFIG, "tiny-sdxl/seppo.yaml", ddp, [*full, "train.max_steps=4"],
                                env=TRACE), 4)
    first = _launch(FSDP_CONFIG, "tiny-sdxl/seppo.yaml", resumed,
                    [*full, "train.max_steps=3", "checkpoint.every_n_steps=3"], env=TRACE)
    assert "and its frozen reference copy too" in first.stderr
    after = _launch(FSDP_CONFIG, "tiny-sdxl/seppo.yaml", resumed,
                    [*full, "train.max_steps=4", "--resume", "latest"], env=TRACE)
    assert _references(first, 3) + _references(after, 1) == drawn and drawn[3] == 2

    name = "unet/diffusion_pytorch_model.safetensors"
    w_ddp, w_fsdp = load_file(str(ddp / name)), load_file(str(resumed / name))
    base = load_pipeline(str(tiny_sdxl_path)).unet.state_dict()
    assert _max_difference(w_ddp, base) > 3e-4 * 0.5
    assert _max_difference(w_fsdp, w_ddp) < 6e-5
    pool = sorted(p.name for p in (resumed / "seppo_pool").iterdir())
    assert pool == sorted(p.name for p in (ddp / "seppo_pool").iterdir()) == [
        "step-0.safetensors", "step-3.safetensors", "step-4.safetensors"]
    for step in (0, 4):  # whole files: the base model, and the output's weights
        saved = load_file(str(resumed / "seppo_pool" / f"step-{step}.safetensors"))
        expected = base if step == 0 else w_fsdp
        assert _max_difference(saved, expected) == 0.0
