"""Every command in README.md runs as written (shortened), and every Python snippet names only what it
defines.

The commands run in order in one scratch folder that sees the repository's ``configs/``, ``data/`` and
``gallery/``, so a later command can use an earlier one's output (the gallery compares the LoRA the main job
trained). Shortened means options appended after the README's own (argparse and dotted overrides: the last
one wins): fewer steps, prompts and frames. Commands that need real models from the hub or GPUs cannot run
offline: those ``diffalign train`` runs (under ``accelerate launch`` or not) run with ``--print-config``,
which reads and validates the config without loading a model. Only the install and test-suite commands are
not run.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from diffalign.cli import main
from diffalign.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# installing, this very suite, and an HTTP client asking a server that the README starts on another GPU
NOT_RUN = ("python -m pip", "python -m pytest", "curl ")
REAL_MODEL_CONFIGS = ("configs/sdxl/", "configs/sd15/", "configs/animatediff/", "configs/wan/",
                      "configs/sd3/")
SHORT = {
    "sample": ["--steps", "2"],
    "pairs": ["--steps", "2"],
    "gallery": ["--steps", "2", "--images-per-prompt", "1"],
    "toy eval": ["--num-prompts", "2", "--steps", "2"],
    "toy pretrain": ["--num-images", "16", "--vae-steps", "2", "--vae-batch-size", "4", "--unet-steps", "2",
                     "--unet-batch-size", "4", "--warmup-steps", "1"],
    "toy pretrain-flow": ["--num-images", "16", "--num-layers", "1", "--num-heads", "2", "--steps", "2",
                          "--batch-size", "4", "--warmup-steps", "1", "--eval-prompts", "2"],
}
TRAIN_SHORT = [
    "train.max_steps=2",
    "eval.enabled=false",
    "log.progress_bar=false",
    "checkpoint.every_n_steps=1",
    "data.max_pairs=8",
]
ONLINE_SHORT = ["method.num_steps=2", "method.samples_per_prompt=2", "method.num_prompts=1",
                "method.gradient_steps_per_epoch=1", "method.train_timesteps=1"]


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def readme_commands() -> list[list[str]]:
    """Each shell command of the README's bash blocks as tokens (continuations joined, comments dropped)."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                commands.append(tokens[:cut])
                tokens = tokens[cut + 1:]
    return [c for c in commands if c]


def shortened(tokens: list[str]) -> list[str] | None:
    """The ``diffalign`` arguments to run for a README command (None: not run)."""
    text = " ".join(tokens)
    if text.startswith(NOT_RUN) or tokens[0] == "export":  # export: an environment value (set by the runner)
        return None
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):  # VAR=value prefixes (CUDA_VISIBLE_DEVICES=1 ...)
        tokens = tokens[1:]
    if tokens[:2] == ["accelerate", "launch"]:
        args = tokens[tokens.index("-m") + 2:]  # -m diffalign ARGS
        return [*args, "--print-config"]
    assert tokens[0] == "diffalign", f"README command not understood: {text}"
    args = tokens[1:]
    if args[0] == "train":
        if args[1].startswith(REAL_MODEL_CONFIGS):
            return [*args, "--print-config"]
        cfg = load_config(ROOT / args[1], check=False)
        extra = list(TRAIN_SHORT)
        if "--resume" in args:
            extra[0] = "train.max_steps=3"  # one step past the checkpoint the run before it left
        if cfg.method.name in ("prdp", "ddpo"):
            extra += ONLINE_SHORT
        if cfg.method.name == "grpo":  # GRPO picks its own trained steps (no train_timesteps)
            extra += [o for o in ONLINE_SHORT if not o.startswith("method.train_timesteps")]
        if cfg.model.name in ("tiny-animatediff", "tiny-wan"):
            frames = 2 if "animatediff" in cfg.model.name else 5
            extra += (
                [f"method.num_frames={frames}", "method.height=16", "method.width=16"]
                if cfg.method.name in ("prdp", "ddpo")
                else [f"data.num_frames={frames}", "data.resolution=16"]
            )
        # after the README's own overrides (the last one wins), before any option (argparse takes no
        # positional overrides after one)
        cut = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
        return [*args[:cut], *extra, *args[cut:]]
    if args[0] == "serve-scorer":  # a server runs until stopped, and the README's serves a hub model: check
        return [*args, "--check"]
    key = " ".join(args[:2]) if args[0] == "toy" else args[0]
    return [*args, *SHORT.get(key, [])]


def test_readme_has_the_commands_we_expect():
    commands = [" ".join(c) for c in readme_commands()]
    assert any(c.startswith("diffalign train configs/toy-sdxl/dpo-geneval.yaml") for c in commands)
    assert any(c.startswith("diffalign gallery") and ":lora" in c for c in commands)
    not_run = [" ".join(c) for c in readme_commands() if shortened(c) is None]
    assert sorted(c.split()[0] for c in not_run) == ["curl", "export", "python", "python"], not_run


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    for name in ("configs", "data", "gallery"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    ran = []
    for tokens in readme_commands():
        if tokens[0] == "export":  # export NAME=$(...): a value for the commands after it
            monkeypatch.setenv(tokens[1].split("=", 1)[0], "readme-test-value")
            continue
        args = shortened(tokens)
        if args is None:
            continue
        code = main(args)
        err = capsys.readouterr().err
        assert code == 0, (
            f"README command failed: {' '.join(tokens)}\n(ran: diffalign {' '.join(args)})\n{err}"
        )
        ran.append(args[0])
    assert {"tiny", "sample", "score", "train", "pairs", "gallery", "toy"} <= set(ran)
    assert (tmp_path / "toy-sd3-run" / "pipeline" / "model_index.json").is_file()
    assert (tmp_path / "runs" / "toy-sdxl-dpo-geneval" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "gallery-run" / "index.html").is_file()


def test_readme_python_snippets_define_what_they_use():
    for i, block in enumerate(readme_blocks("python")):
        result = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F821,F401", "--no-cache",
                                 "--stdin-filename", f"readme_{i}.py", "-"], input=block, text=True,
                                capture_output=True, cwd=ROOT)
        assert result.returncode == 0, f"README python block {i}:\n{block}\n{result.stdout}"


def test_readme_python_snippets_run(monkeypatch):
    offline = [b for b in readme_blocks("python") if "stabilityai/" not in b]  # a hub model: cannot run here
    assert len(offline) >= 2
    monkeypatch.chdir(ROOT)
    for block in offline:
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's own snippet


def test_readme_states_the_suite_time():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"python -m pytest\s+#.*~(\d+) min on 2 cores", text)
    assert match, "the README states how long the suite takes"
    # measured 16 min 50 s on 2 idle cores, two xdist workers (BENCHMARKS.md "Test suite time"); ~5 was wrong
    assert int(match.group(1)) >= 10
