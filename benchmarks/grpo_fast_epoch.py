"""GRPO-Fast vs full GRPO: where one epoch's time goes (sampling, reference, gradient steps), same process.

    python benchmarks/grpo_fast_epoch.py [--threads 1] [--epochs 3] [--steps 10] [--json out.json]

Three variants of the tiny random-weight SD3 configs, each on its own LoRA copy of the transformer and
with its own AdamW, their epochs interleaved (full, fast, fast-nocfg, full, ...) so that the machine's
load falls on all of them alike:

* ``full``: configs/tiny-sd3/grpo.yaml (Flow-GRPO: SDE at every step, the first int(0.99 T) trained, CFG,
  KL to the reference, beta .04);
* ``fast``: the same with ``timestep_selection: window``, a window of 2 steps in [0, T] (Flow-GRPO+'s
  default Fast settings, configs/sd3/grpo-fast.yaml: CFG and KL kept);
* ``fast-nocfg``: configs/tiny-sd3/grpo-fast.yaml (Flow-GRPO+'s *_fast_nocfg: a window of 3 in [0, T/2],
  CPS, no CFG, no KL).

An epoch is the objective's ``next_epoch()`` (sampling, scoring, the reference's step means when beta >
0) and its K gradient steps (the objective's loss, backward, AdamW), timed as the trainer runs them. The
first epoch of each variant is a warm-up and not counted; the table gives the median over the others,
and each component's ratio to ``full`` (the figure of merit: same run, same machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("sampling_s", "scoring_s", "reference_s", "gradient_s", "other_s", "total_s", "gradient_cpu_s",
         "total_cpu_s")


def variants(steps: int) -> dict[str, tuple[str, list[str]]]:
    """Each variant's config file and overrides."""
    return {
        "full": ("configs/tiny-sd3/grpo.yaml", []),
        "fast": ("configs/tiny-sd3/grpo.yaml", ["method.timestep_selection=window", "method.window_size=2",
                                                f"method.window_range=[0,{steps}]"]),
        "fast-nocfg": ("configs/tiny-sd3/grpo-fast.yaml", [f"method.window_range=[0,{steps // 2}]"]),
    }


def epoch_breakdown(stats: dict, collect_s: float, gradient_s: float, collect_cpu_s: float,
                    gradient_cpu_s: float) -> dict[str, float]:
    """One epoch's wall seconds by part; ``other_s``: the rest of ``next_epoch`` (filtering, advantages,
    moving tensors); ``*_cpu_s``: this process's CPU seconds (less disturbed by other jobs on the machine
    than the wall clock, at one thread)."""
    known = stats["sampling_s"] + stats["scoring_s"] + stats.get("reference_s", 0.0)
    return {"sampling_s": stats["sampling_s"], "scoring_s": stats["scoring_s"],
            "reference_s": stats.get("reference_s", 0.0), "gradient_s": gradient_s,
            "other_s": collect_s - known, "total_s": collect_s + gradient_s, "gradient_cpu_s": gradient_cpu_s,
            "total_cpu_s": collect_cpu_s + gradient_cpu_s}


def summarise(epochs: dict[str, list[dict[str, float]]], baseline: str = "full") -> dict:
    """Median seconds per epoch by part for each variant, and each part's ratio to ``baseline``."""
    median = {name: {part: statistics.median(e[part] for e in rows) for part in PARTS}
              for name, rows in epochs.items()}
    ratio = {name: {part: (parts[part] / median[baseline][part] if median[baseline][part] > 0 else None)
                    for part in PARTS} for name, parts in median.items()}
    return {"median_s": median, "ratio_vs_" + baseline: ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per variant (+1 warm-up)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps T (Flow-GRPO: 10)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    from diffalign.config import load_config
    from diffalign.families import family_of
    from diffalign.methods import METHODS
    from diffalign.models import load_pipeline
    from diffalign.objectives import OnlineObjective, TrainContext
    from diffalign.train import lora_config

    load_before = os.getloadavg()
    base = load_pipeline("tiny-sd3")
    base.set_progress_bar_config(disable=True)
    family = family_of(base)
    accelerator = Accelerator(cpu=True)
    runs = {}
    for name, (path, overrides) in variants(args.steps).items():
        prompts = ROOT / "data" / "tiny-prompts.txt"
        cfg = load_config(ROOT / path, [f"method.num_steps={args.steps}", f"method.prompts={prompts}",
                                        *overrides])
        pipe = copy.copy(base)
        denoiser = copy.deepcopy(getattr(base, family.denoiser_attr)).requires_grad_(False)
        denoiser.add_adapter(lora_config(denoiser, cfg.lora))
        setattr(pipe, family.denoiser_attr, denoiser)
        lora = [p for p in denoiser.parameters() if p.requires_grad]
        ctx = TrainContext(cfg, METHODS["grpo"], accelerator, pipe, family, denoiser, None, torch.float32)
        runs[name] = (OnlineObjective(ctx), torch.optim.AdamW(lora, lr=cfg.optim.learning_rate), cfg)

    epochs: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    last = {}
    for epoch in range(args.epochs + 1):
        for name, (objective, optimizer, cfg) in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            batch = objective.next_epoch()
            collect_s, collect_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(cfg.method.gradient_steps_per_epoch):
                out = objective(batch)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            gradient_s, gradient_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            last[name] = batch
            if epoch > 0:  # the first epoch of each variant warms up
                epochs[name].append(epoch_breakdown(batch.stats, collect_s, gradient_s, collect_cpu_s,
                                                    gradient_cpu_s))

    settings = {}
    for name, (objective, _, cfg) in runs.items():
        m, stored = cfg.method, len(last[name].steps)
        settings[name] = {"stochastic_steps": stored,
                          "trained_steps": int(objective.spec.train_columns(m, 1, stored, None).shape[1]),
                          "guidance_scale": m.guidance_scale, "beta": m.beta, "sde": m.sde}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), CPU, "
                   f"{os.cpu_count()} cores",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]],
        "model": "tiny-sd3", "T": args.steps, "measured_epochs": args.epochs, "variants": settings,
        **summarise(epochs), "epochs": epochs,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
