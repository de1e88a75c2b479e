"""Scorer throughput: images per second scored in batches vs one image at a time, same model, same run.

Uses the tiny random-weight scorer models (224 px inputs like the real ones, small widths), so the ratio
measures what batching saves in preprocessing, tokenization and per-call overhead, not big-model FLOPs.
Both input kinds are timed: PIL images (the exact path) and a float tensor batch (the differentiable path).

    python benchmarks/scorers.py --images 32 --batch-size 16 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from diffalign.images import to_pil
from diffalign.scorers import make_scorer
from diffalign.scorers.tiny_models import TINY_SCORER_KINDS, save_tiny_scorer


def interleaved_medians(repeats: int, *fns) -> list[float]:
    """Median seconds of each function, the runs interleaved so that load drift hits all of them alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=512, help="side of the (square) input images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=list(TINY_SCORER_KINDS), choices=TINY_SCORER_KINDS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    tensors = torch.rand(args.images, 3, args.size, args.size, generator=generator)
    pils = to_pil(tensors)
    prompts = [f"a photo of object number {i} on a table" for i in range(args.images)]
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} "
        f"thread(s), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {args.images} images {args.size}px, "
        f"batch {args.batch_size}"
    )
    print("| scorer | input | one at a time (img/s) | batched (img/s) | batched / one |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            scorer = make_scorer(f"{kind}:model={save_tiny_scorer(kind, Path(tmp) / kind)}")
            for label, images in (("PIL", pils), ("tensor", tensors)):
                def one_by_one(images=images, scorer=scorer):
                    for i in range(args.images):
                        scorer.score(images[i : i + 1], prompts[i : i + 1])

                def batched(images=images, scorer=scorer):
                    scorer.batch_size = args.batch_size
                    scorer.score(images, prompts)

                with torch.no_grad():
                    batched()  # warm-up
                    single_s, batch_s = interleaved_medians(args.repeats, one_by_one, batched)
                print(f"| {kind} | {label} | {args.images / single_s:.1f} | {args.images / batch_s:.1f} | "
                      f"{single_s / batch_s:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
