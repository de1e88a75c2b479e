"""The custom pipeline loads through stock diffusers' ``custom_pipeline=`` and returns trajectories."""

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from diffalign.sampler import Trajectory, recompute_log_probs

CUSTOM = Path(__file__).resolve().parents[1] / "pipelines" / "diffalign_sdxl"


def test_custom_pipeline_via_stock_diffusers(tiny_sdxl_path):
    pipe = DiffusionPipeline.from_pretrained(
        str(tiny_sdxl_path), custom_pipeline=str(CUSTOM), trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "DiffalignSDXLPipeline"

    plain = pipe("a cat", num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert plain.images.shape == (1, 3, 32, 32)

    out = pipe(["a cat", "a dog"], return_trajectory=True, num_inference_steps=3, eta=1.0, seeds=[0, 1])
    assert isinstance(out.trajectory, Trajectory)
    assert out.images.shape == (2, 3, 32, 32)
    assert out.trajectory.latents.shape == (2, 4, 4, 16, 16)
    with torch.no_grad():
        assert torch.allclose(
            recompute_log_probs(pipe.unet, out.trajectory), out.trajectory.log_probs, atol=1e-5
        )
    # the pipeline's own scheduler is left as it was
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_load_pipeline_requires_opt_in_for_custom_code(tiny_sdxl_path):
    import pytest

    from diffalign.models import load_pipeline

    with pytest.raises(ValueError, match="trust_remote_code"):
        load_pipeline(str(tiny_sdxl_path), custom_pipeline=str(CUSTOM))
    pipe = load_pipeline(str(tiny_sdxl_path), custom_pipeline=str(CUSTOM), trust_remote_code=True)
    assert type(pipe).__name__ == "DiffalignSDXLPipeline"
