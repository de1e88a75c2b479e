"""The real-size random-weight architectures behind the GPU benchmarks match the public checkpoints'
shapes."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_size():
    spec = importlib.util.spec_from_file_location("real_size", ROOT / "benchmarks" / "real_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["sdxl", "animatediff", "sd3", "flux"])
def test_parameter_counts_match_the_public_checkpoints(real_size, kind):
    pipe = real_size.BUILDERS[kind]("meta")  # shapes only: nothing is allocated
    counts = real_size.parameter_counts(pipe, kind)
    for name, expected in real_size.EXPECTED_PARAMETERS[kind].items():
        if expected is not None:
            assert counts[name] == expected
    assert type(pipe).__name__ == {"sdxl": "StableDiffusionXLPipeline", "animatediff": "AnimateDiffPipeline",
                                   "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[kind]


def test_a_wrong_shape_is_named(real_size):
    pipe = real_size.BUILDERS["sdxl"]("meta")
    pipe.text_encoder_2.text_model.final_layer_norm.bias = None  # one parameter fewer
    with pytest.raises(AssertionError, match="text_encoder_2"):
        real_size.parameter_counts(pipe, "sdxl")


def test_a_missing_position_table_is_named(real_size):
    pipe = real_size.BUILDERS["sd3"]("meta")
    del pipe.transformer.pos_embed._buffers["pos_embed"]  # parameters intact, the stored table gone
    with pytest.raises(AssertionError, match="transformer stored"):
        real_size.parameter_counts(pipe, "sd3")


@pytest.mark.parametrize("kind", ["sdxl", "animatediff", "sd3", "flux"])
def test_building_reports_progress_part_by_part(real_size, kind):
    parts = []
    real_size.BUILDERS[kind]("meta", parts.append)
    assert len(parts) == real_size.STAGES[kind] and len(set(parts)) == len(parts)
