"""Security: what the package loads and what a training run writes.

* An AST scan of ``diffalign/`` and ``pipelines/``: every ``torch.load`` passes ``weights_only=True``; no
  pickle/dill/joblib/cloudpickle/shelve/marshal loads; no ``numpy.load(..., allow_pickle=True)``; no
  ``trust_remote_code=True`` written into the code (it may only come from a user's setting).
* ``load_pipeline`` keeps ``trust_remote_code`` off by default and takes custom pipelines only from a local
  folder the user names, and only with an explicit opt-in.
* Every file a training run writes (output folder and checkpoints) has a safe format: no ``.bin``/``.pt``/
  ``.pkl`` pickles.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "diffalign", ROOT / "pipelines"]
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}
PICKLE_LOADERS = {"load", "loads", "Unpickler", "open", "read_pickle"}
SAFE_OUTPUT_SUFFIXES = {
    ".safetensors",
    ".json",
    ".jsonl",
    ".yaml",
    ".md",
    ".txt",
    ".png",
    ".webp",
    ".gif",
    ".html",
    ".csv",
    ".log",
}


# ----------------------------------------------------------------------------------------------------
# The AST scan
# ----------------------------------------------------------------------------------------------------
def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Problems in one module's source, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> module or module.attr it stands for
    problems: list[str] = []

    def report(node, what):
        problems.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                if node.module.split(".")[0] in PICKLE_MODULES and a.name in PICKLE_LOADERS:
                    report(node, f"imports {node.module}.{a.name} (pickle loading)")
                if node.module == "torch" and a.name == "load":
                    report(node, "imports torch.load by name (call it as torch.load(..., weights_only=True))")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name is None:
                continue
            head, _, rest = name.partition(".")
            full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if full == "torch.load" and not _is_true(keywords.get("weights_only")):
                report(node, "torch.load without weights_only=True")
            if full.split(".")[0] in PICKLE_MODULES and full.split(".")[-1] in PICKLE_LOADERS:
                report(node, f"{full}: pickle loading")
            if full.endswith("read_pickle"):
                report(node, f"{full}: pickle loading")
            if full in ("numpy.load", "np.load") and _is_true(keywords.get("allow_pickle")):
                report(node, "numpy.load with allow_pickle=True")
            if _is_true(keywords.get("trust_remote_code")):
                report(node, f"{full}(trust_remote_code=True) written in the code")
            if (
                isinstance(keywords.get("safe_serialization"), ast.Constant)
                and keywords["safe_serialization"].value is False
            ):
                report(node, f"{full}(safe_serialization=False)")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            positional = args.posonlyargs + args.args
            defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
            for arg, default in [
                *zip(positional, defaults, strict=True),
                *zip(args.kwonlyargs, args.kw_defaults, strict=True),
            ]:
                if arg.arg == "trust_remote_code" and _is_true(default):
                    report(node, f"{node.name}(trust_remote_code=True) as a default")
        elif isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "trust_remote_code" for t in targets) and _is_true(
                node.value
            ):
                report(node, "trust_remote_code = True as a default setting")
    return problems


def _python_files():
    return sorted(p for root in SCANNED for p in root.rglob("*.py"))


def test_the_scan_finds_planted_problems():
    planted = """
import torch, pickle, numpy as np
import dill as d
from joblib import load as jl
from torch import load
def f(trust_remote_code=True): ...
class Settings:
    trust_remote_code: bool = True
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
pickle.loads(b"")
d.load(open("x"))
np.load("x.npy", allow_pickle=True)
pipe = from_pretrained("x", trust_remote_code=True)
model.save_pretrained("x", safe_serialization=False)
"""
    found = unsafe_loads(planted)
    for what in ["torch.load without weights_only=True", "pickle.loads", "dill.load", "joblib.load (pickle",
                 "torch.load by name", "allow_pickle", "f(trust_remote_code=True) as a default",
                 "trust_remote_code = True as a default", "from_pretrained(trust_remote_code=True)",
                 "safe_serialization=False"]:
        assert any(what in problem for problem in found), (what, found)
    assert len([p for p in found if "torch.load without" in p]) == 2
    safe = (
        "\nimport torch\n"
        'state = torch.load(path, map_location="cpu", weights_only=True)\n'
        "def load_pipeline(model, trust_remote_code: bool = False): "
        "return from_pretrained(model, trust_remote_code=trust_remote_code)\n"
    )
    assert unsafe_loads(safe) == []


def test_package_and_pipelines_load_no_pickles_and_trust_no_remote_code():
    files = _python_files()
    assert len(files) > 20 and any(p.parts[-2] == "diffalign_sdxl" for p in files)
    problems = [
        problem
        for p in files
        for problem in unsafe_loads(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))
    ]
    assert problems == []


# ----------------------------------------------------------------------------------------------------
# load_pipeline: remote code stays off; custom pipelines only from a named local folder, with opt-in
# ----------------------------------------------------------------------------------------------------
def test_load_pipeline_keeps_trust_remote_code_off_by_default(tiny_sdxl_path, monkeypatch):
    import inspect

    import diffusers

    from diffalign.models import load_pipeline

    assert inspect.signature(load_pipeline).parameters["trust_remote_code"].default is False
    seen = []
    original = diffusers.DiffusionPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):  # records what the real loader is asked for, then loads for real
        seen.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(spy))
    pipe = load_pipeline(str(tiny_sdxl_path))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert seen and seen[0]["trust_remote_code"] is False and "custom_pipeline" not in seen[0]


@pytest.mark.parametrize("name", ["someone/their-pipeline", "lpw_stable_diffusion_xl",
                                  "https://example.com/pipeline.py", "/no/such/folder"])
def test_custom_pipelines_must_be_local_folders(name, tiny_sdxl_path):
    from diffalign.models import load_pipeline

    for trust in (False, True):  # hub ids, community names and URLs are refused even with the opt-in
        with pytest.raises(FileNotFoundError, match="local folder"):
            load_pipeline(str(tiny_sdxl_path), custom_pipeline=name, trust_remote_code=trust)


def test_a_local_custom_pipeline_needs_the_opt_in(tiny_sdxl_path, tmp_path):
    from diffalign.models import load_pipeline

    folder = tmp_path / "my_pipeline"
    folder.mkdir()
    (folder / "pipeline.py").write_text("raise SystemExit('this code must not run')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_pipeline(str(tiny_sdxl_path), custom_pipeline=str(folder))


# ----------------------------------------------------------------------------------------------------
# What a training run writes
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_training_run_writes_no_pickles(tmp_path):
    """Every file under the output folder, checkpoints included, is safetensors or a text/image format."""
    from diffalign.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(ROOT / "configs" / "tiny-sdxl" / "dpo.yaml"),
                f"train.output_dir={out}",
                "train.max_steps=2",
                "checkpoint.every_n_steps=1",
                "checkpoint.keep_last=null",
                "log.every_n_steps=1",
                "log.progress_bar=false",
                "log.validation_every_n_steps=2",
                "log.validation_prompts=[a red circle]",
                "data.max_pairs=4",
                "eval.prompts=[a red circle]",
                "eval.seeds=[0]",
                "eval.num_steps=2",
                "eval.train_pairs=2",
                "eval.train_pair_draws=1",
            ]
        )
        == 0
    )
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.match("checkpoints/checkpoint-2/*") for p in files), "expected a checkpoint folder"
    assert any(p.suffix == ".png" for p in files) and (out / "README.md").is_file()
    unsafe = sorted(str(p.relative_to(out)) for p in files if p.suffix not in SAFE_OUTPUT_SUFFIXES)
    assert unsafe == [], f"files in formats that are not safetensors/text/images: {unsafe}"
    for p in files:  # and each one is what its name says
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), "pt") as f:
                list(f.keys())
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
