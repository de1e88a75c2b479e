"""The ``sd3`` and ``flux`` families: the stock StableDiffusion3Pipeline / FluxPipeline sample through the
trajectory sampler (noise level 0 reproduces them exactly), log-probs recompute exactly, bad requests fail
with one line before sampling, and pair methods train end to end on the tiny models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from helpers.lora_loading import load_messages, lost_keys
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from diffalign.families import FAMILIES, family_of
from diffalign.models import BUILTIN_MODELS, LORA_WEIGHTS_FILE, load_pipeline
from diffalign.sampler import Trajectory, recompute_log_probs, sample
from diffalign.sampling import SamplingSettings
from diffalign.steps import FlowEulerStep

PROMPTS = ["a red circle on a blue background", "a yellow square"]


@pytest.fixture(scope="module")
def tiny_sd3(_offline_cache):
    pipe = load_pipeline("tiny-sd3")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_flux(_offline_cache):
    pipe = load_pipeline("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(params=["sd3", "flux"])
def family_pipe(request):
    return request.param, request.getfixturevalue(f"tiny_{request.param}")


def _stock_latents(pipe, family: str, seeds, guidance_scale, num_steps=4):
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(prompt=PROMPTS, num_inference_steps=num_steps, guidance_scale=guidance_scale,
               generator=generator, height=32, width=32, output_type="latent")
    return out.images


def test_family_of_and_sizes_default_from_the_model(family_pipe):
    name, pipe = family_pipe
    assert family_of(pipe) is FAMILIES[name]
    settings = SamplingSettings().for_model(pipe, f"tiny-{name}")
    assert (settings.height, settings.width) == (32, 32)
    # the pipeline's own default (FLUX: default_sample_size x the VAE factor), what a stock call uses
    own = {"sd3": 32, "flux": 128 * pipe.vae_scale_factor}[name]
    assert FAMILIES[name].default_size(pipe) == {"height": own, "width": own}


@pytest.mark.parametrize("rule", ["euler", "sde0"])
def test_noise_level_zero_reproduces_the_stock_pipeline(family_pipe, rule):
    name, pipe = family_pipe
    guidance = 4.0  # SD3: CFG; FLUX: the guidance embedding
    expected = _stock_latents(pipe, name, [0, 1], guidance)
    step_rule = FlowEulerStep() if rule == "euler" else None
    out = sample(pipe, PROMPTS, seeds=[0, 1], num_steps=4, guidance_scale=guidance, eta=0.0,
                 step_rule=step_rule, height=32, width=32, decode=False)
    traj = out.trajectory
    assert traj.family == name
    assert torch.equal(traj.latents[:, -1], expected)
    assert not traj.stochastic.any()
    if name == "sd3":
        assert traj.do_cfg and set(traj.cond) == {"encoder_hidden_states", "pooled_projections"}
    else:
        # packed: (32 / VAE factor 2 / 2)^2 = 64 tokens of 4 x 16 channels
        assert not traj.do_cfg and traj.latents.shape[2:] == (64, 64)
        assert torch.equal(traj.cond["guidance"], torch.full((2,), guidance))


def test_stochastic_steps_recompute_exactly(family_pipe, tmp_path):
    name, pipe = family_pipe
    out = sample(pipe, PROMPTS, seeds=[3, 4], num_steps=4, guidance_scale=3.5, eta=0.7, height=32, width=32,
                 decode=False)
    traj = out.trajectory
    assert traj.log_probs.dtype == torch.float32 and traj.log_probs.shape == (2, 4)
    assert traj.stochastic.all()  # Flow-GRPO's rule puts noise on every step, the last one too
    again = sample(pipe, PROMPTS, seeds=[3, 4], num_steps=4, guidance_scale=3.5, eta=0.0, height=32, width=32,
                   decode=False).trajectory
    assert not torch.allclose(again.latents[:, -1], traj.latents[:, -1])
    denoiser = pipe.transformer
    with torch.no_grad():
        one = recompute_log_probs(denoiser, traj, chunk_size=1)
        chunked = recompute_log_probs(denoiser, traj, chunk_size=3)
    torch.testing.assert_close(one, traj.log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, traj.log_probs, atol=1e-5, rtol=0)
    assert (one - traj.log_probs).exp().sub(1).abs().max() < 1e-5
    traj.save(tmp_path / "t.safetensors")
    loaded = Trajectory.load(tmp_path / "t.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(recompute_log_probs(denoiser, loaded, chunk_size=2), traj.log_probs,
                                   atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Bad input: one line before sampling
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ask", [{"negative_prompt": "blurry"}, {"true_cfg_scale": 4.0}])
def test_cfg_asked_of_flux_is_one_line(tiny_flux, ask):
    with pytest.raises(ValueError, match="guidance-distilled") as err:
        sample(tiny_flux, PROMPTS, seeds=[0, 1], num_steps=2, height=32, width=32, decode=False, **ask)
    assert "\n" not in str(err.value) and "FluxPipeline" in str(err.value)
    assert not hasattr(tiny_flux.scheduler, "records")  # the stock scheduler: nothing was sampled


@pytest.mark.parametrize(("name", "size", "multiple"), [("sd3", 30, 4), ("flux", 34, 4)])
def test_size_not_divisible_by_patch_and_vae_factor_is_one_line(request, name, size, multiple):
    # SD3: VAE factor 2 x patch 2; FLUX: VAE factor 2 x patch 1 x 2x2 packing
    pipe = request.getfixturevalue(f"tiny_{name}")
    with pytest.raises(ValueError, match=f"height={size}, width=32: .* divisible by {multiple}") as err:
        sample(pipe, PROMPTS, seeds=[0, 1], num_steps=2, height=size, width=32, decode=False)
    assert "\n" not in str(err.value)


def test_unknown_pipeline_is_not_supported_by_name(tiny_sd3):
    from diffusers import StableDiffusion3Img2ImgPipeline

    img2img = StableDiffusion3Img2ImgPipeline(**tiny_sd3.components)
    with pytest.raises(NotImplementedError, match="does not support StableDiffusion3Img2ImgPipeline"):
        family_of(img2img)


# ----------------------------------------------------------------------------------------------------
# Training: pair methods end to end through `diffalign train`, LoRA loaded by stock load_lora_weights
# ----------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]



@pytest.mark.parametrize(("name", "method"),
                         [("sd3", "dpo"), ("flux", "dpo"), ("sd3", "mapo"), ("flux", "mapo")])
def test_pair_method_trains_and_its_lora_loads_in_the_stock_pipeline(name, method, tmp_path):
    out = tmp_path / "run"
    overrides = [f"train.output_dir={out}", "train.max_steps=2", "optim.learning_rate=2e-2",
                 "optim.lr_warmup_steps=0", "log.validation_every_n_steps=0", "log.progress_bar=false",
                 "checkpoint.every_n_steps=0", "eval.seeds=[0]", "eval.train_pairs=0",
                 "eval.num_steps=2", "eval.prompts=[a red circle on a blue background]"]
    config = ROOT / "configs" / f"tiny-{name}" / f"{method}.yaml"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "diffalign", "train", str(config), *overrides], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(metrics["loss"])

    user_pipe = DiffusionPipeline.from_pretrained(str(BUILTIN_MODELS[f"tiny-{name}"]()))
    user_pipe.set_progress_bar_config(disable=True)

    def latents():
        return user_pipe(prompt=PROMPTS[:1], num_inference_steps=2, height=32, width=32, output_type="latent",
                         generator=torch.Generator().manual_seed(0)).images

    base = latents()
    with load_messages() as messages:
        user_pipe.load_lora_weights(out)
    assert not lost_keys(messages), messages
    saved = load_file(str(out / LORA_WEIGHTS_FILE))
    loaded = get_peft_model_state_dict(user_pipe.transformer, adapter_name="default_0")
    assert len(loaded) == len(saved) > 0
    targets = {k.split(".lora_")[0].split(".", 1)[1] for k in loaded}
    assert any(t.endswith("attn.add_q_proj") for t in targets)  # the joint attention's context side
    if name == "flux":
        assert any(t.endswith("ff_context.net.2") for t in targets)
    assert (latents() - base).abs().max() > 0, "the trained LoRA does not change the stock pipeline's output"


ONLINE_SHORT = ["method.num_steps=3", "method.train_timesteps=null", "method.samples_per_prompt=2",
                "method.num_prompts=2", "method.gradient_steps_per_epoch=1"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prdp", "ddpo", "seppo"])
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_online_and_winner_methods_train_on_flow_families(name, method, tmp_path):
    """PRDP and DDPO (sample with the family's SDE, recompute, update) and SePPO (the reference samples the
    loser; FLUX's packed sample goes back to the training layout) run 2 steps and write a LoRA that moved."""
    from safetensors.torch import load_file

    from diffalign.flow_matching import LORA_TARGET_MODULES

    guidance = ["method.guidance_scale=3.5"] if name == "flux" else []
    extra = (["method.ref_num_steps=2", *(["method.ref_guidance_scale=3.5"] if name == "flux" else [])]
             if method == "seppo" else [*ONLINE_SHORT, *guidance])
    out = tmp_path / "run"
    targets = ",".join(LORA_TARGET_MODULES[name])
    result = subprocess.run(
        [sys.executable, "-m", "diffalign", "train", str(ROOT / "configs" / "tiny-sdxl" / f"{method}.yaml"),
         f"model.name=tiny-{name}", f"train.output_dir={out}", "train.max_steps=2", "eval.enabled=false",
         "log.progress_bar=false", "log.every_n_steps=1", f"lora.target_modules=[{targets}]", *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(v) for v in losses)
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())


# ----------------------------------------------------------------------------------------------------
# Without T5: SD3 may drop it (diffusers: zeros, a warning once), FLUX cannot (one line, nothing sampled)
# ----------------------------------------------------------------------------------------------------
def test_sd3_without_t5_samples_with_zero_t5_states_and_warns_once(tiny_sd3, caplog):
    no_t5 = type(tiny_sd3)(**{**tiny_sd3.components, "text_encoder_3": None, "tokenizer_3": None})
    no_t5.set_progress_bar_config(disable=True)
    with caplog.at_level("WARNING", logger="diffalign.families"):
        first = sample(no_t5, PROMPTS, seeds=[0, 1], num_steps=2, height=32, width=32, decode=False)
        sample(no_t5, PROMPTS, seeds=[0, 1], num_steps=2, height=32, width=32, decode=False)
    warnings = [r.getMessage() for r in caplog.records if "without T5" in r.getMessage()]
    assert len(warnings) == 1 and "text_encoder_3 is None" in warnings[0]
    embeds = first.trajectory.cond["encoder_hidden_states"]
    clip_tokens = 77  # CLIP-L/G states first, then T5's 256 zeros, here as one zero token counted 256 times
    assert embeds.shape[1] == clip_tokens + 1
    assert embeds[:, clip_tokens:].abs().max() == 0 and embeds[:, :clip_tokens].abs().max() > 0
    with_t5 = sample(tiny_sd3, PROMPTS, seeds=[0, 1], num_steps=2, height=32, width=32, decode=False)
    assert with_t5.trajectory.cond["encoder_hidden_states"].shape[1] == clip_tokens + 256
    assert "context_repeats" not in with_t5.trajectory.cond
    # the training captions' encoding agrees with the sampler's
    cond = FAMILIES["sd3"].encode_prompt(no_t5, PROMPTS, "cpu")
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    assert cond["context_repeats"].tolist() == [256.0, 256.0]


def test_sd3_zero_t5_states_as_one_repeated_token_are_the_stock_pipeline(tiny_sd3):
    """Without T5 the stock pipeline feeds 256 identical zero states; the family feeds one, counted 256 times
    in attention (RepeatedContextAttnProcessor): the same latents up to float rounding, exact recompute,
    and the stock processors' results unchanged for calls without the count."""
    no_t5 = type(tiny_sd3)(**{**tiny_sd3.components, "text_encoder_3": None, "tokenizer_3": None})
    no_t5.set_progress_bar_config(disable=True)
    no_t5.transformer.set_attn_processor(JointAttnProcessor2_0())
    stock_with_t5 = _stock_latents(tiny_sd3, "sd3", [0, 1], 4.0)
    stock = _stock_latents(no_t5, "sd3", [0, 1], 4.0)
    out = sample(no_t5, PROMPTS, seeds=[0, 1], num_steps=4, guidance_scale=4.0, eta=0.0, height=32, width=32,
                 decode=False)
    traj = out.trajectory
    assert traj.do_cfg and traj.cond["encoder_hidden_states"].shape[1] == 78
    assert traj.uncond["context_repeats"].tolist() == [256.0, 256.0]
    assert {type(p).__name__ for p in no_t5.transformer.attn_processors.values()} == {
        "RepeatedContextAttnProcessor"}
    torch.testing.assert_close(traj.latents[:, -1], stock, rtol=1e-4, atol=1e-5)
    assert (stock - traj.latents[:, 0]).abs().max() > 0.1  # it denoised
    # stock calls (no count) on the same transformer are bit-exact as before
    assert torch.equal(_stock_latents(tiny_sd3, "sd3", [0, 1], 4.0), stock_with_t5)
    noisy = sample(no_t5, PROMPTS, seeds=[3, 4], num_steps=4, guidance_scale=4.0, eta=0.7, height=32,
                   width=32, decode=False).trajectory
    with torch.no_grad():
        again = recompute_log_probs(no_t5.transformer, noisy, chunk_size=3)
    torch.testing.assert_close(again, noisy.log_probs, atol=1e-5, rtol=0)


class _UsersProcessor(JointAttnProcessor2_0):
    """A processor of the user's (as IP-Adapter's would be): a repeated token cannot be counted there."""


def test_sd3_zero_t5_states_stay_whole_under_a_users_attention_processor(tiny_sd3):
    no_t5 = type(tiny_sd3)(**{**tiny_sd3.components, "text_encoder_3": None, "tokenizer_3": None})
    no_t5.set_progress_bar_config(disable=True)
    processors = no_t5.transformer.attn_processors
    no_t5.transformer.set_attn_processor(_UsersProcessor())
    try:
        traj = sample(no_t5, PROMPTS, seeds=[0, 1], num_steps=2, height=32, width=32, decode=False).trajectory
        assert traj.cond["encoder_hidden_states"].shape[1] == 77 + 256 and "context_repeats" not in traj.cond
        collapsed = {"encoder_hidden_states": traj.cond["encoder_hidden_states"][:, :78],
                     "pooled_projections": traj.cond["pooled_projections"],
                     "context_repeats": torch.full((2,), 256.0)}
        with pytest.raises(ValueError, match="needs the stock joint attention processors"):
            t = traj.timesteps[:1].expand(2)
            FAMILIES["sd3"].call(no_t5.transformer, traj.latents[:, 0], t, collapsed)
    finally:
        no_t5.transformer.set_attn_processor(processors)


def test_t5_encoder_without_its_tokenizer_is_one_line(tiny_sd3):
    broken = type(tiny_sd3)(**{**tiny_sd3.components, "tokenizer_3": None})
    with pytest.raises(ValueError, match="text_encoder_3 .* but no tokenizer_3") as err:
        sample(broken, PROMPTS, seeds=[0, 1], num_steps=2, height=32, width=32, decode=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dropped", [("text_encoder_2", "tokenizer_2"), ("text_encoder_2",)])
def test_flux_without_t5_is_one_line_before_sampling(tiny_flux, dropped):
    no_t5 = type(tiny_flux)(**{**tiny_flux.components, **dict.fromkeys(dropped)})
    calls = []
    hook = no_t5.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="FluxPipeline has no T5 .* cannot drop it") as err:
            sample(no_t5, PROMPTS, seeds=[0, 1], num_steps=2, height=32, width=32, decode=False)
        assert "\n" not in str(err.value) and not calls
        with pytest.raises(ValueError, match="has no T5"):  # training captions too
            FAMILIES["flux"].encode_prompt(no_t5, PROMPTS, "cpu")
    finally:
        hook.remove()
