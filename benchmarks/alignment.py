"""Alignment benchmark: does each method raise a held-out reward above the base model?

For every seed: AI-feedback pairs are generated once from the base model on the *training* prompts
(``diffalign.pairs.generate_pairs``: K images per prompt, best vs worst under the scorer), then each
method trains from its config on those pairs, and the trainer's own before/after evaluation scores the
base and the tuned model on the *held-out* prompts with the same seeds. Reported per method: the base and
tuned held-out means, their difference with a 95 % t-interval over seeds, and CPU minutes. Pairs and
finished runs (``result.json``) found in ``--out`` are reused, so seeds can be added to a benchmark later.

    python benchmarks/alignment.py                        # toy-sdxl, DPO + MaPO, 3 seeds
    python benchmarks/alignment.py --configs toy-animatediff --methods mapo   # the toy video model
    python benchmarks/alignment.py --model tiny-sdxl --scorer brightness --quick   # mechanics only
    python benchmarks/alignment.py --write-md             # also update BENCHMARKS.md

Later methods (or models) add an entry to METHOD_CONFIGS. Videos are paired and scored like images: the
image scorers average over a clip's frames.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
#: config set (the model they were written for) -> method name -> config file it trains from
#: (data / output / seed / eval prompts and seeds are overridden).
METHOD_CONFIGS = {
    "toy-sdxl": {"dpo": "configs/toy-sdxl/dpo.yaml", "mapo": "configs/toy-sdxl/mapo.yaml"},
    "toy-animatediff": {
        "dpo": "configs/toy-animatediff/dpo.yaml",
        "mapo": "configs/toy-animatediff/mapo.yaml",
    },
    "toy-sd3": {"dpo": "configs/toy-sd3/dpo.yaml"},
}
SECTIONS = {
    "toy-sdxl": "## Alignment on toy-sdxl",
    "toy-animatediff": "## Alignment on toy-animatediff (video)",
    "toy-sd3": "## Alignment on toy-sd3 (flow matching)",
}

# Two-sided 95 % Student-t quantiles by degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95 % t-interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    half = _T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, half


def prompts_for(model: str, split: str, n: int, seed: int) -> list[str]:
    if "animatediff" in model:  # toy video captions: one shape moving in a named direction
        from diffalign.toy.video_data import video_prompts

        return video_prompts(split, n=n, seed=seed)
    try:
        from diffalign.toy.data import toy_prompts

        return toy_prompts(split, n=n, seed=seed)
    except ImportError:  # without the toy world: shapes captions
        colors = ["red", "green", "blue", "yellow", "white", "black"]
        shapes = ["circle", "square", "triangle"]
        all_prompts = [
            f"a {c} {s} on a {b} background" for c in colors for s in shapes for b in colors if b != c
        ]
        rng = __import__("random").Random(seed + (0 if split == "train" else 1))
        return rng.sample(all_prompts, n)


def run(args) -> dict:
    from diffalign.config import load_config
    from diffalign.models import load_pipeline
    from diffalign.pairs import generate_pairs
    from diffalign.sampling import SamplingSettings
    from diffalign.scorers import make_scorer
    from diffalign.train import train

    torch.set_num_threads(args.threads)
    out_root = Path(args.out)
    configs = METHOD_CONFIGS[args.configs]
    results: dict = {"model": args.model, "configs": args.configs, "scorer": args.scorer, "seeds": args.seeds,
                     "num_frames": args.num_frames, "methods": {}, "runs": []}
    heldout = prompts_for(args.configs, "heldout", args.heldout_prompts, seed=0)
    frames = (
        [f"eval.num_frames={args.num_frames}", f"data.num_frames={args.num_frames}"]
        if args.num_frames
        else []
    )
    for seed in args.seeds:
        pair_dir = out_root / f"pairs-seed{seed}"
        t0 = time.process_time()
        if not (pair_dir / "pairs.jsonl").is_file():
            pipe = load_pipeline(args.model)
            pipe.set_progress_bar_config(disable=True)
            train_prompts = prompts_for(args.configs, "train", args.train_prompts, seed=seed)
            info = generate_pairs(
                pipe,
                train_prompts,
                make_scorer(args.scorer),
                pair_dir,
                images_per_prompt=args.images_per_prompt,
                seed=1000 * seed,
                sampling=SamplingSettings(
                    num_steps=args.steps, guidance_scale=args.guidance, num_frames=args.num_frames
                ),
                model_name=args.model,
                batch_size=16,
                progress=False,
            )
            print(
                f"seed {seed}: {info['pairs']} pairs ({info['ties']} ties), chosen "
                f"{info['mean_chosen_score']:.4f} vs rejected {info['mean_rejected_score']:.4f}",
                flush=True,
            )
        pairs_cpu = (time.process_time() - t0) / 60
        for method in args.methods:
            out = out_root / f"{method}-seed{seed}"
            if (out / "result.json").is_file():  # finished earlier (e.g. before adding seeds): reuse it
                results["runs"].append(json.loads((out / "result.json").read_text()))
                continue
            overrides = [
                f"model.name={args.model}",
                f"data.source={pair_dir}",
                f"train.output_dir={out}",
                f"train.seed={seed}",
                f"eval.prompts={json.dumps(heldout)}",
                f"eval.seeds={json.dumps(args.eval_seeds)}",
                f"eval.scorers=[{args.scorer}]",
                f"eval.num_steps={args.steps}",
                f"eval.guidance_scale={args.guidance}",
                "log.progress_bar=false",
                "checkpoint.every_n_steps=0",
                "log.validation_every_n_steps=0",
                *frames,
                *args.override,
            ]
            if args.max_steps:
                overrides.append(f"train.max_steps={args.max_steps}")
            cfg = load_config(ROOT / configs[method], overrides)
            t0 = time.process_time()
            train(cfg)
            cpu_min = (time.process_time() - t0) / 60
            scores = json.loads((out / "eval" / "scores.json").read_text())
            row = scores["scorers"][args.scorer]
            record = {"method": method, "seed": seed, "base": row["base_mean"], "tuned": row["tuned_mean"],
                      "delta": row["delta"], "cpu_min": cpu_min, "pairs_cpu_min": pairs_cpu,
                      "train_pairs": scores.get("train_pairs")}
            results["runs"].append(record)
            (out / "result.json").write_text(json.dumps(record))
            print(f"{method} seed {seed}: base {record['base']:.4f} -> tuned {record['tuned']:.4f} "
                  f"({record['delta']:+.4f}), {cpu_min:.1f} CPU min", flush=True)
    for method in args.methods:
        runs = [r for r in results["runs"] if r["method"] == method]
        delta, half = interval([r["delta"] for r in runs])
        results["methods"][method] = {
            "base": statistics.fmean(r["base"] for r in runs),
            "tuned": statistics.fmean(r["tuned"] for r in runs),
            "delta": delta,
            "delta_ci95": half,
            "seeds_improved": sum(r["delta"] > 0 for r in runs),
            "n": len(runs),
            "cpu_min": statistics.fmean(r["cpu_min"] for r in runs),
            "per_seed": [r["delta"] for r in runs],
        }
    return results


def markdown(results: dict, args) -> str:
    machine = (
        f"{platform.machine()} CPU, {os.cpu_count()} cores (shared sandbox), torch {torch.__version__}, "
        "no GPU"
    )
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    samples = "images" if not args.num_frames else f"clips of {args.num_frames} frames"
    per_frame = "; the image reward averaged over frames" if args.num_frames else ""
    lines = [
        SECTIONS[args.configs],
        "",
        f"`python benchmarks/alignment.py {' '.join(args.argv)}`".replace(" `", "`"),
        "",
        f"Machine: {machine}; {date}. Model `{results['model']}`, reward `{results['scorer']}` (higher is "
        f"better); AI-feedback pairs from the base model on {args.train_prompts} training prompts "
        f"({args.images_per_prompt} {samples} each, best vs worst, {args.steps} sampling steps{per_frame}); "
        f"held-out: {args.heldout_prompts} prompts x {len(args.eval_seeds)} seeds, same seeds for base and "
        f"tuned. Mean over {len(args.seeds)} seeds with a 95 % t-interval.",
        "",
        "| method | base | tuned | change (95 % CI) | per seed | seeds improved | CPU min / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, m in results["methods"].items():
        per_seed = ", ".join(f"{d:+.4f}" for d in m["per_seed"])
        lines.append(
            f"| {method} | {m['base']:.4f} | {m['tuned']:.4f} | {m['delta']:+.4f} ± {m['delta_ci95']:.4f} "
            f"| {per_seed} | {m['seeds_improved']}/{m['n']} | {m['cpu_min']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def write_section(text: str, section: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    content = path.read_text(encoding="utf-8")
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(content):
        content = pattern.sub(lambda _: text.rstrip() + "\n\n", content, count=1)
    else:
        content = content.rstrip() + "\n\n" + text
    path.write_text(content, encoding="utf-8")


def main(argv=None):
    import sys

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="toy-sdxl", choices=list(METHOD_CONFIGS),
                   help="which config set the methods train from (see METHOD_CONFIGS)")
    p.add_argument("--model", default=None, help="model id or folder (default: the --configs model)")
    p.add_argument("--scorer", default="toy_saturation")
    methods = sorted({m for c in METHOD_CONFIGS.values() for m in c})
    p.add_argument("--methods", nargs="+", default=methods, choices=methods)
    p.add_argument(
        "--num-frames", type=int, default=None, help="video models: frames per clip (pairs, training, eval)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train-prompts", type=int, default=64)
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--heldout-prompts", type=int, default=16)
    p.add_argument("--eval-seeds", nargs="+", type=int, default=[100, 101])
    p.add_argument("--steps", type=int, default=20, help="sampling steps for pairs and evaluation")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--override", nargs="*", default=[], help="extra dotted.key=value for every run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench-alignment")
    p.add_argument("--quick", action="store_true", help="1 seed, few prompts and steps: mechanics only")
    p.add_argument("--write-md", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.model = args.model or args.configs
    if args.quick:
        args.seeds, args.train_prompts, args.heldout_prompts, args.eval_seeds = args.seeds[:1], 8, 2, [100]
        args.steps, args.max_steps = 4, args.max_steps or 4
    results = run(args)
    text = markdown(results, args)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    if args.write_md:
        write_section(text, SECTIONS[args.configs])


if __name__ == "__main__":
    main()
