"""Asynchronous scoring: an online epoch's sampling + scoring time with ``method.async_scoring`` off and on.

    python benchmarks/async_scoring.py [--model tiny-sdxl] [--reward-spec pickscore:model=TINY] [--repeats 3]

The reward is served by a second process (``diffalign serve-scorer`` on loopback, one CPU thread),
standing in for a reward model on a second GPU, and used through ``remote:URL``. One epoch is
``diffalign.online.sample_epoch``: N prompts x B samples in sampling calls of ``--chunk`` samples. Synchronous
scoring scores the whole epoch after sampling; asynchronous scoring scores each call's images while the
next call samples. Both runs sample the same seeds and give the same rewards (checked here). Reported:
the best of ``--repeats`` epoch times each way and their ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def start_server(spec: str, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen([sys.executable, "-m", "diffalign", "serve-scorer", spec, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = process.stdout.readline()
    if " on http://" not in line:
        process.kill()
        raise RuntimeError(f"scorer server did not start: {line!r}")
    return process, line.split(" on ")[1].split()[0]


def save_mid_size_pickscore(out: Path) -> Path:
    """A PickScore-architecture CLIP (224 px, patch 14, GELU) of ViT-S width, random weights: a reward that
    costs about as much as sampling the tiny pipeline, the balance where background scoring matters."""
    from transformers import CLIPConfig, CLIPModel

    from diffalign.scorers.tiny_models import write_clip_processor

    common = dict(hidden_act="gelu", num_attention_heads=6)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=384,
            intermediate_size=1536,
            num_hidden_layers=4,
            **common,
        ),
        vision_config=dict(
            image_size=224,
            patch_size=14,
            hidden_size=384,
            intermediate_size=1536,
            num_hidden_layers=6,
            **common,
        ),
        projection_dim=256,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    write_clip_processor(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument(
        "--reward-spec",
        default=None,
        help="served spec (default: a ViT-S-width PickScore architecture, random weights, 224 px)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the sampling process")
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument(
        "--chunk", type=int, default=2, help="samples per sampling call (method.sample_batch_size)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffalign.methods.online_settings import OnlineSettings
    from diffalign.models import load_pipeline
    from diffalign.objectives.online import make_reward, sample_epoch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.reward_spec or f"pickscore:model={save_mid_size_pickscore(Path(tmp) / 'pickscore')}"
        server, url = start_server(spec, args.server_threads)
        try:
            pipe = load_pipeline(args.model, device=device)
            pipe.set_progress_bar_config(disable=True)
            reward = make_reward(f"remote:{url},encoding=uint8")
            prompts = [f"a photo of object {i}" for i in range(args.prompts)]
            seeds = list(range(args.prompts * args.per_prompt))
            times: dict[bool, list[float]] = {False: [], True: []}
            parts: dict[bool, dict] = {}
            rewards: dict[bool, torch.Tensor] = {}
            for repeat in range(args.repeats + 1):  # the first round warms up both paths
                for async_scoring in (False, True):
                    settings = OnlineSettings(
                        num_prompts=args.prompts,
                        samples_per_prompt=args.per_prompt,
                        num_steps=args.steps,
                        guidance_scale=5.0,
                        height=args.size,
                        width=args.size,
                        sample_batch_size=args.chunk,
                        async_scoring=async_scoring,
                    )
                    t0 = time.perf_counter()
                    _, values, _, timings = sample_epoch(pipe, prompts, settings, seeds, reward, args.model)
                    elapsed = time.perf_counter() - t0
                    if repeat and elapsed < min(times[async_scoring], default=float("inf")):
                        parts[async_scoring] = timings  # the split of the best epoch
                    if repeat:
                        times[async_scoring].append(elapsed)
                    rewards[async_scoring] = values
        finally:
            server.kill()
            server.wait()
    same = torch.allclose(rewards[False], rewards[True], atol=1e-6)
    sync_s, async_s = min(times[False]), min(times[True])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, load {load:.1f}, "
        f"{args.threads}+{args.server_threads} threads, {device}"
    )
    date = datetime.now(timezone.utc).date().isoformat()
    print(f"### Async scoring - {args.model}, {args.prompts}x{args.per_prompt} samples, {args.steps} steps, "
          f"{args.size} px, calls of {args.chunk}; reward `{args.reward_spec or 'ViT-S-width PickScore'}` "
          f"served on loopback ({machine}, {date})\n")
    print(
        f"| scoring | epoch (s, best of {args.repeats}) | of which waiting for scores (s) | vs synchronous |"
    )
    print("|---|---|---|---|")
    print(f"| synchronous | {sync_s:.3f} | {parts[False]['scoring_s']:.3f} | 1.00 |")
    print(f"| asynchronous | {async_s:.3f} | {parts[True]['scoring_s']:.3f} | {async_s / sync_s:.2f} |")
    print(
        f"\nsame rewards: {same}; time saved: {100 * (1 - async_s / sync_s):.0f} % of the synchronous epoch"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "date": date, "sync_s": times[False],
                                               "async_s": times[True], "same_rewards": same}, indent=2))


if __name__ == "__main__":
    main()
