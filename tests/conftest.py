"""Shared fixtures: tiny random-weight pipelines built offline, once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# pytest-xdist runs the suite in several worker processes: the cores are shared among them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory):
    """Keep built-in model builds inside the test session unless DIFFALIGN_CACHE is set; never reach a hub."""
    os.environ.setdefault("DIFFALIGN_CACHE", str(tmp_path_factory.mktemp("diffalign-cache")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    yield


@pytest.fixture(scope="session")
def tiny_sdxl_path(_offline_cache):
    from diffalign.tiny import cached_tiny

    return cached_tiny("sdxl")


@pytest.fixture(scope="session")
def tiny_sd_path(_offline_cache):
    from diffalign.tiny import cached_tiny

    return cached_tiny("sd")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_path):
    """A loaded tiny SDXL pipeline (fp32, CPU). Tests must not modify it in place."""
    from diffalign.models import load_pipeline

    pipe = load_pipeline(str(tiny_sdxl_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_path):
    from diffalign.models import load_pipeline

    pipe = load_pipeline(str(tiny_sd_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def one_thread():
    """The toy models' ops are tiny: a second thread costs more than it gives (a lot on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
