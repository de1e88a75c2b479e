"""Caption following on toy-sdxl: does alignment raise the toy GenEval on held-out captions?

    python benchmarks/toy_geneval.py --diagnose         # how well each reward ranks a prompt's samples
    python benchmarks/toy_geneval.py --methods prdp ddpo --rewards toy_faithfulness \\
        "toy_geneval:measure=fraction" --seeds 0 1 2 3 4 --eval-guidance 1 3  # method x reward x seed grid
    python benchmarks/toy_geneval.py --methods dpo mapo seppo --seeds 0 1 2 3 4 --eval-guidance 1
    python benchmarks/toy_geneval.py --methods draft_k --rewards toy_faithfulness --eval-guidance 1 \
        --eval-scorers toy_faithfulness   # a reward-gradient method needs a differentiable reward

Every run goes through the real trainer (``diffalign.train.train``) from its ``configs/toy-sdxl/`` config
(:data:`METHOD_CONFIGS`; ``--configs toy-sd3``: the toy flow model and its configs, e.g. ``--methods nft``):
the online methods with ``method.reward`` set to the cell's reward, DPO / MaPO /
SePPO on ``--pairs`` (labelled by the toy GenEval); all train on the training captions only. Then every
finished run and the base model are judged by the toy GenEval (:mod:`diffalign.toy.geneval`) on all 126
held-out captions (whose colour/shape/background triples the model never saw), on the same noise for every
model, at each ``--eval-guidance``: all-attributes accuracy and each attribute, base vs tuned, the paired
change with a caption-bootstrap 95 % interval per run and a t-interval over seeds per cell.
``toy_saturation`` (image statistics) is reported too, to show whether a reward is hacked
(``--eval-scorers`` adds others to ``geneval.json``, e.g. ``toy_faithfulness``, DRaFT-K's training reward).

``--diagnose`` samples ``--diagnose-prompts`` training captions x 4 from the base model at the training
guidance and reports, per reward: its mean and within-prompt spread, the share of prompt groups whose
rewards differ (the online methods drop the others), and how well it agrees within a group with the toy
GenEval's attribute fraction (a reward that ranks a prompt's samples unlike the GenEval cannot teach it).

Results: one ``result.json`` per run under ``--out`` (the grid resumes: finished runs are not rerun),
``geneval.json`` and Markdown table rows on stdout. Cells: ``--methods`` x ``--rewards`` (online methods;
the pairs for the others) x ``--seeds``; ``--tag`` with ``--online-override`` / ``--pairs-override`` make a
variant (e.g. ``method.guidance_scale=1``). The "train reward" column of a pairs method is its implicit
accuracy (first -> last logged window).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from alignment import interval  # the image benchmark's 95 % t-interval (this script's folder is on sys.path)

#: method -> the toy-sdxl config it trains from. Online methods (PRDP, DDPO, GRPO, DRaFT-K, ReFL) take any
#: reward (``--rewards``; DRaFT-K and ReFL only a differentiable one, e.g. ``toy_faithfulness``, not the toy
#: GenEval; ReFL's config adds its pretraining loss on the pairs' chosen images);
#: NFT only on a flow model (``--configs toy-sd3``, whose configs/toy-sd3/ has the online ones and nft);
#: DPO, MaPO and SePPO (winners = the pairs' chosen images) train on ``--pairs``, AI-feedback pairs labelled
#: by the toy GenEval (the README main job's, ``data/toy-geneval-pairs``); DPO with the main job's settings.
METHOD_CONFIGS = {"prdp": "prdp.yaml", "ddpo": "ddpo.yaml", "grpo": "grpo.yaml", "draft_k": "draft_k.yaml",
                  "refl": "refl.yaml", "dpo": "dpo-geneval.yaml", "mapo": "mapo.yaml", "seppo": "seppo.yaml",
                  "nft": "nft.yaml"}
METHODS = tuple(METHOD_CONFIGS)
PAIR_METHODS = ("dpo", "mapo", "seppo")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def run_name(method: str, reward: str, seed: int, tag: str) -> str:
    return f"{method}-{slug(reward)}{'-' + tag if tag else ''}-seed{seed}"


def run_one(method: str, reward: str, seed: int, args) -> dict:
    from diffalign.config import load_config
    from diffalign.train import train

    out = Path(args.out) / run_name(method, reward, seed, args.tag)
    overrides = [f"train.output_dir={out}", f"train.seed={seed}", "log.progress_bar=false"]
    if method in PAIR_METHODS:  # the pairs say the reward; the judge below evaluates every run alike
        overrides += [f"data.source={args.pairs}", "eval.enabled=false", *args.pairs_override]
    else:
        overrides += [f"method.reward={reward}", "eval.scorers=[toy_geneval,toy_saturation]",
                      *args.online_override]
    cfg = load_config(f"configs/{args.configs}/{METHOD_CONFIGS[method]}", overrides)
    t0, cpu0 = time.time(), time.process_time()
    train(cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rewards = [m.get("reward_mean", m.get("implicit_acc")) for m in metrics if "loss" in m]
    return {
        "method": method,
        "reward": reward,
        "seed": seed,
        "tag": args.tag,
        "overrides": args.online_override,
        "run": str(out),
        "device": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)",
        "train_reward_first": rewards[0] if rewards else None,
        "train_reward_last": rewards[-1] if rewards else None,
        "minutes": (time.time() - t0) / 60,
        "cpu_minutes": (time.process_time() - cpu0) / 60,
    }


def evaluate(results: list[dict], args) -> dict:
    """Every run and the base on the same held-out captions and noise, at each evaluation guidance."""
    from diffalign.scorers import make_scorer
    from diffalign.toy.geneval import GenEvalSettings, load_models, toy_geneval

    specs = {"base": args.configs, **{Path(r["run"]).name: f"{r['run']}:lora" for r in results}}
    pipes = load_models(specs)
    names = (["toy_saturation"] if args.saturation else []) + args.eval_scorers
    scorers = {name: make_scorer(name) for name in names} or None
    out = {}
    for guidance in args.eval_guidance:
        settings = GenEvalSettings(splits=["heldout"], seeds=args.eval_seeds, num_prompts=args.eval_prompts,
                                   guidance_scale=guidance)
        out[f"{guidance:g}"] = toy_geneval(pipes, settings, base="base", scorers=scorers)["splits"]["heldout"]
    return out


def diagnose(args) -> list[dict]:
    """Per reward: mean, within-prompt spread, groups with distinct rewards, agreement with the GenEval
    fraction."""
    from scipy.stats import spearmanr

    from diffalign.config import load_config
    from diffalign.models import load_pipeline
    from diffalign.sampler import sample
    from diffalign.scorers import make_scorer
    from diffalign.toy.data import toy_prompts

    cfg = load_config("configs/toy-sdxl/prdp.yaml", args.online_override)
    m = cfg.method
    pipe = load_pipeline("toy-sdxl")
    pipe.set_progress_bar_config(disable=True)
    prompts = toy_prompts("train", args.diagnose_prompts, seed=1)
    k = m.samples_per_prompt
    jobs = [p for p in prompts for _ in range(k)]
    images = torch.cat(
        [
            sample(
                pipe,
                jobs[i : i + 32],
                seeds=list(range(i, min(i + 32, len(jobs)))),
                num_steps=m.num_steps,
                guidance_scale=m.guidance_scale,
                eta=m.eta,
            ).images
            for i in range(0, len(jobs), 32)
        ]
    )
    truth = make_scorer("toy_geneval:measure=fraction")(images, jobs).view(-1, k).numpy()
    rows = []
    for reward in args.rewards:
        r = make_scorer(reward)(images, jobs).view(-1, k).numpy()
        distinct = [g for g in range(len(prompts)) if np.ptp(r[g]) > 0]
        agree = [spearmanr(r[g], truth[g])[0] for g in distinct if np.ptp(truth[g]) > 0]
        rows.append(
            {
                "reward": reward,
                "guidance": m.guidance_scale,
                "mean": float(r.mean()),
                "within_prompt_std": float(r.std(axis=1).mean()),
                "groups_distinct": len(distinct) / len(prompts),
                "spearman_with_geneval_fraction": float(np.nanmean(agree)) if agree else float("nan"),
                "groups_compared": len(agree),
            }
        )
        print(json.dumps(rows[-1]))
    return rows


def table(results: list[dict], evaluation: dict) -> None:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = " / ".join(sorted({r["device"] for r in results}))
    for guidance, entry in evaluation.items():
        base = entry["accuracy"]["base"]
        print(
            f"\nheld-out toy GenEval at guidance {guidance} ({entry['n']} images); base all "
            f"{base['all']['mean']:.3f}"
        )
        print(
            "| run | train reward first -> last | tuned all | change all [95 %] | colour | shape | "
            "background | size | count | position | saturation base -> tuned | CPU min |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            label = Path(r["run"]).name
            change = entry["change"][label]
            sat = {k: v["toy_saturation"] for k, v in entry["scores"].items()} if "scores" in entry else {}
            print(
                f"| {label} | {r['train_reward_first']:.3f} -> {r['train_reward_last']:.3f} | "
                f"{entry['accuracy'][label]['all']['mean']:.3f} | {change['all']['mean']:+.3f} "
                f"[{change['all']['low']:+.3f}, {change['all']['high']:+.3f}] | "
                + " | ".join(
                    f"{change[n]['mean']:+.3f}"
                    for n in ("color", "shape", "background", "size", "count", "position")
                )
                + (f" | {sat['base']:.4f} -> {sat[label]:.4f}" if sat else " | -")
                + f" | {r['cpu_minutes']:.1f} |"
            )
        cells = sorted({(r["method"], r["reward"], r["tag"]) for r in results})
        print(
            f"\n| cell (guidance {guidance}) | seeds | change all (mean over seeds) | 95 % t-interval | "
            "machine, date |"
        )
        print("|---|---|---|---|---|")
        for method, reward, tag in cells:
            deltas = [entry["change"][Path(r["run"]).name]["all"]["mean"] for r in results
                      if (r["method"], r["reward"], r["tag"]) == (method, reward, tag)]
            print(
                f"| {method} {reward}{' ' + tag if tag else ''} | {len(deltas)} | "
                f"{statistics.mean(deltas):+.3f} | ± {interval(deltas)[1]:.3f} | {machine}, {date} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["prdp"], choices=METHODS)
    parser.add_argument("--rewards", nargs="+", default=["toy_faithfulness", "toy_geneval:measure=fraction"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--tag", default="", help="names a variant of the grid (with --online-override)")
    parser.add_argument(
        "--online-override", nargs="*", default=[], help="extra dotted.key=value for every online run"
    )
    parser.add_argument("--pairs", default="data/toy-geneval-pairs",
                        help="DPO / MaPO / SePPO: the pairs folder they train on")
    parser.add_argument("--pairs-override", nargs="*", default=[],
                        help="extra dotted.key=value for every DPO / MaPO / SePPO run")
    parser.add_argument("--eval-guidance", nargs="+", type=float, default=[1.0, 3.0])
    parser.add_argument("--eval-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--eval-prompts", type=int, default=None, help="held-out captions (default all 126)")
    parser.add_argument("--no-saturation", dest="saturation", action="store_false",
                        help="skip the second reward (toy_saturation) on the evaluation images")
    parser.add_argument("--eval-scorers", nargs="*", default=[],
                        help="more scorers on the evaluation images (e.g. a run's training reward, "
                             "toy_faithfulness), written to geneval.json")
    parser.add_argument("--diagnose", action="store_true", help="only the reward diagnosis (no training)")
    parser.add_argument("--diagnose-prompts", type=int, default=64)
    parser.add_argument("--eval-only", action="store_true", help="evaluate the finished runs under --out")
    parser.add_argument("--train-only", action="store_true",
                        help="train the missing runs, evaluate later (--eval-only judges them all at once)")
    parser.add_argument("--configs", default="toy-sdxl", choices=["toy-sdxl", "toy-sd3"],
                        help="the toy model and its config set: configs/CONFIGS/METHOD.yaml")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/toy-geneval")
    args = parser.parse_args()
    missing = [m for m in args.methods if not Path(f"configs/{args.configs}/{METHOD_CONFIGS[m]}").is_file()]
    if missing:
        parser.error(f"no configs/{args.configs}/ config for {', '.join(missing)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.diagnose:
        rows = diagnose(args)
        (out / f"diagnose{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(rows, indent=1))
        return
    if not args.eval_only:
        for method in args.methods:
            for reward in [f"pairs-{Path(args.pairs).name}"] if method in PAIR_METHODS else args.rewards:
                for seed in args.seeds:
                    result_file = out / run_name(method, reward, seed, args.tag) / "result.json"
                    if result_file.is_file():
                        continue
                    row = run_one(method, reward, seed, args)
                    print(json.dumps(row))
                    result_file.write_text(json.dumps(row))
    if args.train_only:
        return
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    if not results:
        parser.error(f"no finished runs under {out}")
    evaluation = evaluate(results, args)
    (out / "geneval.json").write_text(json.dumps({"runs": results, "evaluation": evaluation}, indent=1))
    table(results, evaluation)


if __name__ == "__main__":
    main()
