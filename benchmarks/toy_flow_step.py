"""toy-sd3's training step: the stock joint attention over its CLIP + 256 zero T5 tokens against the same
function with the zeros as one token counted 256 times (what ``diffalign toy pretrain-flow`` trains with and
the ``sd3`` family samples and trains with wherever the T5 states are zero).

    python benchmarks/toy_flow_step.py --threads 1 --repeats 5

Times forward + backward + AdamW of one batch (toy-sd3's default size, random init), both variants
interleaved in the same process; prints seconds per step and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffalign.flow_matching import RepeatedContextAttnProcessor
from diffalign.toy import data
from diffalign.toy.flow_model import build_flow_pipeline
from diffalign.toy.flow_pretrain import T5_ZERO_TOKENS, encode_captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = build_flow_pipeline()
    captions = data.toy_prompts("train", args.batch_size, seed=0)
    stock_embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device="cpu",
                                                    do_classifier_free_guidance=False)
    short_embeds, _ = encode_captions(pipe, captions)
    transformer = pipe.transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters())
    stock_processors = transformer.attn_processors
    x = torch.randn(args.batch_size, 4, 16, 16)
    t = torch.rand(args.batch_size) * 1000
    repeated = (RepeatedContextAttnProcessor(), short_embeds, {"context_repeats": T5_ZERO_TOKENS})
    variants = {f"stock ({stock_embeds.shape[1]} context tokens)": (stock_processors, stock_embeds, None),
                f"one repeated token ({short_embeds.shape[1]})": repeated}
    seconds = {name: [] for name in variants}
    for repeat in range(args.repeats + 1):
        for name, (processor, embeds, kwargs) in variants.items():
            # set_attn_processor empties a dict it is given: hand it a copy
            transformer.set_attn_processor(dict(processor) if isinstance(processor, dict) else processor)
            start = time.perf_counter()
            out = transformer(x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t,
                              joint_attention_kwargs=kwargs).sample
            out.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if repeat:  # the first round warms up
                seconds[name].append(time.perf_counter() - start)
    means = {name: sum(v) / len(v) for name, v in seconds.items()}
    for name, mean in means.items():
        print(f"{name}: {mean:.3f} s/step")
    stock, short = means.values()
    print(f"ratio stock / repeated: {stock / short:.2f}x")


if __name__ == "__main__":
    main()
