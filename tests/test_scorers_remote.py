"""Scorers as services: `diffalign serve-scorer` / ScorerServer and the `remote:URL` scorer, over real HTTP
on loopback (servers in threads or subprocesses; nothing mocked)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from helpers.services import ThreadServer, misbehaving_scorer_app

from diffalign.objectives.online import RewardError, filter_rewards, make_reward
from diffalign.scorers import make_scorer
from diffalign.scorers.server import ScorerServer
from diffalign.scorers.transport import TOKEN_HEADER, ServiceError

ROOT = Path(__file__).resolve().parents[1]
# tests stop by themselves quickly
FAST = "retries=1,backoff=0.05,max_backoff=0.1,connect_timeout=0.5,timeout=2"


def _images(n=6, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _toy_prompts(n):
    from diffalign.toy.data import toy_prompts

    return toy_prompts("train", n=n, seed=0)


def test_remote_combined_scorer_equals_in_process_and_batches():
    spec = "2*toy_saturation + toy_faithfulness"
    images = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = _toy_prompts(7)
    with ScorerServer(make_scorer(spec)) as server:
        remote = make_scorer(f"remote:{server.url},encoding=float32,batch_size=3,{FAST}")
        assert remote.needs_prompts  # read from /health: toy_faithfulness needs the captions
        assert torch.equal(remote.score(images, prompts), make_scorer(spec).score(images, prompts))
        health = requests.get(server.url + "/health", timeout=2).json()
        assert health["requests"] == 3 and health["images"] == 7  # 3 + 3 + 1
        # uint8 (the default) and PNG carry 8-bit pixels: equal to scoring the 8-bit images in-process
        quantized = (images * 255).round() / 255
        for encoding in ("uint8", "png"):
            values = make_scorer(f"remote:{server.url},encoding={encoding},{FAST}").score(images, prompts)
            assert torch.allclose(values, make_scorer(spec).score(quantized, prompts), atol=1e-6)
        with pytest.raises(ServiceError, match="needs one prompt per image"):
            make_scorer(f"remote:{server.url},{FAST}")._score(images[:2], None)


def test_server_refusals_are_clear_errors_not_retries():
    with ScorerServer(make_scorer("brightness"), token="s3cret", max_request_mb=0.01) as server:
        os.environ["TEST_SCORER_TOKEN"] = "wrong"
        try:
            with pytest.raises(ServiceError, match=r"401: missing or wrong token"):
                make_scorer(f"remote:{server.url},token_env=TEST_SCORER_TOKEN,{FAST}").score(_images(2))
            os.environ["TEST_SCORER_TOKEN"] = "s3cret"
            remote = make_scorer(f"remote:{server.url},token_env=TEST_SCORER_TOKEN,encoding=float32,{FAST}")
            assert torch.allclose(remote.score(_images(2)), make_scorer("brightness").score(_images(2)))
            with pytest.raises(ServiceError, match=r"413: Request Entity Too Large"):  # 0.01 MB limit
                remote.score(_images(2, size=64))
        finally:
            del os.environ["TEST_SCORER_TOKEN"]
        with pytest.raises(
            ValueError, match="token_env=NOT_SET_ANYWHERE names an environment variable that is not set"
        ):
            make_scorer(f"remote:{server.url},token_env=NOT_SET_ANYWHERE")
        headers = {TOKEN_HEADER: "s3cret"}
        bad = requests.post(server.url + "/score", data=b"not safetensors", headers={**headers,
                            "Content-Type": "application/x-safetensors"}, timeout=2)
        assert bad.status_code == 400 and "not a safetensors file" in bad.json()["error"]
        not_image = requests.post(
            server.url + "/score",
            files=[("images", ("a.png", b"GIF89a nope", "image/png"))],
            headers=headers,
            timeout=2,
        )
        assert not_image.status_code == 400 and "image 0 (a.png) cannot be read" in not_image.json()["error"]


def test_server_accepts_plain_multipart_pngs(tmp_path):
    from diffalign.images import to_pil

    images = _images(3)
    files = []
    for i, image in enumerate(to_pil(images)):
        image.save(tmp_path / f"{i}.png")
        files.append(("images", (f"{i}.png", (tmp_path / f"{i}.png").read_bytes(), "image/png")))
    with ScorerServer(make_scorer("brightness")) as server:
        answer = requests.post(server.url + "/score", files=files, timeout=2).json()
    expected = make_scorer("brightness").score((images * 255).round() / 255).tolist()
    assert answer["scores"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "mode,why", [("wrong_count", "wrong_count"), ("not_json", "not_json"), ("nan", "nonfinite")]
)
def test_bad_answers_score_nan_and_are_counted(mode, why):
    with ThreadServer(misbehaving_scorer_app(mode)) as server:
        remote = make_scorer(f"remote:{server.url},batch_size=4,{FAST}")
        scores = remote.score(_images(6))
    assert remote.bad_batches[why] == 2  # both batches (4 + 2 images)
    if mode == "nan":  # only the NaN/null entries are lost: images 0 and 1 of each batch
        assert torch.isnan(scores[[0, 1, 4, 5]]).all() and torch.isfinite(scores[[2, 3]]).all()
    else:
        assert torch.isnan(scores).all()


def test_timeouts_are_bounded_counted_and_hit_the_bad_reward_threshold():
    with ThreadServer(misbehaving_scorer_app("slow", sleep_s=1.5)) as server:
        remote = make_scorer(
            f"remote:{server.url},retries=1,backoff=0.05,max_backoff=0.1,connect_timeout=0.5,timeout=0.3"
        )
        start = time.perf_counter()
        rewards = remote.score(_images(4))
        elapsed = time.perf_counter() - start
    assert torch.isnan(rewards).all() and remote.bad_batches["timeout"] == 1
    assert elapsed < remote.give_up_after_s + 1.0  # two tries of at most connect + read timeout, plus slack
    with pytest.raises(RewardError, match="4 of 4 rewards are NaN/inf"):
        filter_rewards(rewards, torch.tensor([0, 0, 1, 1]), max_bad_fraction=0.25)


def test_retries_with_backoff_recover_from_503s():
    app = misbehaving_scorer_app("flaky", fail_times=2)
    with ThreadServer(app) as server:
        remote = make_scorer(
            f"remote:{server.url},retries=3,backoff=0.05,max_backoff=0.1,connect_timeout=0.5,timeout=2"
        )
        scores = remote.score(_images(3))
    assert app.config["calls"] == 3 and torch.isfinite(scores).all() and not remote.bad_batches
    with ThreadServer(misbehaving_scorer_app("flaky", fail_times=99)) as server:
        remote = make_scorer(f"remote:{server.url},{FAST}")
        assert torch.isnan(remote.score(_images(3))).all() and remote.bad_batches["unavailable"] == 1


def _start_cli_server(spec: str, *extra: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "diffalign", "serve-scorer", spec, "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    line = process.stdout.readline()  # "serving SPEC on URL (...)" once it listens
    assert " on http://" in line, line
    return process, line.split(" on ")[1].split()[0]


def test_cli_server_killed_mid_run_stops_with_a_clear_error_naming_the_url():
    process, url = _start_cli_server("brightness")
    try:
        reward = make_reward(f"remote:{url},encoding=float32,{FAST}")
        first = reward(_images(4), ["a"] * 4)
        assert torch.allclose(first, make_scorer("brightness").score(_images(4)))
    finally:
        process.kill()
        process.wait()
    start = time.perf_counter()
    with pytest.raises(
        RewardError, match=rf"cannot reach {url}/score after 2 tries.*Connection refused.*--resume latest"
    ):
        reward(_images(4), ["a"] * 4)
    assert time.perf_counter() - start < 5  # refused connections are retried a bounded number of times


def test_cli_serve_scorer_rejects_bad_input_with_status_2():
    from diffalign.cli import main

    assert main(["serve-scorer", "no_such_scorer"]) == 2
    assert main(["serve-scorer", "brightness", "--port", "70000"]) == 2
    assert main(["serve-scorer", "brightness", "--token-env", "DIFFALIGN_TEST_UNSET_VARIABLE"]) == 2
    with pytest.raises(ValueError, match="url must start with http"):
        make_scorer("remote:127.0.0.1:8000")
    with pytest.raises(ValueError, match="encoding='jpeg'"):
        make_scorer("remote:http://127.0.0.1:1,encoding=jpeg")


# ----------------------------------------------------------------------------------------------------
# End to end: PRDP trains from a reward served by another process
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_prdp_trains_from_a_reward_served_by_another_process(tmp_path, tiny_sdxl_path, capsys):
    import json

    from diffalign.cli import main

    server, url = _start_cli_server("brightness")
    try:
        out = tmp_path / "prdp-remote"
        code = main(
            [
                "train",
                str(ROOT / "configs" / "tiny-sdxl" / "prdp.yaml"),
                f"train.output_dir={out}",
                "train.max_steps=2",
                "method.gradient_steps_per_epoch=1",
                "method.num_prompts=1",
                "method.samples_per_prompt=3",
                "method.sample_batch_size=2",
                "method.num_steps=4",
                "method.train_timesteps=2",
                "method.async_scoring=true",
                f"method.reward=remote:{url},{FAST}",
                "eval.enabled=false",
                "log.every_n_steps=1",
                f"model.name={tiny_sdxl_path}",
            ]
        )
        health = requests.get(url + "/health", timeout=2).json()
    finally:
        server.kill()
        server.wait()
    assert code == 0 and (out / "pytorch_lora_weights.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(0 < m["reward_mean"] < 1 for m in metrics)  # brightness, scored remotely
    assert health["images"] == 2 * 3 and health["requests"] == 2 * 2  # 2 epochs x (2 + 1) samples in 2 calls
    # the server is gone now: the next run stops with the URL named, exit status 1, no traceback
    assert (
        main(
            [
                "train",
                str(ROOT / "configs" / "tiny-sdxl" / "prdp.yaml"),
                f"train.output_dir={tmp_path / 'down'}",
                "train.max_steps=1",
                "method.num_prompts=1",
                "method.samples_per_prompt=2",
                "method.num_steps=2",
                "method.train_timesteps=1",
                f"method.reward=remote:{url},{FAST}",
                "eval.enabled=false",
                f"model.name={tiny_sdxl_path}",
            ]
        )
        == 1
    )
    assert f"cannot reach {url}/health" in capsys.readouterr().err
