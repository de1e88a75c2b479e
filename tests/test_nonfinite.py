"""NaN/inf losses and gradients: the update is skipped, counted and logged; N in a row stop the run;
no checkpoint ever holds a non-finite weight."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.checkpoints import CheckpointError, complete_checkpoints
from diffalign.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def settings(out: Path, *extra: str) -> list[str]:
    return [
        f"train.output_dir={out}",
        "train.max_steps=4",
        "eval.enabled=false",
        "log.validation_every_n_steps=0",
        "log.progress_bar=false",
        "log.every_n_steps=1",
        "checkpoint.every_n_steps=1",
        "checkpoint.keep_last=null",
        *extra,
    ]


def poison(monkeypatch, objective_class, calls: set[int], kind: str) -> None:
    """Make the objective's result non-finite on the given (1-based) calls: the loss itself, or only the
    gradient (a finite loss whose backward gives NaN)."""
    original = objective_class.__call__
    count = [0]

    def call(self, batch):
        count[0] += 1
        out = original(self, batch)
        if count[0] in calls:
            if kind == "loss":
                out = out._replace(loss=out.loss * torch.tensor(float("nan")))
            else:  # d/dx sqrt(0 * x) = 0 * inf = NaN, while the value stays 0
                param = next(p for p in self.ctx.unet.parameters() if p.requires_grad)
                out = out._replace(loss=out.loss + torch.sqrt(0.0 * param.sum()))
        return out

    monkeypatch.setattr(objective_class, "__call__", call)


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"checkpoint-{step}" / "trainable.safetensors"))


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_nonfinite_step_is_skipped_counted_and_the_run_goes_on(kind, tmp_path, monkeypatch):
    from diffalign.objectives import PairObjective
    from diffalign.train import train

    poison(monkeypatch, PairObjective, {2, 3}, kind)
    out = tmp_path / "run"
    train(load_config(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml", settings(out)))
    assert same(weights(out, 1), weights(out, 3))  # steps 2 and 3 changed nothing
    assert not same(weights(out, 3), weights(out, 4))  # step 4 trained again
    assert [m["nonfinite_skipped"] for m in metrics(out)] == [0, 1, 2, 2]
    assert all(
        torch.isfinite(v).all() for v in load_file(str(out / "pytorch_lora_weights.safetensors")).values()
    )


def test_with_accumulation_one_bad_micro_batch_skips_its_whole_step(tmp_path, monkeypatch):
    from diffalign.objectives import PairObjective
    from diffalign.train import train

    poison(monkeypatch, PairObjective, {3}, "loss")  # micro-batches 3 and 4 make step 2
    out = tmp_path / "run"
    train(
        load_config(
            ROOT / "configs" / "tiny-sdxl" / "dpo.yaml",
            settings(out, "train.max_steps=3", "train.gradient_accumulation_steps=2", "train.batch_size=2"),
        )
    )
    assert same(weights(out, 1), weights(out, 2))
    assert not same(weights(out, 2), weights(out, 3))
    assert metrics(out)[-1]["nonfinite_skipped"] == 1


def test_n_nonfinite_steps_in_a_row_stop_the_run_with_a_clear_message(tmp_path, monkeypatch):
    from diffalign.objectives import PairObjective
    from diffalign.run_state import NonFiniteError
    from diffalign.train import train

    poison(monkeypatch, PairObjective, {2, 3, 4}, "loss")
    out = tmp_path / "run"
    cfg = load_config(
        ROOT / "configs" / "tiny-sdxl" / "dpo.yaml",
        settings(out, "train.max_steps=6", "train.max_nonfinite_steps=3"),
    )
    with pytest.raises(
        NonFiniteError, match=r"stopped at step 4: 3 optimizer steps in a row had a NaN/inf loss"
    ):
        train(cfg)
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    for checkpoint in complete_checkpoints(out / "checkpoints"):
        assert all(torch.isfinite(v).all() for v in weights(out, int(checkpoint.name.split("-")[1])).values())


def test_an_online_method_skips_a_nonfinite_step_too(tmp_path, monkeypatch):
    from diffalign.objectives import OnlineObjective
    from diffalign.train import train

    poison(monkeypatch, OnlineObjective, {2}, "loss")
    out = tmp_path / "run"
    train(load_config(ROOT / "configs" / "tiny-sdxl" / "prdp.yaml", settings(out, "train.max_steps=3")))
    assert same(weights(out, 1), weights(out, 2))
    assert metrics(out)[-1]["nonfinite_skipped"] == 1


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    from accelerate import Accelerator

    from diffalign.checkpoints import save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="parameters are not finite"):
        save_checkpoint(
            tmp_path / "checkpoint-1",
            accelerator=Accelerator(cpu=True),
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            trainer_state={"global_step": 1},
            rank_state={},
        )
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_two_processes_agree_to_skip_when_only_one_sees_a_nan(tmp_path):
    """Rank 1 alone gets a NaN loss: both ranks skip that update (no DDP hang), and the run finishes."""
    import os
    import subprocess

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFALIGN_TEST_FAULT": '{"nan_loss_calls": [2], "rank": 1}'}
    result = subprocess.run(
        [
            "accelerate",
            "launch",
            "--config_file",
            str(ROOT / "configs" / "accelerate" / "cpu.yaml"),
            str(ROOT / "tests" / "helpers" / "fault_run.py"),
            "train",
            str(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml"),
            *settings(out, "train.max_steps=3"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        result.stderr.count("step 2: non-finite loss or gradient, update skipped") == 2
    )  # one line per rank
    assert [m["nonfinite_skipped"] for m in metrics(out)] == [0, 1, 1]
    assert same(weights(out, 1), weights(out, 2)) and not same(weights(out, 2), weights(out, 3))
