"""Toy model benchmark: how well ``toy-sdxl`` follows its captions, against chance and the reader's ceiling.

    python benchmarks/toy_model.py [--model toy-sdxl] [--num-prompts 126] [--guidance 1 3 5] [--threads 1]

For each split (train captions, held-out attribute combinations) and guidance scale, samples one image
per prompt and reads its attributes back (``diffalign.toy.evaluate``). Also prints the reward spread of the
toy scorers over the base model's samples (what a preference method has to work with). Prints markdown.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from diffalign.models import load_pipeline
from diffalign.sampler import sample
from diffalign.scorers import make_scorer
from diffalign.toy import data
from diffalign.toy.evaluate import ATTRIBUTES, attribute_hits, chance_levels, dataset_accuracy, summarize
from diffalign.toy.model import DEFAULT_NUM_STEPS, count_parameters


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy-sdxl")
    parser.add_argument("--num-prompts", type=int, default=126)
    parser.add_argument("--steps", type=int, default=DEFAULT_NUM_STEPS)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    print(
        f"## {args.model}: caption-attribute accuracy ({platform.machine()}, {torch.get_num_threads()} "
        f"threads, {date.today()})\n"
    )
    print(
        f"parameters: unet {count_parameters(pipe.unet):,}, vae {count_parameters(pipe.vae):,}, text "
        f"encoders {count_parameters(pipe.text_encoder):,} + {count_parameters(pipe.text_encoder_2):,}\n"
    )
    header = "| split | guidance | " + " | ".join(ATTRIBUTES) + " | all | s/image |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    chance = chance_levels()
    print(
        "| chance | - | "
        + " | ".join(f"{chance[a]:.3f}" for a in ATTRIBUTES)
        + f" | {chance['all']:.4f} | - |"
    )
    ceiling = dataset_accuracy(512, seed=0, split="heldout")
    print("| dataset renders (reader ceiling) | - | " + " | ".join(f"{ceiling[a]:.3f}" for a in ATTRIBUTES)
          + f" | {ceiling['all']:.3f} | - |")
    scorers = [make_scorer(n) for n in ("toy_faithfulness", "toy_saturation", "jpeg_compressibility")]
    spreads = {}
    for split in ("train", "heldout"):
        prompts = data.toy_prompts(split, args.num_prompts, seed=0)
        for guidance in args.guidance:
            start = time.perf_counter()
            rows, images_all = [], []
            for i in range(0, len(prompts), 32):
                chunk = prompts[i : i + 32]
                images = sample(pipe, chunk, seeds=list(range(i, i + len(chunk))), num_steps=args.steps,
                                guidance_scale=guidance, eta=1.0).images
                rows += attribute_hits(images, chunk)
                images_all.append(images)
            seconds = (time.perf_counter() - start) / len(prompts)
            acc = summarize(rows)
            print(f"| {split} | {guidance:g} | " + " | ".join(f"{acc[a]:.3f}" for a in ATTRIBUTES)
                  + f" | {acc['all']:.3f} | {seconds:.3f} |")
            images = torch.cat(images_all)
            spreads[(split, guidance)] = {s.name: s(images, prompts) for s in scorers}
    print("\nToy rewards over the base model's samples (mean ± std across images):\n")
    print("| split | guidance | " + " | ".join(s.name for s in scorers) + " |")
    print("|---|---|" + "---|" * len(scorers))
    for (split, guidance), values in spreads.items():
        print(f"| {split} | {guidance:g} | "
              + " | ".join(f"{v.mean():.4f} ± {v.std():.4f}" for v in values.values()) + " |")


if __name__ == "__main__":
    main()
