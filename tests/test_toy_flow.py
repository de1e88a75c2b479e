"""toy-sd3: the flow-matching toy model (architecture, pretraining command, the shipped pipeline)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diffalign.toy import TOY_SD3_DIR, data

#: The shipped model must show these fractions of named attributes on 48 held-out prompts (chance: colour
#: 0.17, shape, background and count 0.33, position 0.2, all six 0.002). Measured on all 126 held-out prompts
#: (guidance 3, eta 1): colour 0.82, shape 0.84, background 1.00, count 0.84, position 1.00, all 0.51
#: (BENCHMARKS.md, "Toy flow model (toy-sd3)"); the floors sit 3-4 binomial standard deviations below.
MIN_COLOR_ACCURACY = 0.6
MIN_SHAPE_ACCURACY = 0.6
MIN_BACKGROUND_ACCURACY = 0.9
MIN_COUNT_ACCURACY = 0.6
MIN_POSITION_ACCURACY = 0.8
MIN_ALL_ACCURACY = 0.3


@pytest.fixture(scope="module")
def random_pipe():
    from diffalign.toy.flow_model import build_flow_pipeline

    pipe = build_flow_pipeline(seed=0, num_layers=2, num_heads=2)
    with torch.no_grad():  # a random init whose output depends on the text (AdaLN-zero starts it at zero)
        for p in pipe.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return pipe


def test_training_attention_with_one_repeated_token_equals_the_stock_pipeline_with_256_t5_zeros(
    random_pipe, one_thread
):
    from diffalign.flow_matching import use_repeated_context
    from diffalign.toy.flow_model import CLIP_TOKENS
    from diffalign.toy.flow_pretrain import T5_ZERO_TOKENS, encode_captions

    pipe = random_pipe
    captions = data.toy_prompts("train", 3, seed=0)
    # What StableDiffusion3Pipeline.__call__ feeds the transformer: the CLIP states, then the T5's 256,
    # all zero (as diffusers' own zeros without a T5).
    embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device="cpu",
                                              do_classifier_free_guidance=False)
    assert torch.equal(embeds[:, CLIP_TOKENS:], torch.zeros_like(embeds[:, CLIP_TOKENS:]))
    short, short_pooled = encode_captions(pipe, captions)  # the sd3 family's training encoding
    assert {type(p).__name__ for p in pipe.transformer.attn_processors.values()} == {"JointAttnProcessor2_0"}
    assert embeds.shape[1] == CLIP_TOKENS + T5_ZERO_TOKENS and short.shape[1] == CLIP_TOKENS + 1
    assert torch.equal(short_pooled, pooled) and torch.equal(short, embeds[:, :CLIP_TOKENS + 1])
    x, t = torch.randn(3, 4, 16, 16), torch.tensor([999.0, 500.0, 10.0])
    transformer = pipe.transformer
    with torch.no_grad():
        stock = transformer(x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t).sample
        processors = transformer.attn_processors
        assert use_repeated_context(transformer)
        try:
            collapsed = transformer(x, encoder_hidden_states=short, pooled_projections=pooled, timestep=t,
                                    joint_attention_kwargs={"context_repeats": T5_ZERO_TOKENS}).sample
            # without the count it is the stock processor, bit for bit
            again = transformer(x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t).sample
        finally:
            transformer.set_attn_processor(processors)
        # the count matters: the stock attention over the same tokens (the zero token counted once)
        wrong = transformer(x, encoder_hidden_states=short, pooled_projections=pooled, timestep=t).sample
    assert torch.equal(again, stock)
    assert stock.abs().mean() > 0.1
    torch.testing.assert_close(collapsed, stock, rtol=1e-4, atol=1e-5)
    assert (wrong - stock).abs().max() > 1e-3


def test_toy_sd3_reuses_toy_sdxl_vae_and_text_states(random_pipe):
    from diffusers import StableDiffusion3Pipeline

    from diffalign.models import load_pipeline

    sdxl = load_pipeline("toy-sdxl")
    pipe = random_pipe
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.vae.config.shift_factor == 0.0
    assert pipe.vae.config.scaling_factor == sdxl.vae.config.scaling_factor
    caption = "a small red circle on the left on a white background"
    ids = sdxl.tokenizer([caption], return_tensors="pt").input_ids
    with torch.no_grad():
        a = sdxl.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        b = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(a, b)


def test_toy_sd3_pads_captions_to_fewer_clip_tokens_with_the_same_caption_states(random_pipe):
    """CLIP is causal: the longest toy caption's states and the pooled output do not depend on the padding
    after it, so toy-sd3's tokenizers pad to CLIP_TOKENS instead of 77."""
    from diffalign.toy.flow_model import CLIP_TOKENS

    pipe = random_pipe
    longest = max(data.toy_prompts("train", 630, seed=0) + data.toy_prompts("heldout", 126, seed=0),
                  key=lambda c: len(pipe.tokenizer(c).input_ids))
    assert len(pipe.tokenizer(longest).input_ids) <= CLIP_TOKENS
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        assert tokenizer.model_max_length == CLIP_TOKENS
        padded = [tokenizer([longest], padding="max_length", max_length=n, return_tensors="pt").input_ids
                  for n in (CLIP_TOKENS, 77)]
        with torch.no_grad():
            short, full = (encoder(ids, output_hidden_states=True) for ids in padded)
        torch.testing.assert_close(short.hidden_states[-2], full.hidden_states[-2][:, :CLIP_TOKENS])
        torch.testing.assert_close(short[0], full[0])


@pytest.mark.slow
def test_pretrain_flow_resumes_exactly_where_it_stopped(tmp_path, one_thread, monkeypatch):
    from safetensors.torch import load_file

    from diffalign.toy import flow_pretrain
    from diffalign.toy.flow_pretrain import FlowPretrainConfig, pretrain_flow

    config = FlowPretrainConfig(num_images=16, num_layers=1, num_heads=2, steps=4, batch_size=4,
                                warmup_steps=1, checkpoint_every=2, eval_every=1000, eval_prompts=2)
    uninterrupted = pretrain_flow(tmp_path / "a", config, final_samples=False)

    real_save = flow_pretrain.save_checkpoint

    def save_then_die(folder, state, tensors):
        real_save(folder, state, tensors)
        if state["step"] == 2:
            raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(flow_pretrain, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain_flow(tmp_path / "b", config, final_samples=False)
    monkeypatch.undo()
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2
    # when it checkpoints and evaluates may change on resume; the steps it takes may not
    resumed = pretrain_flow(tmp_path / "b", dataclasses.replace(config, eval_every=3, checkpoint_every=3),
                            final_samples=False)
    assert "resuming from" in (tmp_path / "b" / "train.log").read_text()
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(uninterrupted / weights)), load_file(str(resumed / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    init = flow_pretrain.build_flow_pipeline(seed=0, num_layers=1, num_heads=2).transformer.state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a)  # it trained
    state = json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())
    assert state["stage"] == "done" and state["step"] == 4
    with pytest.raises(ValueError, match="other settings"):
        pretrain_flow(tmp_path / "a", FlowPretrainConfig(num_images=16, num_layers=1, num_heads=2, steps=5))


def test_pretrain_flow_command_rejects_bad_settings_in_one_line(tmp_path, capsys):
    from diffalign.cli import main

    assert main(["toy", "pretrain-flow", "--out", str(tmp_path / "run"), "--num-layers", "0"]) == 2
    err = capsys.readouterr().err
    assert "num_layers must be >= 1" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def toy_sd3():
    from diffusers import DiffusionPipeline

    # Stock diffusers, offline (conftest sets HF_HUB_OFFLINE), from the folder that ships in the package.
    pipe = DiffusionPipeline.from_pretrained(str(TOY_SD3_DIR))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_toy_sd3_loads_with_stock_diffusers_and_generates(toy_sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from diffalign.models import builtin_sampling_defaults, pipeline_class_name, resolve_model
    from diffalign.toy.flow_model import CLIP_TOKENS

    assert isinstance(toy_sd3, StableDiffusion3Pipeline)
    embeds = toy_sd3.encode_prompt(["a red circle"], None, None, do_classifier_free_guidance=False)[0]
    n = CLIP_TOKENS
    assert embeds.shape == (1, n + 256, 32) and embeds[:, :n].abs().sum() > 0 and not embeds[:, n:].any()
    assert isinstance(toy_sd3.scheduler, FlowMatchEulerDiscreteScheduler)
    source = resolve_model("toy-sd3")
    assert source.location() == str(TOY_SD3_DIR) and pipeline_class_name(source) == "StableDiffusion3Pipeline"
    assert builtin_sampling_defaults("toy-sd3") == {"num_steps": 20, "guidance_scale": 3.0}
    files = [p for p in TOY_SD3_DIR.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    out = toy_sd3("a large red circle in the center on a white background", num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()


@pytest.mark.slow
def test_shipped_toy_sd3_follows_its_captions(toy_sd3, one_thread):
    from diffalign.toy.evaluate import caption_accuracy
    from diffalign.toy.flow_model import DEFAULT_GUIDANCE, DEFAULT_NUM_STEPS

    result = caption_accuracy(toy_sd3, data.toy_prompts("heldout", 48, seed=0), seed=0,
                              num_steps=DEFAULT_NUM_STEPS, guidance_scale=DEFAULT_GUIDANCE)
    accuracy = result["accuracy"]
    assert accuracy["color"] >= MIN_COLOR_ACCURACY, accuracy
    assert accuracy["background"] >= MIN_BACKGROUND_ACCURACY, accuracy
    assert accuracy["count"] >= MIN_COUNT_ACCURACY, accuracy
    assert accuracy["position"] >= MIN_POSITION_ACCURACY, accuracy
    assert accuracy["shape"] >= MIN_SHAPE_ACCURACY, accuracy
    assert accuracy["all"] >= MIN_ALL_ACCURACY, accuracy


def test_toy_eval_accepts_toy_sd3(tmp_path, capsys, one_thread):
    from diffalign.cli import main

    out = tmp_path / "report.json"
    argv = ["toy", "eval", "--model", "toy-sd3", "--base", "toy-sdxl", "--num-prompts", "3", "--steps", "2",
            "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["models"] == {"base": "toy-sdxl", "model": "toy-sd3"}
    assert report["splits"]["heldout"]["n"] == 3
    assert "toy GenEval, heldout split: 3 images" in capsys.readouterr().out
