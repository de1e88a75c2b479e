"""Background scoring (ScoringQueue, method.async_scoring) and per-term normalisation of weighted sums."""

from __future__ import annotations

import threading

import pytest
import torch

from diffalign.methods.online_settings import OnlineSettings
from diffalign.objectives.online import RewardError, make_reward, sample_epoch
from diffalign.scorers import NormalizedScorer, check_scorer_names, make_scorer
from diffalign.scorers.async_scoring import ScoringQueue


def test_queue_returns_scores_in_order_and_overlaps_the_caller():
    reward = make_reward("brightness + 2*toy_saturation")
    batches = [torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    started, release = threading.Event(), threading.Event()

    def slow_first(images, prompts):
        if not started.is_set():
            started.set()
            assert release.wait(5)  # the caller must get on while batch 0 is being scored
        return reward(images, prompts)

    queue = ScoringQueue(slow_first)
    for batch in batches:
        queue.submit(batch, ["p"] * 3)
    assert started.wait(5)
    release.set()  # only reached because submit() never waited for batch 0
    assert torch.equal(queue.gather(), reward(torch.cat(batches), ["p"] * 12))


def test_queue_raises_the_first_error_and_stops():
    calls = []

    def failing(images, prompts):
        calls.append(len(images))
        if len(calls) == 2:
            raise RewardError("reward scorer 'x' raised ValueError: broken")
        return torch.zeros(len(images))

    queue = ScoringQueue(failing)
    queue.submit(torch.zeros(1, 3, 4, 4), ["a"])
    queue.submit(torch.zeros(2, 3, 4, 4), ["a", "b"])
    with pytest.raises(RewardError, match="broken"):
        queue.gather()
    with pytest.raises(RuntimeError):  # closed: a later submit cannot start work
        queue.submit(torch.zeros(1, 3, 4, 4), ["a"])


def test_async_sample_epoch_gives_the_same_rewards_as_synchronous(tiny_sdxl):
    prompts = ["a red cube", "a blue ball"]
    results = {}
    for async_scoring in (False, True):
        settings = OnlineSettings(
            num_prompts=2,
            samples_per_prompt=3,
            num_steps=2,
            guidance_scale=1.0,
            height=32,
            width=32,
            sample_batch_size=2,
            async_scoring=async_scoring,
        )
        trajectory, rewards, groups, timings = sample_epoch(
            tiny_sdxl,
            prompts,
            settings,
            list(range(6)),
            make_reward("brightness + 0.5*jpeg_incompressibility"),
        )
        results[async_scoring] = (trajectory.latents, rewards, groups)
    assert torch.equal(results[True][0], results[False][0])
    assert torch.equal(results[True][1], results[False][1])  # bitwise: same scorer calls on the same images
    assert torch.equal(results[True][2], results[False][2])


def test_zscore_normalises_each_term_with_running_statistics():
    scorer = make_scorer("brightness:normalize=zscore + 0.5*toy_saturation")
    normalized, raw = scorer.parts[0][1], scorer.parts[1][1]
    assert isinstance(normalized, NormalizedScorer) and not isinstance(raw, NormalizedScorer)
    assert normalized.differentiable  # statistics are constants: the gradient of a differentiable term stays
    first, second = torch.rand(8, 3, 4, 4), torch.rand(8, 3, 4, 4) * 0.5
    value = scorer.score(first)
    brightness = make_scorer("brightness").score(first)
    expected = (brightness - brightness.mean()) / brightness.std() + 0.5 * make_scorer(
        "toy_saturation"
    ).score(first)
    assert torch.allclose(value, expected, atol=1e-5)
    both = torch.cat([brightness, make_scorer("brightness").score(second)])
    # the second batch is standardised with the statistics of all 16 scores so far (a running z-score)
    assert torch.allclose(normalized.score(second), (both[8:] - both.mean()) / both.std(), atol=1e-5)
    nan_batch = torch.rand(2, 3, 4, 4)
    nan_batch[0] = float("nan")
    normalized.score(nan_batch)
    assert normalized.count == 17  # a NaN score never enters the statistics
    with pytest.raises(ValueError, match="normalize='rank'; expected one of none, zscore"):
        check_scorer_names(["brightness:normalize=rank"])


def test_zscore_makes_term_scales_comparable():
    # jpeg sizes are in kB (tens), brightness in [0, 1]: after z-scoring both have unit spread
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images[:8] *= 0.3
    scorer = make_scorer("brightness:normalize=zscore + jpeg_incompressibility:normalize=zscore")
    for _, part in scorer.parts:
        assert part.score(images).std().item() == pytest.approx(1.0, abs=1e-4)
