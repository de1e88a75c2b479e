"""Training-step benchmark: DPO vs MaPO, cache vs no cache, LoRA reference by disabled adapters vs a copy.

Each variant runs the real trainer (``diffalign.train.train``) in its own subprocess on the same model,
data and batch, so that peak memory (the process's peak resident set, minus the resident set just before
the first training step, the peak being reset there through ``/proc/self/clear_refs``) is not mixed
between variants. Step time is the median of the trainer's own
``step_time_s`` (data + forward + backward + update) after ``--warmup`` steps.

    python benchmarks/train_step.py                 # tiny-sdxl at 128 px, 4 pairs per step, CPU
    python benchmarks/train_step.py --write-md      # also update BENCHMARKS.md
    python benchmarks/train_step.py --model runs/real-sdxl --resolution 1024 --batch 1 --variants dpo mapo \
        --override train.device=cuda train.mixed_precision=bf16 \
        model.gradient_checkpointing=true           # GPU, real size

On a GPU the same script measures CUDA peak memory instead (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Training: DPO vs MaPO"

# Runs inside the subprocess: train with the given overrides, report peak memory of the training part.
_CHILD = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[2]))
import diffalign.objectives.pairs as P
import diffalign.train as T
from diffalign.config import load_config
from diffalign.objectives import unwrap

overrides = json.loads(sys.argv[1])
frozen_copy = overrides.pop(0) == "frozen_copy"
mark = {}

original_init = P.PairObjective.__init__
def init(self, ctx):
    if frozen_copy:  # the baseline: a second, frozen UNet instead of disabling the adapters
        import copy
        ref = copy.deepcopy(unwrap(ctx.unet)).requires_grad_(False).eval()
        ref.disable_adapters()
        ctx.ref_unet = ref
    original_init(self, ctx)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident set (VmHWM) to the current one
        f.write("5")
    mark["rss_before_mib"] = _rss_mib("VmRSS:")
P.PairObjective.__init__ = init

def _rss_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")

cfg = load_config(sys.argv[3], overrides)
out = T.train(cfg)
peak = _rss_mib("VmHWM:")
steps = [json.loads(l)["step_time_s"] for l in (out / "metrics.jsonl").read_text().splitlines()]
result = {"step_times": steps, "peak_rss_mib": peak, "rss_before_mib": mark["rss_before_mib"]}
if torch.cuda.is_available() and cfg.train.device != "cpu":
    result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result["device"] = torch.cuda.get_device_name()
print("RESULT " + json.dumps(result))
"""


#: key -> (label, config method, overrides, subprocess mode); "{tmp}" is the benchmark's scratch folder.
VARIANTS = {
    "dpo": ("DPO, LoRA", "dpo", [], "normal"),
    "mapo": ("MaPO, LoRA", "mapo", [], "normal"),
    "dpo_full": ("DPO, full fine-tune", "dpo", ["model.finetune=full"], "normal"),
    "mapo_full": ("MaPO, full fine-tune", "mapo", ["model.finetune=full"], "normal"),
    "dpo_cache": (
        "DPO, LoRA, cached text + latents",
        "dpo",
        ["data.cache=true", "data.cache_dir={tmp}/cache"],
        "normal",
    ),
    "dpo_copy": ("DPO, LoRA, reference = frozen copy", "dpo", [], "frozen_copy"),
}


def run_variant(key: str, args, out_dir: Path) -> dict:
    name, method, overrides, mode = VARIANTS[key]
    config = str(ROOT / f"configs/tiny-sdxl/{method}.yaml")
    overrides = [mode, f"train.output_dir={out_dir / key}", "eval.enabled=false", "log.progress_bar=false",
                 "log.every_n_steps=1", "checkpoint.every_n_steps=0", "log.validation_every_n_steps=0",
                 f"train.max_steps={args.steps + args.warmup}", f"train.batch_size={args.batch}",
                 f"data.resolution={args.resolution}", "data.random_flip=false", f"model.name={args.model}",
                 *args.override, *(o.replace("{tmp}", str(out_dir)) for o in overrides)]
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(overrides), str(args.threads), config],
                          capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"variant {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][7:])
    times = result["step_times"][args.warmup:]
    result["step_s"] = statistics.median(times)
    result["train_mem_mib"] = result.get("cuda_peak_mib", result["peak_rss_mib"] - result["rss_before_mib"])
    print(
        f"{name:>34}: step {result['step_s'] * 1000:8.1f} ms   memory {result['train_mem_mib']:8.1f} MiB",
        flush=True,
    )
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sdxl")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--override", nargs="*", default=[], help="extra dotted.key=value for every variant")
    p.add_argument("--write-md", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)

    with tempfile.TemporaryDirectory() as tmp:
        r = {key: run_variant(key, args, Path(tmp)) for key in args.variants}
    gpu = next((r[k]["device"] for k in r if r[k].get("device")), None)
    machine = gpu or f"{platform.machine()} CPU, {os.cpu_count()} cores (shared sandbox), no GPU"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    ratio = lambda a, b, k: r[a][k] / r[b][k]  # noqa: E731
    lines = [
        SECTION,
        "",
        f"`python benchmarks/train_step.py {' '.join(args.argv)}`".replace(" `", "`"),
        "",
        f"Machine: {machine}; {date}. Model `{args.model}` at {args.resolution} px, {args.batch} pairs per "
        f"step, median of {args.steps} steps after {args.warmup} warm-up steps; "
        + (
            "memory = peak CUDA memory allocated while training (reset at the first step). "
            if gpu
            else "memory = the process's peak resident set while training (reset at the first step), and its "
            "growth over the resident set there. "
        )
        + "Each variant in its own process.",
        "",
        "| variant | step time (ms) | peak RSS in training (MiB) | "
        + ("peak GPU memory in training (MiB) |" if gpu else "growth over the start of training (MiB) |"),
        "|---|---|---|---|",
    ]
    for key in r:
        lines.append(f"| {VARIANTS[key][0]} | {r[key]['step_s'] * 1000:.1f} | {r[key]['peak_rss_mib']:.0f} "
                     f"| {r[key]['train_mem_mib']:.0f} |")
    lines.append("")
    if {"mapo", "dpo"} <= r.keys():
        lines.append(
            f"- MaPO / DPO, LoRA: step time {ratio('mapo', 'dpo', 'step_s'):.2f}, memory "
            f"{ratio('mapo', 'dpo', 'train_mem_mib'):.2f}. (MaPO paper, SDXL on GPU: 0.855 time, 0.825 "
            "memory.)"
        )
    if {"mapo_full", "dpo_full"} <= r.keys():
        lines.append(
            f"- MaPO / DPO, full fine-tune: step time {ratio('mapo_full', 'dpo_full', 'step_s'):.2f}, memory "
            f"{ratio('mapo_full', 'dpo_full', 'train_mem_mib'):.2f}."
        )
    if {"dpo", "dpo_cache"} <= r.keys():
        lines.append(
            f"- Cache speed-up (uncached / cached step time): {ratio('dpo', 'dpo_cache', 'step_s'):.2f}x "
            "(aim >= 1.25x)."
        )
    if {"dpo", "dpo_copy"} <= r.keys():
        memory = "train_mem_mib" if gpu else "peak_rss_mib"
        lines.append(
            "- LoRA reference memory, frozen copy / disabled adapters "
            f"({'peak GPU memory' if gpu else 'peak RSS, which holds the models'}): "
            f"{ratio('dpo_copy', 'dpo', memory):.2f}."
        )
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.write_md:
        sys.path.insert(0, str(Path(__file__).parent))
        from alignment import write_section

        write_section(text, section=SECTION)


if __name__ == "__main__":
    main()
