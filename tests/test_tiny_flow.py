"""Tiny SD3 and FLUX pipelines: the real classes, built offline, loaded and run by stock diffusers."""

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.models import load_pipeline, resolve_model
from diffalign.tiny import build_tiny_t5_tokenizer

CLASSES = {
    "sd3": {
        "pipeline": "StableDiffusion3Pipeline",
        "transformer": "SD3Transformer2DModel",
        "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "text_encoder_3": "T5EncoderModel",
        "vae": "AutoencoderKL",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
    },
    "flux": {
        "pipeline": "FluxPipeline",
        "transformer": "FluxTransformer2DModel",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
        "vae": "AutoencoderKL",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
    },
}


def _call(pipe, seed, **kwargs):
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def _build(kind, tmp_path_factory):
    out = tmp_path_factory.mktemp(kind) / "pipe"
    assert (
        main(["tiny", kind, str(out), "--seed", "3"]) == 0
    )  # the CLI, offline (conftest sets HF_HUB_OFFLINE)
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    return kind, out, pipe


@pytest.fixture(scope="module")
def built_sd3(tmp_path_factory):
    return _build("sd3", tmp_path_factory)


@pytest.fixture(scope="module")
def built_flux(tmp_path_factory):
    return _build("flux", tmp_path_factory)


@pytest.fixture(params=["sd3", "flux"])
def built(request):
    return request.getfixturevalue(f"built_{request.param}")


def test_stock_loading_gives_the_real_classes(built):
    kind, out, pipe = built
    assert type(pipe).__name__ == CLASSES[kind]["pipeline"]
    for name, cls in CLASSES[kind].items():
        if name != "pipeline":
            assert type(getattr(pipe, name)).__name__ == cls, name
    assert pipe.vae.config.latent_channels == 16
    # the CLIP tokenizers as the real repositories ship them; the T5 one as a tokenizer.json
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()
    t5_dir = out / ("tokenizer_3" if kind == "sd3" else "tokenizer_2")
    assert (t5_dir / "tokenizer.json").is_file()


def test_stock_call_runs_and_is_deterministic(built):
    kind, _, pipe = built
    a, b, c = _call(pipe, 0), _call(pipe, 0), _call(pipe, 1)
    assert a.shape == (1, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_same_seed_same_weights(built, tmp_path):
    kind, out, _ = built
    assert main(["tiny", kind, str(tmp_path / "again"), "--seed", "3"]) == 0
    assert main(["tiny", kind, str(tmp_path / "other"), "--seed", "4"]) == 0
    name = "transformer/diffusion_pytorch_model.safetensors"
    w, again, other = (load_file(p / name) for p in (out, tmp_path / "again", tmp_path / "other"))
    assert w.keys() == again.keys() and all(torch.equal(w[k], again[k]) for k in w)
    assert any(not torch.equal(w[k], other[k]) for k in w)


def test_sd3_wiring_is_sd3(built_sd3):
    _, _, pipe = built_sd3
    t = pipe.transformer.config
    assert (
        t.joint_attention_dim == pipe.text_encoder_3.config.d_model
    )  # CLIP states zero-padded to T5's width
    assert (
        t.joint_attention_dim >= pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert (
        t.pooled_projection_dim
        == pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    )
    assert t.in_channels == pipe.vae.config.latent_channels and t.qk_norm == "rms_norm"
    assert pipe.tokenizer_2.pad_token == "!"
    # CFG changes the image (SD3 has no guidance embedding)
    assert not torch.equal(_call(pipe, 0, guidance_scale=1.0), _call(pipe, 0, guidance_scale=7.0))


def test_flux_is_guidance_distilled_with_dynamic_shifting(built_flux):
    _, _, pipe = built_flux
    assert pipe.transformer.config.guidance_embeds  # FLUX.1-dev-like: guidance is an input, not CFG
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels  # packed 2x2
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.use_dynamic_shifting
    guided, other = _call(pipe, 0, guidance_scale=3.5), _call(pipe, 0, guidance_scale=1.0)
    assert torch.equal(guided, _call(pipe, 0, guidance_scale=3.5)) and not torch.equal(guided, other)


def test_t5_tokenizer_is_t5_shaped():
    tokenizer = build_tiny_t5_tokenizer()
    ids = tokenizer("a red circle", padding="max_length", max_length=8).input_ids
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    assert ids[:4] == tokenizer("a red circle").input_ids and ids[3] == 1 and ids[4:] == [0] * 4


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_builtin_ids_load(name):
    assert resolve_model(name).kind == "builtin"
    pipe = load_pipeline(name)
    assert type(pipe).__name__ == {"tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline"}[name]
