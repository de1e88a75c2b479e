"""Memory per process, FSDP2 vs DDP: a full fine-tune (DPO) on 2 CPU processes (gloo).

    python benchmarks/fsdp_memory.py [--width 192] [--steps 2] [--out runs/fsdp-memory]

Builds the tiny SDXL pipeline with a wider UNet (``--width``: channels of its first block, 32 in
tiny-sdxl), then trains it for ``--steps`` DPO steps twice through ``accelerate launch``, with
configs/accelerate/cpu.yaml (DDP) and configs/accelerate/cpu_fsdp.yaml (FSDP2), and reports per process:

* the training state it holds: the denoiser's parameters, their gradients (one per trainable parameter,
  alive from backward to the optimizer step), Adam's two moments, and the frozen reference copy DPO needs
  (all local: FSDP2's shards, DDP's full copies), counted from the tensors;
* its peak resident memory (``ru_maxrss``): everything, including the Python/torch runtime, the VAE and
  text encoders, activations, and the whole denoiser gathered for saving at the end.

The ratio FSDP/DDP of the training state is the number FSDP is for (goal <= 0.6 on 2 processes); the RSS
ratio says how much of a process that is at this size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "FSDP_MEMORY "


def build_model(width: int, out: Path) -> Path:
    """The tiny SDXL pipeline with its UNet widened to ``(width, 2 * width)`` channels."""
    from diffusers import UNet2DConditionModel

    from diffalign.models import load_pipeline
    from diffalign.tiny import cached_tiny

    folder = out / f"sdxl-width-{width}"
    if (folder / "model_index.json").is_file():
        return folder
    pipe = load_pipeline(str(cached_tiny("sdxl")))
    config = dict(pipe.unet.config) | {"block_out_channels": (width, 2 * width)}
    pipe.unet = UNet2DConditionModel.from_config(config)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def child(argv: list[str]) -> int:
    """Train as ``diffalign train`` does, then print this process's memory (``MARK`` + JSON)."""
    import torch
    from accelerate import Accelerator

    from diffalign import distributed, train
    from diffalign.cli import main

    torch.set_num_threads(1)
    references = []
    shard = distributed.shard_frozen_copy

    def record(accelerator, model):
        model = shard(accelerator, model)
        references.append(model)
        return model

    train.shard_frozen_copy = record  # the trainer's own call, to count the reference it keeps
    end_training = Accelerator.end_training

    def report(self):
        model, optimizer = self._models[0], self._optimizers[0].optimizer
        trainable = [p for p in model.parameters() if p.requires_grad]
        adam = [v for state in optimizer.state.values() for v in state.values()
                if torch.is_tensor(v) and v.dim() > 0]
        numbers = {
            "rank": self.process_index,
            "parameters": local_bytes(model.parameters()),
            "gradients": local_bytes(trainable),
            "adam": local_bytes(adam),
            "reference": sum(local_bytes(r.parameters()) for r in references if r is not None),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        sys.stderr.write(MARK + json.dumps(numbers) + "\n")
        end_training(self)

    Accelerator.end_training = report
    return main(argv)


def run(launch: str, model: Path, out: Path, steps: int) -> list[dict]:
    config = ROOT / "configs" / "accelerate" / ("cpu_fsdp.yaml" if launch == "fsdp" else "cpu.yaml")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), __file__,
               "--child", "train", str(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml"), f"model.name={model}",
               "model.finetune=full", f"train.output_dir={out / launch}", f"train.max_steps={steps}",
               "train.batch_size=2", "data.max_pairs=8", "optim.learning_rate=1e-5",
               "optim.lr_warmup_steps=0",
               "eval.enabled=false", "log.validation_every_n_steps=0", "checkpoint.every_n_steps=0",
               "log.progress_bar=false"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"{launch} run failed:\n{log[-4000:]}")
    rows = [json.loads(line.split(MARK, 1)[1]) for line in log.splitlines() if MARK in line]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        raise SystemExit(child(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/fsdp-memory"))
    args = parser.parse_args()
    model = build_model(args.width, args.out)
    results = {launch: run(launch, model, args.out, args.steps) for launch in ("ddp", "fsdp")}
    mib = 2**20
    print("| launch | rank | params MiB | grads MiB | Adam MiB | reference MiB | state MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    state = {}
    for launch, rows in results.items():
        for r in rows:
            total = r["parameters"] + r["gradients"] + r["adam"] + r["reference"]
            state.setdefault(launch, []).append((total, r["peak_rss"]))
            print(f"| {launch} | {r['rank']} | {r['parameters'] / mib:.1f} | {r['gradients'] / mib:.1f} | "
                  f"{r['adam'] / mib:.1f} | {r['reference'] / mib:.1f} | {total / mib:.1f} | "
                  f"{r['peak_rss'] / mib:.0f} |")
    worst = {launch: (max(s for s, _ in v), max(m for _, m in v)) for launch, v in state.items()}
    print(f"\nFSDP/DDP per process (largest rank): training state {worst['fsdp'][0] / worst['ddp'][0]:.2f}x, "
          f"peak RSS {worst['fsdp'][1] / worst['ddp'][1]:.2f}x")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
