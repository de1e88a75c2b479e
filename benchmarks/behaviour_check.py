"""Behaviour check for refactors: every shipped tiny config and the README main job, a few steps each.

Each run trains in its own process (one CPU thread, so float reductions keep their order) and records a
SHA-256 and the max |w| of the final trained weights (every ``*.safetensors`` the run writes at its
top level), the last logged loss and the held-out evaluation means. Run it on two code versions and
compare the JSON files::

    python benchmarks/behaviour_check.py --out before.json            # on the old code
    python benchmarks/behaviour_check.py --out after.json             # on the new code
    python benchmarks/behaviour_check.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The README main job, shortened to a few steps like the tiny configs.
MAIN_JOB = "configs/toy-sdxl/dpo.yaml"
SHORT = ["train.max_steps=3", "log.every_n_steps=1", "log.progress_bar=false", "checkpoint.every_n_steps=0",
         "log.validation_every_n_steps=0", "eval.seeds=[0]", "eval.num_steps=3",
         "eval.train_pairs=4", "eval.train_pair_draws=1"]


def configs() -> list[str]:
    grouped = sorted((ROOT / "configs").glob("tiny-*/*.yaml"))
    if grouped:
        return [str(p.relative_to(ROOT)) for p in grouped] + [MAIN_JOB]
    # a checkout from before configs were grouped by model (to compare against older code)
    return [str(p.relative_to(ROOT)) for p in sorted((ROOT / "configs").glob("tiny-*.yaml"))] + [OLD_MAIN_JOB]


OLD_MAIN_JOB = "configs/toy-sdxl-dpo.yaml"


def canonical(name: str) -> str:
    """A LoRA key in PEFT's naming whatever the file's: exports before 2026-12-01 renamed attention keys to
    ``lora.down`` / ``lora.up``, which changes no weight."""
    return name.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight")


def run_one(config: str, out_dir: str) -> dict:
    """Train ``config`` shortened into ``out_dir`` (in this process) and summarise what it wrote."""
    import torch
    from safetensors.torch import load_file

    from diffalign.config import load_config
    from diffalign.train import train

    torch.set_num_threads(1)
    old_keys = "num_inference_steps" in (ROOT / config).read_text()  # configs before the key rename
    short = [o.replace("eval.num_steps", "eval.num_inference_steps") for o in SHORT] if old_keys else SHORT
    cfg = load_config(config, [*short, f"train.output_dir={out_dir}"])
    start = time.perf_counter()
    out = train(cfg)
    digest, max_abs, count = hashlib.sha256(), 0.0, 0
    for file in sorted(Path(out).glob("*.safetensors")) + sorted(Path(out).glob("*/*.safetensors")):
        tensors = load_file(str(file))
        for name in sorted(tensors, key=canonical):
            value = tensors[name].float().contiguous()
            digest.update(canonical(name).encode())
            digest.update(value.numpy().tobytes())
            max_abs = max(max_abs, float(value.abs().max()))
            count += 1
    metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    scores_file = Path(out) / "eval" / "scores.json"
    scores = json.loads(scores_file.read_text()) if scores_file.exists() else {}
    return {"weights_sha256": digest.hexdigest(), "weights_max_abs": max_abs, "tensors": count,
            "final_loss": metrics[-1]["loss"], "losses": [m["loss"] for m in metrics],
            "eval_means": {k: [v["base_mean"], v["tuned_mean"]]
                           for k, v in scores.get("scorers", {}).items()},
            "train_pairs": scores.get("train_pairs"), "seconds": round(time.perf_counter() - start, 1)}


def run_all(out: Path, only: list[str] | None) -> None:
    results = {}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for config in only or configs():
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, __file__, "--one", config, "--run-dir", tmp], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode:
                results[config] = {"error": proc.stderr.strip().splitlines()[-1:]}
            else:
                results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(config, results[config].get("weights_sha256", results[config].get("error")), flush=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


def grouped_name(config: str) -> str:
    """``configs/tiny-sdxl-dpo.yaml`` (the layout before configs were grouped by model) as
    ``configs/tiny-sdxl/dpo.yaml``."""
    return re.sub(r"^configs/((?:tiny|toy)-[a-z0-9]+)-([a-z]+)\.yaml$", r"configs/\1/\2.yaml", config)


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    a, b = ({grouped_name(k): v for k, v in d.items()} for d in (a, b))
    new = sorted(set(b) - set(a))
    if new:
        print(f"runs with nothing to compare against (new configs): {', '.join(new)}")
    b = {k: v for k, v in b.items() if k in a}
    print("| run | weights | max abs before / after | final loss before / after "
          "| losses, eval, train pairs |")
    print("|---|---|---|---|---|")
    differ = 0
    for config in sorted(set(a) | set(b)):
        x, y = a.get(config, {}), b.get(config, {})
        same = "error" not in x and x.get("weights_sha256") == y.get("weights_sha256")
        logged = all(x.get(k) == y.get(k) for k in ("losses", "eval_means", "train_pairs"))
        differ += not (same and logged)
        print(f"| {config} | {'bitwise equal' if same else 'DIFFER'} | {x.get('weights_max_abs')} / "
              f"{y.get('weights_max_abs')} | {x.get('final_loss')} / {y.get('final_loss')} | "
              f"{'equal' if logged else 'DIFFER'} |")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--one")
    parser.add_argument("--run-dir")
    parser.add_argument("--compare", nargs=2, type=Path)
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.one:
        print(json.dumps(run_one(args.one, args.run_dir)))
        return 0
    run_all(args.out, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
