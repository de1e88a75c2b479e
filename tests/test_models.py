"""Model resolution and loading: built-in ids, local folders, hub ids (offline), dtype and VAE override."""

import pytest
import torch

from diffalign.models import load_pipeline, resolve_model


def test_resolve_classifies_without_loading(tmp_path):
    assert resolve_model("tiny-sdxl").kind == "builtin"
    assert resolve_model("stabilityai/stable-diffusion-xl-base-1.0").kind == "hub"
    (tmp_path / "model_index.json").write_text("{}")
    assert resolve_model(str(tmp_path)).kind == "local"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        resolve_model(str(tmp_path.parent))
    with pytest.raises(ValueError, match="unknown model 'tiny-xl'.*tiny-sdxl"):
        resolve_model("tiny-xl")
    with pytest.raises(ValueError, match="non-empty"):
        resolve_model("")


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not load 'nobody-here/no-such-model'.*local folder"):
        load_pipeline("nobody-here/no-such-model")


def test_dtype_and_vae_override(tiny_sdxl_path):
    pipe = load_pipeline(str(tiny_sdxl_path), dtype="bf16", vae=str(tiny_sdxl_path / "vae"))
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_pipeline(str(tiny_sdxl_path), dtype="float8")
