"""Resolve and load diffusers pipelines: hub ids, local folders, and the built-in tiny / toy ids.

``resolve_model`` only looks at the string and the file system, so bad input is rejected before any
weights load; ``load_pipeline`` does the loading with the real diffusers code path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from diffalign import tiny
from diffalign.toy import TOY_GUIDANCE, TOY_NUM_STEPS, toy_animatediff_path, toy_sdxl_path

# diffusers >= 0.42 renamed ``torch_dtype`` to ``dtype`` (the old name warns).
try:
    from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

    _DTYPE_KW = "dtype"
except ImportError:  # older diffusers
    _DTYPE_KW = "torch_dtype"

#: The file diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` reads in a LoRA folder.
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"

#: What a hub id (``org/name``) looks like, for models and datasets alike.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: Built-in model ids -> a function returning the local folder (built or located on first use).
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "tiny-sd": lambda: tiny.cached_tiny("sd"),
    "tiny-sdxl": lambda: tiny.cached_tiny("sdxl"),
    "tiny-animatediff": lambda: tiny.cached_tiny("animatediff"),
    "tiny-wan": lambda: tiny.cached_tiny("wan"),
    "tiny-sd3": lambda: tiny.cached_tiny("sd3"),
    "tiny-flux": lambda: tiny.cached_tiny("flux"),
    "toy-sdxl": toy_sdxl_path,
    "toy-animatediff": toy_animatediff_path,
}

#: A built-in model's own sampling defaults (:class:`diffalign.sampling.SamplingSettings` field names):
#: the sizes the tiny models are built for, the steps and guidance the toy models were evaluated with.
BUILTIN_SAMPLING_DEFAULTS: dict[str, dict] = {
    "tiny-animatediff": {"num_frames": 4},
    "tiny-wan": {"height": 32, "width": 32, "num_frames": 5},
    "toy-sdxl": {"num_steps": TOY_NUM_STEPS, "guidance_scale": TOY_GUIDANCE},
    "toy-animatediff": {"num_steps": TOY_NUM_STEPS, "guidance_scale": TOY_GUIDANCE},
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def register_builtin_model(name: str, locate: Callable[[], Path], sampling_defaults: dict | None = None) -> None:
    """Make ``name`` usable wherever a model id is (e.g. the shipped ``toy-sdxl``), with its own sampling
    defaults (``{"num_steps": 20, "guidance_scale": 3.0}``) if it has any."""
    BUILTIN_MODELS[name] = locate
    if sampling_defaults:
        BUILTIN_SAMPLING_DEFAULTS[name] = dict(sampling_defaults)


def builtin_sampling_defaults(model: str) -> dict:
    """The sampling defaults of built-in model ``model`` ({} for any other model)."""
    return dict(BUILTIN_SAMPLING_DEFAULTS.get(model, {}))


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is 'builtin', 'local' or 'hub'."""

    name: str
    kind: str

    def location(self) -> str:
        return str(BUILTIN_MODELS[self.name]()) if self.kind == "builtin" else self.name


def resolve_model(model: str) -> ModelSource:
    """Classify a ``--model`` value without loading anything; raise a clear error if it cannot be one."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model must be a non-empty string: a hub id, a local path, or a built-in id "
                         f"({', '.join(sorted(BUILTIN_MODELS))})")
    if model in BUILTIN_MODELS:
        return ModelSource(model, "builtin")
    path = Path(os.path.expanduser(model))
    if path.exists():
        if path.is_dir() and not (path / "model_index.json").exists() and not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no model_index.json: expected a diffusers pipeline folder")
        return ModelSource(str(path), "local")
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep in model and os.sep != "/"
    if looks_like_path:
        raise FileNotFoundError(f"model path {model!r} does not exist")
    if HUB_ID.match(model):
        return ModelSource(model, "hub")
    raise ValueError(
        f"unknown model {model!r}: not a built-in id ({', '.join(sorted(BUILTIN_MODELS))}), "
        "not an existing local path, and not a hub id of the form 'org/name'"
    )


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_pipeline(
    model: str,
    *,
    dtype: str | torch.dtype = "float32",
    variant: str | None = None,
    vae: str | None = None,
    device: str | torch.device | None = None,
    custom_pipeline: str | None = None,
    trust_remote_code: bool = False,
    motion_adapter: str | None = None,
):
    """Load any diffusers SD 1.x/2.x or SDXL pipeline by hub id, local path or built-in id.

    ``vae`` overrides the pipeline's VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix`` for fp16 SDXL).
    ``motion_adapter`` (a ``MotionAdapter`` id or folder, e.g. ``guoyww/animatediff-motion-adapter-v1-5-2``)
    turns an SD 1.x base into an ``AnimateDiffPipeline``.
    ``custom_pipeline`` must be a local folder the user names (never fetched code) and
    ``trust_remote_code`` stays off unless asked for.
    """
    from diffusers import AutoencoderKL, DiffusionPipeline

    source = resolve_model(model)
    torch_dtype = parse_dtype(dtype)
    kwargs = {_DTYPE_KW: torch_dtype, "variant": variant, "trust_remote_code": trust_remote_code}
    if custom_pipeline is not None:
        if not (Path(custom_pipeline) / "pipeline.py").is_file():
            raise FileNotFoundError(f"custom pipeline {custom_pipeline!r} must be a local folder with a pipeline.py")
        if not trust_remote_code:
            raise ValueError(f"custom pipeline {custom_pipeline!r} runs its own code: pass trust_remote_code=True to allow it")
        kwargs["custom_pipeline"] = str(Path(custom_pipeline).resolve())
    if vae is not None:
        kwargs["vae"] = _load_or_explain(AutoencoderKL, resolve_model(vae), **{_DTYPE_KW: torch_dtype})
    if motion_adapter is not None:
        from diffusers import AnimateDiffPipeline, MotionAdapter

        kwargs["motion_adapter"] = _load_or_explain(MotionAdapter, resolve_model(motion_adapter), **{_DTYPE_KW: torch_dtype})
        pipe = _load_or_explain(AnimateDiffPipeline, source, **kwargs)
    else:
        pipe = _load_or_explain(DiffusionPipeline, source, **kwargs)
    if device is not None:
        pipe.to(device)
    return pipe


def _load_or_explain(cls, source: ModelSource, **kwargs):
    try:
        return cls.from_pretrained(source.location(), **kwargs)
    except OSError as err:
        if source.kind == "hub":
            raise OSError(
                f"could not load {source.name!r} from the model hub ({err.__class__.__name__}: {err}). "
                "Without network access, download it elsewhere and pass its local folder instead."
            ) from err
        raise


# ----------------------------------------------------------------------------------------------------
# Trainer outputs: ``RUN:lora``
# ----------------------------------------------------------------------------------------------------
LORA_SUFFIX = ":lora"


@dataclass(frozen=True)
class ModelSpec:
    """A model to load: ``base`` (any ``--model`` value) with the LoRA folder ``lora`` on top, if any."""

    base: str
    lora: str | None = None
    vae: str | None = None
    motion_adapter: str | None = None
    variant: str | None = None


def resolve_model_spec(spec: str) -> ModelSpec:
    """``--model`` values that may name a trainer's LoRA run: a built-in id, hub id or folder as
    :func:`resolve_model` takes them, or ``RUN:lora`` (``RUN`` holding ``pytorch_lora_weights.safetensors``,
    loaded onto the base model ``RUN/config.yaml`` records, as ``diffalign train`` writes it). Nothing loads."""
    if not (isinstance(spec, str) and spec.endswith(LORA_SUFFIX)):
        resolve_model(spec)
        return ModelSpec(spec)
    run = Path(os.path.expanduser(spec.removesuffix(LORA_SUFFIX)))
    if not (run / LORA_WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{spec!r}: {run} has no {LORA_WEIGHTS_FILE} (expected the output folder of a LoRA "
                                "run of 'diffalign train')")
    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{spec!r}: {config_path} is missing, so the run's base model is unknown")
    model = (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}).get("model") or {}
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise ValueError(f"{config_path}: expected a 'model: {{name: BASE}}' section naming the run's base model")
    if model.get("finetune", "lora") != "lora":
        raise ValueError(f"{spec!r}: {config_path} says model.finetune={model['finetune']!r}; a full fine-tune "
                         f"is a pipeline folder: pass {str(run)!r} without {LORA_SUFFIX}")
    resolve_model(model["name"])
    return ModelSpec(model["name"], str(run), model.get("vae"), model.get("motion_adapter"), model.get("variant"))


def load_model_spec(spec: str | ModelSpec, *, dtype: str | torch.dtype = "float32",
                    device: str | torch.device | None = None):
    """Load a :func:`resolve_model_spec` model: the base pipeline, then the run's LoRA through the stock
    ``pipe.load_lora_weights``."""
    if isinstance(spec, str):
        spec = resolve_model_spec(spec)
    pipe = load_pipeline(spec.base, dtype=dtype, variant=spec.variant, vae=spec.vae,
                         motion_adapter=spec.motion_adapter, device=device)
    if spec.lora is not None:
        pipe.load_lora_weights(spec.lora)
    return pipe
