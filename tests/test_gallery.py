"""Gallery runs: same noise across models, statistics, resume, failures, bad input, and the page in
Chromium."""

from __future__ import annotations

import base64
import csv
import fcntl
import io
import json
import math
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.gallery import load_prompts, run_gallery, select_prompts
from diffalign.gallery.run import Manifest, load_media, save_media, score_media, write_results
from diffalign.gallery.stats import compute_stats, mean_ci, student_t_quantile, wilson_interval, win_rate
from diffalign.prompt_sets import known_prompt_sets, prompts_dir
from diffalign.sampler import sample
from diffalign.sampling import SamplingSettings
from diffalign.scorers import make_scorer

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
FAST = dict(sampling=SamplingSettings(num_steps=3, guidance_scale=3.0), progress=False)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def tiny_sdxl_seed1(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny1") / "tiny-sdxl-seed1"
    assert main(["tiny", "sdxl", str(out), "--seed", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def cli_gallery(tmp_path_factory, tiny_sdxl_path, tiny_sdxl_seed1):
    """One gallery made with the command: base vs another tiny model, two scorers."""
    prompt_file = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path_factory.mktemp("gallery") / "out"
    code = main(
        [
            "gallery",
            "--model",
            f"base={tiny_sdxl_path}",
            "--model",
            f"tuned={tiny_sdxl_seed1}",
            "--prompts",
            str(prompt_file),
            "--scorer",
            "brightness",
            "--scorer",
            "jpeg_compressibility",
            "--images-per-prompt",
            "2",
            "--seed",
            "7",
            "--steps",
            "3",
            "--guidance",
            "3",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


# ----------------------------------------------------------------------------------------------------
# Statistics against hand-computed values
# ----------------------------------------------------------------------------------------------------
def test_student_t_quantiles_match_tables():
    assert student_t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-5)
    assert student_t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    assert student_t_quantile(0.975, 9) == pytest.approx(2.262157, abs=1e-6)
    assert student_t_quantile(0.025, 9) == pytest.approx(-2.262157, abs=1e-6)


def test_mean_ci_is_over_prompt_means():
    scores = {0: [1.0, 3.0], 1: [5.0, 5.0], 2: [2.0, 4.0]}  # prompt means 2, 5, 3
    result = mean_ci(scores)
    assert result["mean"] == pytest.approx(20 / 6)
    sd = math.sqrt(((2 - 10 / 3) ** 2 + (5 - 10 / 3) ** 2 + (3 - 10 / 3) ** 2) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    assert result["ci_low"] == pytest.approx(10 / 3 - half, abs=1e-5)
    assert result["ci_high"] == pytest.approx(10 / 3 + half, abs=1e-5)
    assert (result["n_images"], result["n_prompts"]) == (6, 3)
    one = mean_ci({0: [1.0, 2.0]})
    assert one["mean"] == 1.5 and one["ci_low"] is None  # one prompt: no interval


def test_win_rate_counts_ties_as_half_with_wilson_interval():
    a = {0: [1.0], 1: [2.0], 2: [3.0], 3: [4.0]}
    b = {0: [0.0], 1: [2.0], 2: [5.0], 3: [1.0]}  # A - B: +1, 0, -2, +3
    result = win_rate(a, b)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate"] == pytest.approx(2.5 / 4)
    z, n, p = 1.959964, 4, 0.625
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((center - half, center + half), abs=1e-5)
    assert result["mean_diff"] == pytest.approx(0.5)
    lower = win_rate(a, b, higher_is_better=False)  # smaller scores win
    assert (lower["wins"], lower["ties"], lower["losses"]) == (1, 1, 2)
    assert wilson_interval(7, 10) == pytest.approx((0.396778, 0.892209), abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# Generation: same noise per (prompt, image) for every model
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_same_noise_for_every_model(tmp_path, tiny_sdxl_path, tiny_sdxl_seed1, tiny_sdxl):
    # "a" is a pipeline object (as from a training loop), "a_again" the same weights loaded from disk
    models = {"a": tiny_sdxl, "a_again": str(tiny_sdxl_path), "other": str(tiny_sdxl_seed1)}
    summary = run_gallery(models, PROMPTS[:2], ["brightness"], tmp_path, images_per_prompt=2, seed=3,
                          batch_size=3, write_page=False, **FAST)
    assert summary["generated"] == {"a": 4, "a_again": 4, "other": 4}
    media = {m: sorted((tmp_path / "media" / m).glob("*.png")) for m in models}
    for file_a, file_again, file_other in zip(media["a"], media["a_again"], media["other"], strict=True):
        assert np.array_equal(pixels(file_a), pixels(file_again))  # same model, same noise: same image
        assert not np.array_equal(pixels(file_a), pixels(file_other))
    assert not np.array_equal(pixels(media["a"][0]), pixels(media["a"][1]))  # two images of a prompt differ
    # image k of prompt p is exactly what sample() gives alone with seed SEED + p*K + k (batching does not
    # matter)
    alone = sample(tiny_sdxl, [PROMPTS[1]], seeds=[3 + 1 * 2 + 1], num_steps=3, guidance_scale=3.0, eta=1.0)
    expected = (alone.images[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(pixels(tmp_path / "media" / "a" / "00001_01.png"), expected)
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert len(rows) == 12 and {r["seed"] for r in rows if r["model"] == "other"} == {"3", "4", "5", "6"}


@pytest.mark.slow
def test_cli_outputs_and_stats_match_scores_csv(cli_gallery):
    summary = json.loads((cli_gallery / "summary.json").read_text())
    rows = list(csv.DictReader(open(cli_gallery / "scores.csv")))
    assert len(rows) == 2 * 3 * 2
    for model in ("base", "tuned"):
        values = [float(r["brightness"]) for r in rows if r["model"] == model]
        assert summary["stats"]["means"][model]["brightness"]["mean"] == pytest.approx(
            sum(values) / len(values)
        )
        for r in rows:
            if r["model"] == model:  # the score is the saved file's
                saved = make_scorer("brightness").score(Image.open(cli_gallery / r["file"]))
                assert float(r["brightness"]) == pytest.approx(float(saved), abs=1e-6)
    pair = next(w for w in summary["stats"]["win_rates"] if w["scorer"] == "jpeg_compressibility")
    assert (pair["a"], pair["b"]) == ("tuned", "base")  # the later model against the baseline
    per_prompt = {m: [np.mean([float(r["jpeg_compressibility"]) for r in rows
                               if r["model"] == m and r["prompt_index"] == str(p)]) for p in range(3)]
                  for m in ("base", "tuned")}
    wins = sum(t > b for t, b in zip(per_prompt["tuned"], per_prompt["base"], strict=True))
    assert pair["wins"] == wins and pair["win_rate"] == pytest.approx((wins + 0.5 * pair["ties"]) / 3)
    assert {m["status"] for m in summary["models"].values()} == {"done"}
    for plot in summary["files"]["plots"]:
        assert Image.open(cli_gallery / plot).size[0] > 100
    assert (cli_gallery / "index.html").read_text().count("gallery-data") == 2


@pytest.mark.slow
def test_interrupted_run_resumes_without_regenerating(tmp_path, tiny_sdxl):
    models = {"base": tiny_sdxl, "again": tiny_sdxl}  # pipeline objects, as a training loop passes them
    calls = []

    def interrupt_after_first_batch(model, keys):
        calls.append((model, keys))
        if len(calls) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_gallery(models, PROMPTS[:2], ["brightness"], tmp_path, images_per_prompt=2, batch_size=3,
                    on_batch=interrupt_after_first_batch, write_page=False, **FAST)
    manifest = Manifest.load(tmp_path / "manifest.json")
    assert sorted(manifest.items["base"]) == ["00000_00", "00000_01", "00001_00"]
    finished = {f: f.stat().st_mtime_ns for f in (tmp_path / "media" / "base").glob("*.png")}
    assert len(finished) == 3
    summary = run_gallery(models, PROMPTS[:2], ["brightness", "jpeg_incompressibility"], tmp_path,
                          images_per_prompt=2, batch_size=3, write_page=False, **FAST)
    assert summary["generated"] == {"base": 1, "again": 4}
    assert all(f.stat().st_mtime_ns == t for f, t in finished.items())  # written once
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert len(rows) == 8 and all(
        r["jpeg_incompressibility"] for r in rows
    )  # a new scorer scores saved files
    by_key = {(r["model"], r["file"].rsplit("/", 1)[1]): r["brightness"] for r in rows}
    assert all(by_key[("base", k)] == by_key[("again", k)] for m, k in by_key if m == "base")
    # an image saved just before an interruption, but not yet in the manifest, is kept and scored
    manifest = Manifest.load(tmp_path / "manifest.json")
    del manifest.items["again"]["00001_01"]
    manifest.save(tmp_path / "manifest.json")
    again = run_gallery(
        models, PROMPTS[:2], ["brightness"], tmp_path, images_per_prompt=2, write_page=False, **FAST
    )
    assert again["generated"] == {"base": 0, "again": 0}
    assert again["stats"]["means"]["again"]["brightness"]["n_images"] == 4
    with pytest.raises(ValueError, match="other settings"):
        run_gallery(models, PROMPTS, ["brightness"], tmp_path, images_per_prompt=3, write_page=False, **FAST)


def test_failing_model_is_reported_and_the_rest_runs(tmp_path, tiny_sdxl_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    out = tmp_path / "out"
    summary = run_gallery(
        {"base": str(tiny_sdxl_path), "broken": str(broken)},
        PROMPTS[:2],
        ["brightness"],
        out,
        images_per_prompt=1,
        **FAST,
    )
    assert summary["models"]["broken"]["status"] == "failed" and summary["models"]["broken"]["error"]
    assert summary["models"]["base"]["status"] == "done" and summary["models"]["base"]["images"] == 2
    assert "broken" not in summary["stats"]["means"] and summary["stats"]["win_rates"] == []
    page = (out / "index.html").read_text()
    assert '"status": "failed"' in page and json.dumps(summary["models"]["broken"]["error"])[1:30] in page


@pytest.mark.slow
def test_lora_model_loads_on_the_base(tmp_path, tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path / "unet")  # a LoRA as the trainer writes one
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"])
    )
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet)
    )
    out = tmp_path / "out"
    assert main(["gallery", "--model", f"base={tiny_sdxl_path}", "--model", f"tuned={tmp_path / 'lora'}:lora",
                 "--prompts", "smoke", "--max-prompts", "2", "--images-per-prompt", "1", "--steps", "3",
                 "--scorer", "brightness", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["tuned"]["lora"] and summary["models"]["tuned"]["base"] == str(tiny_sdxl_path)
    base, tuned = (pixels(out / "media" / m / "00000_00.png") for m in ("base", "tuned"))
    assert not np.array_equal(base, tuned)


# ----------------------------------------------------------------------------------------------------
# Prompt sets and bad input
# ----------------------------------------------------------------------------------------------------
def test_prompt_sets():
    assert len(load_prompts("smoke")) == 8
    animals = load_prompts("ddpo-animals")
    assert len(animals) == 45 and animals[:3] == ["cat", "dog", "horse"]
    if (prompts_dir() / "parti_prompts.tsv").exists():
        parti = load_prompts("parti")
        assert len(parti) == 1632 and parti[0] == "bond"
    assert select_prompts(list("abcdefghij"), 3) == ["a", "d", "g"]
    assert {"smoke", "parti", "ddpo-animals", "hpdv2", "drawbench", "pickapic"} <= set(known_prompt_sets())
    with pytest.raises(ValueError, match="unknown prompt set 'nope'"):
        load_prompts("nope")


def test_hub_prompt_sets_fail_clearly_offline(monkeypatch):
    import datasets
    import huggingface_hub

    # the libraries read HF_HUB_OFFLINE when imported (before conftest sets it): switch them to offline mode
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    for name in ("drawbench", "hpdv2-photo"):
        with pytest.raises(RuntimeError, match="not shipped.*--prompts FILE"):
            load_prompts(name)


@pytest.mark.parametrize("args, message", [
    (["--model", "a=not-a-model-id"], "unknown model 'not-a-model-id'"),
    (["--model", "a=tiny-sdxl", "--scorer", "no_such_scorer"], "unknown scorer 'no_such_scorer'"),
    (["--model", "a=tiny-sdxl", "--prompts", "EMPTY"], "has no prompts"),
    (["--model", "a=tiny-sdxl", "--prompts", "nope-set"], "unknown prompt set 'nope-set'"),
    (["--model", "a=tiny-sdxl", "--model", "a=tiny-sd"], "given twice"),
    (["--model", "tuned=MISSING:lora"], "LoRA folder"),
    (["--model", "a=tiny-sdxl", "--images-per-prompt", "0"], "images_per_prompt must be >= 1"),
    (["--model", "a=tiny-animatediff", "--num-frames", "0"], "num_frames must be >= 1"),
])
def test_bad_input_fails_before_loading(tmp_path, capsys, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = [a.replace("EMPTY", str(empty)).replace("MISSING", str(tmp_path / "missing")) for a in args]
    if "--prompts" not in args:
        args += ["--prompts", "smoke"]
    assert main(["gallery", *args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "media").exists()


def test_num_frames_sets_the_clip_length_of_video_models_and_is_refused_for_image_models(
    tmp_path, tiny_sdxl_path
):
    from diffalign.tiny import cached_tiny

    out = tmp_path / "out"
    summary = run_gallery({"video": str(cached_tiny("animatediff"))}, PROMPTS[:1],
                          ["brightness"], out, images_per_prompt=1, progress=False,
                          sampling=SamplingSettings(num_steps=3, guidance_scale=3.0, num_frames=3))
    assert summary["models"]["video"]["status"] == "done"
    assert load_media(next((out / "media" / "video").glob("*.anim.webp"))).shape[0] == 3
    # an image model among them: refused before anything loads or is written
    refused = tmp_path / "refused"
    with pytest.raises(ValueError, match="num_frames .*model 'image'.*=3 is for video pipelines"):
        run_gallery({"video": str(cached_tiny("animatediff")), "image": str(tiny_sdxl_path)}, PROMPTS[:1],
                    ["brightness"], refused, images_per_prompt=1, progress=False,
                    sampling=SamplingSettings(num_steps=3, guidance_scale=3.0, num_frames=3))
    assert not refused.exists()


def test_video_items_are_saved_scored_and_shown(tmp_path):
    video = torch.rand(6, 3, 16, 16)
    path = save_media(video, tmp_path / "media" / "v" / "00000_00")
    assert path.name == "00000_00.anim.webp"
    frames = load_media(path)
    assert frames.shape == (6, 3, 16, 16)
    assert torch.allclose(frames, (video * 255).round() / 255, atol=1 / 255 + 1e-6)  # lossless up to 8 bits
    scorer = make_scorer("brightness")
    value = score_media(scorer, [frames], ["p"])[0]
    assert value == pytest.approx(float(scorer.score(frames).mean()), abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# The page in a real browser
# ----------------------------------------------------------------------------------------------------
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1280,2000"]


def find_or_install_chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = []
    for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium"]):
        try:
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            log.append(result.stderr[-300:])
        except (OSError, subprocess.TimeoutExpired) as err:
            log.append(str(err))
        if shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip("the browser test needs Chromium: it is not installed and `apt-get install chromium` failed: "
                + " | ".join(s.strip() for s in log if s.strip())[-500:])


class DevTools:
    """The Chrome DevTools Protocol over ``--remote-debugging-pipe`` (fds 3 and 4, NUL-separated JSON)."""

    def __init__(self, binary: str, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the child's ends go to fds 3 and 4: move them above 4 first so that the two dup2 cannot clash
        to_chrome_r, from_chrome_w = (self._above_four(fd) for fd in (to_chrome_r, from_chrome_w))
        cmd = [
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]

        def give_child_fds_3_and_4():  # dup2'd fds are inheritable; Python's own fds close on exec
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.log = profile / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, preexec_fn=give_child_fds_3_and_4, close_fds=False,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer, self._id, self.events, self.session = b"", 0, [], None

    @staticmethod
    def _above_four(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return high

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_chrome], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for seen in self.events:
            if seen.get("method") == event:
                return seen
        while True:
            message = self._message(deadline)
            self.events.append(message)
            if message.get("method") == event:
                return message

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def errors(self) -> list[str]:
        found = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(str(params["exceptionDetails"]))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(str(params.get("args")))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"].get("text", "") + " " + params["entry"].get("url", ""))
        return found

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    devtools = DevTools(find_or_install_chromium(), tmp_path_factory.mktemp("chromium-profile"))
    yield devtools
    devtools.close()


@pytest.mark.slow
def test_page_in_chromium(browser, cli_gallery):
    browser.open((cli_gallery / "index.html").as_uri())
    browser.evaluate("new Promise((done) => setTimeout(done, 300))")  # let the first images decode
    assert browser.errors() == []
    images = browser.evaluate("""[...document.querySelectorAll('#cards .card:not(.hidden)')].slice(0, 2)
        .flatMap((c) => [...c.querySelectorAll('img')]).map((i) => [i.complete, i.naturalWidth])""")
    assert len(images) == 2 * 2 * 2 and all(done and width == 32 for done, width in images)
    plots = browser.evaluate("[...document.querySelectorAll('#plots img')].map((i) => i.naturalWidth)")
    assert len(plots) == 3 and min(plots) > 100
    assert browser.evaluate("document.querySelectorAll('#means tr').length") == 3  # header + 2 models

    shot = Image.open(
        io.BytesIO(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    )
    box = browser.evaluate(
        "(() => { const r = document.querySelector('#cards img').getBoundingClientRect();"
        " return [r.left, r.top, r.right, r.bottom].map((v) => Math.round(v * devicePixelRatio)); })()"
    )
    region = np.asarray(shot.convert("RGB").crop(tuple(box)), dtype=np.float32)
    assert region.size > 0 and region.std() > 10  # the noise image is drawn, not a blank box
    assert np.asarray(shot.convert("L")).std() > 10

    # sorting by the difference tuned - base on jpeg_compressibility reorders the cards as scores.csv says
    rows = list(csv.DictReader(open(cli_gallery / "scores.csv")))
    mean = {
        (m, p): np.mean(
            [
                float(r["jpeg_compressibility"])
                for r in rows
                if r["model"] == m and int(r["prompt_index"]) == p
            ]
        )
        for m in ("base", "tuned")
        for p in range(3)
    }
    expected = sorted(range(3), key=lambda p: -(mean["tuned", p] - mean["base", p]))
    order = browser.evaluate("""(() => {
        const set = (id, value, event) => { const n = document.getElementById(id); n.value = value;
                                            n.dispatchEvent(new Event(event)); };
        set('scorer', 'jpeg_compressibility', 'change');
        set('sort', 'diff-desc', 'change');
        return [...document.querySelectorAll('#cards .card')].map((c) => Number(c.dataset.index)); })()""")
    assert order == expected
    ascending = browser.evaluate("""(() => { const n = document.getElementById('sort'); n.value = 'diff-asc';
        n.dispatchEvent(new Event('change'));
        return [...document.querySelectorAll('#cards .card')].map((c) => Number(c.dataset.index)); })()""")
    assert ascending == expected[::-1]
    visible = browser.evaluate("""(() => { const n = document.getElementById('filter'); n.value = 'BLUE';
        n.dispatchEvent(new Event('input'));
        return [...document.querySelectorAll('#cards .card:not(.hidden) .prompt')]
            .map((p) => p.textContent); })()""")
    assert visible == ["#1a blue square"]
    assert "sort=diff-asc" in browser.evaluate("location.hash")
    assert browser.errors() == []


@pytest.mark.slow
def test_failures_and_videos_in_chromium(browser, tmp_path):
    """A failed model shows its error; an animated (video) item plays inline as an image."""
    manifest = Manifest(
        settings={
            "images_per_prompt": 1,
            "seed": 0,
            "steps": 2,
            "guidance": 1.0,
            "eta": 1.0,
            "guidance_rescale": 0.0,
            "height": None,
            "width": None,
            "negative_prompt": None,
        },
        prompts=["a video prompt </script><b>not bold</b>"],
    )
    frames = torch.linspace(0, 1, 5).view(5, 1, 1, 1).expand(5, 3, 24, 24)
    file = save_media(frames, tmp_path / "media" / "vid" / "00000_00")
    manifest.models = {"vid": {"source": "x", "lora": False, "base": None, "status": "done", "error": None},
                       "bad": {"source": "y", "lora": False, "base": None, "status": "failed",
                               "error": "OSError: no weights here"}}
    manifest.items = {"vid": {"00000_00": {"file": file.relative_to(tmp_path).as_posix(), "seed": 0,
                                           "scores": {"brightness": 0.5}}}, "bad": {}}
    manifest.scorers = {"brightness": {"higher_is_better": True}}
    write_results(tmp_path, manifest, ["vid", "bad"], ["brightness"])
    browser.open((tmp_path / "index.html").as_uri())
    browser.evaluate("new Promise((done) => setTimeout(done, 300))")
    assert browser.errors() == []
    assert browser.evaluate("document.querySelector('#cards img').naturalWidth") == 24
    assert "OSError: no weights here" in browser.evaluate("document.getElementById('failures').textContent")
    assert browser.evaluate("document.querySelector('.cell-failed').textContent").startswith("failed")
    assert browser.evaluate("document.querySelector('.prompt').textContent").endswith("<b>not bold</b>")


def test_stats_skip_models_without_scores():
    rows = [{"model": "a", "prompt_index": p, "scores": {"s": float(p)}} for p in range(3)]
    stats = compute_stats(rows, ["b", "a"], {"s": True})
    assert stats["means"] == {"b": {}, "a": stats["means"]["a"]} and stats["win_rates"] == []
