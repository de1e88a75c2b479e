"""LoRA on tiny SD3 / FLUX with the families' target lists, exported by ``save_lora`` and loaded by stock
``StableDiffusion3Pipeline.load_lora_weights`` / ``FluxPipeline.load_lora_weights``."""


import pytest
import torch
from diffusers import DiffusionPipeline
from helpers.lora_loading import load_messages, lost_keys
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from diffalign import export
from diffalign.flow_matching import LORA_TARGET_MODULES
from diffalign.tiny import cached_tiny


def _images(pipe):
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images



def _export_peft_keys(pipe, transformer, out):
    # What diffusers' train_dreambooth_lora_sd3.py / _flux.py write: PEFT key names as they are, through the
    # pipeline's own save_lora_weights (export.save_lora writes the same PEFT names).
    type(pipe).save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                 transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
                                 safe_serialization=True)


def _export_with_save_lora(pipe, transformer, out):
    export.save_lora(pipe, transformer, out)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_with_the_families_targets_round_trips_through_stock_load_lora_weights(kind, tmp_path):
    _check_round_trip(kind, _export_peft_keys, tmp_path)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_save_lora_round_trips_through_stock_load_lora_weights(kind, tmp_path, monkeypatch):
    # save_lora finds the denoiser through the sampler's family table; SD3/FLUX entries land with the
    # family-table restructure, until then the lookup is given the attribute those entries will hold.
    monkeypatch.setattr(export, "denoiser_attr", lambda _pipe: "transformer")
    _check_round_trip(kind, _export_with_save_lora, tmp_path)


def _check_round_trip(kind, export, tmp_path):
    path = cached_tiny(kind)
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    base = _images(pipe)
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=list(LORA_TARGET_MODULES[kind])))
    adapted = {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")}
    for target in LORA_TARGET_MODULES[kind]:  # every target adapts something (a misspelt one would not)
        assert any(name.endswith("." + target) for name in adapted), target
    with torch.no_grad():  # stand-in for training: gaussian init leaves lora_B at zero (no change)
        g = torch.Generator().manual_seed(1)
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    tuned = _images(pipe)
    assert not torch.allclose(tuned, base, atol=1e-4)

    export(pipe, transformer, tmp_path / "lora")
    saved = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("transformer.") for k in saved)
    assert len(saved) == 2 * len(adapted)  # lora_A and lora_B of every adapted module

    fresh = DiffusionPipeline.from_pretrained(path)
    fresh.set_progress_bar_config(disable=True)
    with load_messages() as messages:
        fresh.load_lora_weights(tmp_path / "lora")
    assert not lost_keys(messages), messages
    # every saved tensor bound, with its value
    loaded = get_peft_model_state_dict(fresh.transformer, adapter_name=fresh.get_active_adapters()[0])
    assert len(loaded) == len(saved)
    ours = get_peft_model_state_dict(transformer)
    for key, value in ours.items():
        assert torch.equal(loaded[key], value), key
    images = _images(fresh)
    assert not torch.allclose(images, base, atol=1e-4)
    torch.testing.assert_close(images, tuned, rtol=0, atol=1e-5)
