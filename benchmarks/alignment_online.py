"""Do the online and self-play methods learn? PRDP, DDPO, GRPO and SePPO (with ablations) on ``toy-sdxl``.

    python benchmarks/alignment_online.py [--methods prdp ddpo seppo ...] [--seeds 0 1 2] \\
        [--reward toy_saturation]
    python benchmarks/alignment_online.py --configs toy-animatediff --methods prdp   # the toy video model
    python benchmarks/alignment_online.py --configs toy-animatediff --methods prdp \\
        --override train.device=cuda

Every run goes through the real trainer (``diffalign.train.train``) from the shipped configs
``configs/{CONFIGS}/{prdp,ddpo,grpo,seppo}.yaml`` (``--configs``: toy-sdxl, toy-sd3 (flow matching), or
toy-animatediff for PRDP and DDPO on video, rewarded by the frame average of the image reward) and is judged
by the trainer's own before/after evaluation: the held-out toy prompts (never trained on), fixed seeds, the
target reward's mean for the base model and for the tuned one. PRDP and DDPO optimise the reward online on the
training prompts.
SePPO gets only winners: for each training prompt the base model samples ``--candidates`` images and the one
the reward likes best is kept (made once per benchmark run and shared by every SePPO run).

Methods: ``prdp``, ``ddpo``, ``grpo`` (``grpo-fast``: its window variant), ``seppo`` (reference uniform
over the pool, sign flip), the SePPO ablations ``seppo-initial``, ``seppo-latest``, ``seppo-flip-off``,
``seppo-indicator``, the reward-gradient methods ``draft_k``, ``draft_lv``, ``alignprop`` and ``refl``
(``train.batch_size`` prompts per step, one chain each, all from ``draft_k.yaml``), and ``nft`` (DiffusionNFT,
flow families: ``--configs toy-sd3``).
Results: a JSON file and Markdown table rows (mean ± std of the change over seeds).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from alignment import interval  # the image benchmark's 95 % t-interval (this script's folder is on sys.path)

METHODS = {
    "prdp": ("prdp", []),
    "ddpo": ("ddpo", []),
    "grpo": ("grpo", []),
    "grpo-fast": ("grpo", ["method.timestep_selection=window"]),
    "seppo": ("seppo", []),
    "seppo-initial": ("seppo", ["method.reference=initial"]),
    "seppo-latest": ("seppo", ["method.reference=latest"]),
    "seppo-flip-off": ("seppo", ["method.flip='off'"]),  # quoted: YAML reads a bare off as false
    "seppo-indicator": ("seppo", ["method.flip=indicator"]),
    "draft_k": ("draft_k", []),  # DRaFT-K (K = 1): the reward's gradient through the last DDIM step
    # the other reward-gradient variants on draft_k's config (its budget: batch_size chains per step);
    # AlignProp's truncation N(42, 5) of 50 steps scaled to the config's 20: N(17, 2)
    "draft_lv": ("draft_k", ["method.name=draft_lv"]),
    "alignprop": ("draft_k", ["method.name=alignprop", "method.truncation_mean=17",
                              "method.truncation_std=2"]),
    # ReFL at draft_k's loss scale (its threshold 2 makes ReLU(2 - r) = 2 - r for a reward in [0, 1])
    "refl": ("draft_k", ["method.name=refl", "method.refl_step_range=[15,19]"]),
    "nft": ("nft", []),  # DiffusionNFT: flow families only (toy-sd3)
}


def make_winners(model: str, reward: str, prompts: list[str], candidates: int, steps: int, guidance: float,
                 out: Path, seed: int = 1000) -> Path:
    """Best-of-``candidates`` base-model samples per prompt, by ``reward``: ``out/winners.jsonl``."""
    from diffalign.images import to_pil
    from diffalign.models import load_pipeline
    from diffalign.sampler import sample
    from diffalign.scorers import make_scorer

    if (out / "winners.jsonl").is_file():
        return out / "winners.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    scorer = make_scorer(reward)
    rows, chosen = [], []
    for i, prompt in enumerate(prompts):
        result = sample(
            pipe,
            [prompt] * candidates,
            seeds=[seed + i * candidates + j for j in range(candidates)],
            num_steps=steps,
            guidance_scale=guidance,
        )
        scores = scorer.score(result.images, [prompt] * candidates)
        best = int(scores.argmax())
        file = f"{i:04d}.png"
        to_pil(result.images[best : best + 1])[0].save(out / file)
        rows.append(
            {
                "prompt": prompt,
                "image": file,
                "score": float(scores[best]),
                "candidates_mean": float(scores.mean()),
            }
        )
        chosen.append(float(scores[best]))
    (out / "winners.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"winners: {len(rows)} prompts, best-of-{candidates} {reward} {statistics.mean(chosen):.4f} "
          f"(candidates {statistics.mean(r['candidates_mean'] for r in rows):.4f})")
    return out / "winners.jsonl"


def run_one(name: str, seed: int, args, winners: Path | None) -> dict:
    from diffalign.config import load_config
    from diffalign.train import train

    method, extra = METHODS[name]
    out = Path(args.out) / f"{name}-seed{seed}"
    overrides = [
        f"train.output_dir={out}",
        f"train.seed={seed}",
        f"model.name={args.model}",
        f"eval.scorers=[{','.join([args.reward, *args.eval_scorers])}]",
        "log.progress_bar=false",
        *extra,
        *args.override,
    ]
    if method == "seppo":
        overrides += [f"data.source={winners}", *args.seppo_override]
    else:
        overrides += [f"method.reward={args.reward}", *args.online_override]
    cfg = load_config(f"configs/{args.configs}/{method}.yaml", overrides)
    t0, cpu0 = time.time(), time.process_time()
    train(cfg)
    scores = json.loads((out / "eval" / "scores.json").read_text())["scorers"][args.reward]
    device = (torch.cuda.get_device_name() if cfg.train.device != "cpu" and torch.cuda.is_available()
              else f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)")
    return {
        "method": name,
        "seed": seed,
        "device": device,
        "base": scores["base_mean"],
        "tuned": scores["tuned_mean"],
        "delta": scores["delta"],
        "minutes": (time.time() - t0) / 60,
        "cpu_minutes": (time.process_time() - cpu0) / 60,
    }


def machine(rows: list[dict]) -> str:
    """Where the runs ran (result files written before the device was recorded ran on the CPU)."""
    return " / ".join(sorted({r.get("device", f"{platform.machine()} CPU") for r in rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["prdp", "ddpo", "seppo"], choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--configs", default="toy-sdxl", choices=["toy-sdxl", "toy-animatediff", "toy-sd3"],
                        help="the config set: configs/CONFIGS/METHOD.yaml")
    parser.add_argument("--model", default=None, help="model id or folder (default: the --configs model)")
    parser.add_argument("--reward", default="toy_saturation", help="a registered scorer name (the target)")
    parser.add_argument(
        "--eval-scorers",
        nargs="*",
        default=[],
        help="evaluation-only scorers reported beside the target (eval.scorers; never trained on)",
    )
    parser.add_argument(
        "--candidates", type=int, default=4, help="SePPO winners: best of this many per prompt"
    )
    parser.add_argument("--winner-prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/alignment-online")
    parser.add_argument("--override", nargs="*", default=[], help="extra dotted.key=value for every run")
    parser.add_argument("--online-override", nargs="*", default=[], help="... for PRDP and DDPO runs only")
    parser.add_argument("--seppo-override", nargs="*", default=[], help="... for SePPO runs only")
    args = parser.parse_args()
    args.model = args.model or args.configs
    torch.set_num_threads(args.threads)
    missing = [m for m in args.methods if not Path(f"configs/{args.configs}/{METHODS[m][0]}.yaml").is_file()]
    if missing:
        parser.error(f"no configs/{args.configs}/METHOD.yaml for {', '.join(missing)}")

    winners = None
    if any(METHODS[m][0] == "seppo" for m in args.methods):
        from diffalign.config import load_config
        from diffalign.toy.data import toy_prompts

        base = load_config(f"configs/{args.configs}/seppo.yaml", [f"model.name={args.model}"], check=False)
        winners = make_winners(args.model, args.reward, toy_prompts("train", n=args.winner_prompts, seed=0),
                               args.candidates, base.eval.num_steps, base.eval.guidance_scale,
                               Path(args.out) / "winners")
    # One result file per run, so several processes may share --out.
    for name in args.methods:
        for seed in args.seeds:
            result_file = Path(args.out) / f"{name}-seed{seed}" / "result.json"
            if result_file.is_file():
                continue
            row = run_one(name, seed, args, winners)
            print(json.dumps(row))
            result_file.write_text(json.dumps(row))
    results = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob("*/result.json"))]

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    print(
        f"\n| method | seeds | base {args.reward} | tuned | change (mean ± std) | 95 % CI | per seed | "
        "improved | wall min/run | CPU min/run | change per CPU min | machine, date |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.methods:
        rows = [r for r in results if r["method"] == name]
        if not rows:
            continue
        deltas = [r["delta"] for r in rows]
        std = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        cpu = [r["cpu_minutes"] for r in rows if "cpu_minutes" in r]
        print(
            f"| {name} | {len(rows)} | {statistics.mean(r['base'] for r in rows):.4f} | "
            f"{statistics.mean(r['tuned'] for r in rows):.4f} | {statistics.mean(deltas):+.4f} ± {std:.4f} | "
            f"± {interval(deltas)[1]:.4f} | {', '.join(f'{d:+.4f}' for d in deltas)} | "
            f"{sum(d > 0 for d in deltas)}/{len(rows)} | {statistics.mean(r['minutes'] for r in rows):.1f} | "
            f"{statistics.mean(cpu) if cpu else float('nan'):.1f} | "
            f"{statistics.mean(deltas) / statistics.mean(cpu) if cpu else float('nan'):+.5f} | "
            f"{machine(rows)}, {date} |"
        )


if __name__ == "__main__":
    main()
