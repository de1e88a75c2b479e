"""Multi-process training on the CPU: ``accelerate launch`` with two processes and the gloo backend.

Every two-process run goes through tests/mp_launch.py, which ends a non-main rank at its first write
under the run's folders (so a passing run proves only the main process wrote there: outputs, metrics,
evaluation, validation, the latent cache, checkpoints, SePPO's on-disk pool and its restore on resume)
and prints each rank's local loss and metrics, so the logged values can be checked against the ranks
they were reduced from.

Why two processes with batch b match one process with batch 2b for DPO and MaPO: the data order of an
epoch comes from (seed, epoch), accelerate gives rank r the r-th batch of b of each 2b, and every
random draw of a pair (timestep, noise, VAE posterior sample, flip) is keyed by (seed, epoch, dataset
index), not by the process; DDP averages the two ranks' mean-over-b gradients into the mean over 2b.
What is left is float32 summation order (batched convolutions over b vs 2b rows, the gloo all-reduce):
measured on the 2-core sandbox, one process with 1 vs 2 threads differs by up to 1e-5 in the LoRA weights
after 3 steps, and 1 vs 2 processes by up to 5e-5 (DPO's beta=5000 multiplies per-sample MSE rounding
into the logits; Adam normalises tiny gradients). A real mismatch is far larger: batch 2 instead of 4,
or the VAE posterior drawn from the global RNG (which every rank seeds alike), moves weights by 4e-3 to
6e-3. The tolerance, 5e-4 on weights and 1e-3 relative on the logged loss, sits between the two.

SePPO, PRDP and DDPO sample online with per-process seeds (a rank's prompts and sampling seeds depend on
its process index, so the ranks see different samples; SePPO's reference, drawn from its pool, is the same
on every rank), so one process with
twice the batch draws other samples: no match is expected. Their tests check that they run, that the
ranks differ, and that the logged metrics are the mean over the ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "tests" / "mp_launch.py"
CPU_CONFIG = ROOT / "configs" / "accelerate" / "cpu.yaml"
FAST = [
    "log.progress_bar=false",
    "log.validation_every_n_steps=0",
    "checkpoint.every_n_steps=0",
    "eval.enabled=false",
    "log.every_n_steps=1",
    "data.random_flip=true",
]
WEIGHT_TOLERANCE = 5e-4
LOSS_RTOL = 1e-3


def _env(guard_dirs) -> dict[str, str]:
    return os.environ | {"DIFFALIGN_GUARD_DIRS": os.pathsep.join(str(d) for d in guard_dirs),
                         "DIFFALIGN_TRACE_LOSS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                         "TRANSFORMERS_OFFLINE": "1"}


def _launch(
    launch_args: list[str], config: str, out: Path, overrides: list[str], guard_dirs=()
) -> list[dict]:
    """Run the trainer under ``accelerate launch``; return the ranks' loss traces (in call order)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, str(LAUNCHER), "train",
               str(ROOT / "configs" / config), f"train.output_dir={out}", *FAST, *overrides]
    result = subprocess.run(command, cwd=ROOT, env=_env([out, *guard_dirs]), capture_output=True, text=True,
                            timeout=300)
    log = result.stdout + result.stderr
    assert "GUARD:" not in log, log[-6000:]
    assert result.returncode == 0, log[-6000:]
    return [json.loads(line.split("TRACE ", 1)[1]) for line in log.splitlines() if line.startswith("TRACE ")]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_reduced(out: Path, traces: list[dict], steps: int) -> dict[int, list[dict]]:
    """Each step's logged loss and method metrics are the means of the two ranks' local values."""
    ranks: dict[int, list[dict]] = {}
    for t in traces:
        ranks.setdefault(t.pop("rank"), []).append(t)
    assert sorted(ranks) == [0, 1] and all(len(v) == steps for v in ranks.values()), ranks
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m, local_0, local_1 in zip(metrics, ranks[0], ranks[1], strict=True):
        assert local_0.keys() == local_1.keys() and "loss" in local_0
        for key in local_0:
            assert m[key] == pytest.approx((local_0[key] + local_1[key]) / 2, rel=1e-5, abs=1e-9), key
    return ranks


def _lora(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "pytorch_lora_weights.safetensors"))


# ----------------------------------------------------------------------------------------------------
# The launcher's write guard and the launch checks (fast)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("write", ["open(root / 'f.txt', 'a').write('x')",
                                   "save_file({'a': torch.zeros(1)}, str(root / 'w.safetensors'))",
                                   "os.replace(outside / 'x', root / 'x')"])
def test_write_guard_stops_a_non_main_rank(tmp_path, write):
    """The guard the multi-process tests rely on: a non-main rank that writes under a guarded folder
    exits with code 86; reading there, and writing elsewhere, is fine."""
    root, outside = tmp_path / "guarded", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "in.txt").write_text("read me")
    (outside / "x").write_text("x")
    script = (
        f"import os, sys, torch; from pathlib import Path; sys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom "
        f"safetensors.torch import save_file; import mp_launch\nroot, outside = Path({str(root)!r}), "
        f"Path({str(outside)!r})\nmp_launch.install_write_guard([root])\nassert (root / "
        "'in.txt').read_text() == 'read me'\n(outside / 'y.txt').write_text('fine'); save_file({'a': "
        f"torch.zeros(1)}}, str(outside / 'ok.safetensors'))\nprint('READY', flush=True)\n{write}\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=os.environ | {"RANK": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "READY" in result.stdout, result.stderr[-3000:]
    assert result.returncode == 86, result.stderr[-3000:]
    assert "GUARD: rank 1" in result.stderr


def test_unsupported_distributed_setups_are_refused_clearly(monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from diffalign.config import load_config
    from diffalign.distributed import check_distributed, check_launch
    from diffalign.methods import METHODS

    with pytest.raises(NotImplementedError, match="FSDP version 1 is not supported"):  # FSDP2: test_fsdp.py
        check_distributed(DistributedType.FSDP, None, METHODS["dpo"], fsdp_version=1)
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        check_distributed(DistributedType.DEEPSPEED, 3, METHODS["mapo"])
    for online in ("prdp", "ddpo"):
        with pytest.raises(NotImplementedError, match=f"{online} with DeepSpeed"):
            check_distributed(DistributedType.DEEPSPEED, 2, METHODS[online])
    for name in ("dpo", "mapo", "seppo"):  # ZeRO-2 keeps parameters whole: supported
        check_distributed(DistributedType.DEEPSPEED, 2, METHODS[name])
    for name in METHODS:
        check_distributed(DistributedType.MULTI_GPU, None, METHODS[name])
        check_distributed(DistributedType.MULTI_CPU, None, METHODS[name])

    # launched as two processes, but accelerate set up one (GPU requested on a machine without one)
    cfg = load_config(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml")
    accelerator = Accelerator(cpu=True)
    check_launch(accelerator, cfg, METHODS["dpo"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="launched as 2 processes"):
        check_launch(accelerator, cfg, METHODS["dpo"])


# ----------------------------------------------------------------------------------------------------
# Two processes with batch b == one process with batch 2b (DPO, MaPO)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "mapo"])
def test_two_processes_with_batch_b_match_one_with_2b(method, tmp_path, tiny_sdxl_path):
    from diffalign.config import load_config
    from diffalign.train import train

    common = ["train.max_steps=3", "optim.lr_warmup_steps=0", "data.max_pairs=8", *FAST]
    if method == "dpo":  # the main process also evaluates (images, scores) and validates
        extra = [
            "eval.enabled=true",
            "eval.prompts=[a red circle on a blue background]",
            "eval.seeds=[0]",
            "eval.num_steps=2",
            "eval.train_pairs=4",
            "eval.train_pair_draws=1",
            "log.validation_every_n_steps=3",
            "log.validation_prompts=[a red circle]",
            "checkpoint.every_n_steps=3",
        ]
    else:  # the main process builds the latent cache, the other waits and reads it
        extra = ["data.cache=true", "data.random_flip=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    cache_one, cache_two = tmp_path / "cache-one", tmp_path / "cache-two"

    # the reference run without the evaluation (which draws nothing from the training streams)
    reference = extra if method == "mapo" else []
    train(
        load_config(
            ROOT / "configs" / "tiny-sdxl" / f"{method}.yaml",
            [
                f"train.output_dir={one}",
                *common,
                "train.batch_size=4",
                *reference,
                f"data.cache_dir={cache_one}",
            ],
        )
    )
    traces = _launch(
        ["--config_file", str(CPU_CONFIG)],
        f"tiny-sdxl/{method}.yaml",
        two,
        [*common, "train.batch_size=2", *extra, f"data.cache_dir={cache_two}"],
        guard_dirs=[cache_two],
    )

    _check_reduced(two, traces, steps=3)
    for m1, m2 in zip(_metrics(one), _metrics(two), strict=True):
        assert m2["loss"] == pytest.approx(m1["loss"], rel=LOSS_RTOL)
        assert m2["loss_w"] == pytest.approx(m1["loss_w"], rel=1e-4)  # the winners' MSE, before beta
    w1, w2 = _lora(one), _lora(two)
    assert w1.keys() == w2.keys()
    moved = max(
        w.abs().max().item() for k, w in w1.items() if "lora_B" in k or "lora.up" in k
    )  # B starts at 0
    assert moved > 4 * WEIGHT_TOLERANCE  # training moved the weights well past the tolerance
    difference = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert difference < WEIGHT_TOLERANCE, f"1 vs 2 processes: max weight difference {difference:.3g}"

    for name in ("config.yaml", "README.md", "metrics.jsonl"):
        assert (two / name).is_file()
    if method == "dpo":
        assert json.loads((two / "eval" / "scores.json").read_text())["scorers"]
        assert (two / "validation" / "step-000003.png").is_file()
        assert (two / "checkpoints" / "checkpoint-3").is_dir()
    else:
        assert len(list(cache_two.glob("*.safetensors"))) == 1


# ----------------------------------------------------------------------------------------------------
# Online methods: they run, ranks sample differently, metrics are reduced
# ----------------------------------------------------------------------------------------------------
ONLINE = {
    # a full fine-tune: SePPO's pool is then written to disk (by the main process only), one file dropped
    "seppo": [
        "model.finetune=full",
        "optim.learning_rate=1e-4",
        "optim.lr_warmup_steps=0",
        "method.pool_interval=1",
        "method.pool_size=1",
        "method.ref_num_steps=2",
        "train.batch_size=2",
        "data.max_pairs=4",
    ],
    "prdp": [
        "method.num_prompts=1",
        "method.samples_per_prompt=2",
        "method.num_steps=3",
        "method.train_timesteps=2",
        "method.sample_batch_size=2",
    ],
    "ddpo": [
        "method.num_prompts=1",
        "method.samples_per_prompt=2",
        "method.num_steps=3",
        "method.train_timesteps=2",
        "method.sample_batch_size=2",
    ],
    "grpo": [
        "method.num_prompts=1",
        "method.samples_per_prompt=2",
        "method.num_steps=3",
        "method.sample_batch_size=2",
        "method.micro_batch_prompts=1",
    ],
    # reward gradient under DDP: checkpointed steps recomputed in backward, one backward per step
    "draft_k": ["method.num_steps=3", "train.batch_size=1"],
    # NFT under DDP on a flow family: the old policy copied in and out of the DDP-wrapped transformer
    "nft": ["method.num_prompts=1", "method.samples_per_prompt=2", "method.num_steps=3",
            "method.gradient_steps_per_epoch=1", "method.train_batch_size=2"],
}
ONLINE_CONFIGS = {"nft": "tiny-sd3/nft.yaml"}  # else tiny-sdxl/METHOD.yaml


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(ONLINE))
def test_online_method_runs_on_two_processes(method, tmp_path, tiny_sdxl_path):
    out = tmp_path / "run"
    # the documented command line, accelerate launch --multi_gpu --num_processes 2 (a free port: tests share
    # the machine)
    launch = ["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
    overrides = [*ONLINE[method]]
    if method == "ddpo" and not torch.accelerator.is_available():
        overrides.append("train.device=null")  # no device named, no GPU: the trainer picks the CPU itself
    # step 1, a checkpoint, then resumed for step 2 (the pool's files restored by the main)
    if method == "seppo":
        traces = _launch(
            launch,
            "tiny-sdxl/seppo.yaml",
            out,
            [*overrides, "train.max_steps=1", "checkpoint.every_n_steps=1"],
        )
        assert (out / "checkpoints" / "checkpoint-1").is_dir()
        resume = ["checkpoint.every_n_steps=1", "--resume", "latest"]
    else:
        traces, resume = [], []
    config = ONLINE_CONFIGS.get(method, f"tiny-sdxl/{method}.yaml")
    traces += _launch(launch, config, out, [*overrides, "train.max_steps=2", *resume])
    ranks = _check_reduced(out, traces, steps=2)
    assert (
        ranks[0] != ranks[1]
    )  # per-process sampling: the ranks trained on different samples (loss or metrics)
    assert (out / "README.md").is_file()
    if method == "seppo":
        assert (out / "unet").is_dir()  # the full fine-tune's pipeline folder
        # pool: the initial model, step 1 (dropped at step 2: pool_size=1) and step 2
        assert sorted(p.name for p in (out / "seppo_pool").iterdir()) == [
            "step-0.safetensors",
            "step-2.safetensors",
        ]
    else:
        assert (out / "pytorch_lora_weights.safetensors").is_file()
