"""Resolve and load diffusers pipelines named by a model spec, the one grammar every command uses:

``ID``           a built-in id (``tiny-sdxl``, ``toy-sdxl``, ...) or a hub id ``org/name``
``FOLDER``       a local diffusers pipeline folder (``model_index.json``), e.g. a full fine-tuning run
``FOLDER:lora``  a LoRA folder (``pytorch_lora_weights.safetensors``) on top of its base model: a diffalign
                 run records its base in ``config.yaml`` (found in the folder or up to three folders above,
                 so ``RUN/checkpoints/checkpoint-N/lora:lora`` works too); any other LoRA folder needs
                 ``lora_base=``

``resolve_model`` only looks at the string and the file system, so bad input is rejected before any
weights load; ``load_pipeline`` does the loading with the real diffusers code path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from diffalign import tiny
from diffalign.families import FAMILIES, VIDEO_FAMILIES
from diffalign.toy import TOY_GUIDANCE, TOY_NUM_STEPS, toy_animatediff_path, toy_sd3_path, toy_sdxl_path

# diffusers >= 0.42 renamed ``torch_dtype`` to ``dtype`` (the old name warns).
try:
    from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

    _DTYPE_KW = "dtype"
except ImportError:  # older diffusers
    _DTYPE_KW = "torch_dtype"

class _NoEmptyFloat32Warning(logging.Filter):
    # diffusers warns on every `.to(dtype)` of a model whose list of modules to keep in float32 is empty.
    def filter(self, record):
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFloat32Warning())

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
    "toy-sd3": toy_sd3_path,
}

#: A built-in model's own sampling defaults (:class:`diffalign.sampling.SamplingSettings` field names):
#: the sizes the tiny models are built for, the steps and guidance the toy models were evaluated with.
BUILTIN_SAMPLING_DEFAULTS: dict[str, dict] = {
    "tiny-animatediff": {"num_frames": 4},
    "tiny-wan": {"height": 32, "width": 32, "num_frames": 5},
    "tiny-flux": {"height": 32, "width": 32},  # FluxPipeline's own default is 128 x the VAE factor
    "toy-sdxl": {"num_steps": TOY_NUM_STEPS, "guidance_scale": TOY_GUIDANCE},
    "toy-animatediff": {"num_steps": TOY_NUM_STEPS, "guidance_scale": TOY_GUIDANCE},
    # its flow shift is its scheduler's (shipped in scheduler/scheduler_config.json)
    "toy-sd3": {"num_steps": TOY_NUM_STEPS, "guidance_scale": TOY_GUIDANCE},
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def register_builtin_model(
    name: str, locate: Callable[[], Path], sampling_defaults: dict | None = None
) -> None:
    """Make ``name`` usable wherever a model id is (e.g. the shipped ``toy-sdxl``), with its own sampling
    defaults (``{"num_steps": 20, "guidance_scale": 3.0}``) if it has any."""
    BUILTIN_MODELS[name] = locate
    if sampling_defaults:
        BUILTIN_SAMPLING_DEFAULTS[name] = dict(sampling_defaults)


def builtin_sampling_defaults(model: str) -> dict:
    """The sampling defaults of built-in model ``model`` ({} for any other model)."""
    return dict(BUILTIN_SAMPLING_DEFAULTS.get(model, {}))


LORA_SUFFIX = ":lora"
#: Built-in ids whose pipeline class is known without building them (others: read from model_index.json).
BUILTIN_CLASSES = {"tiny-sd": "StableDiffusionPipeline", "tiny-sdxl": "StableDiffusionXLPipeline",
                   "toy-sdxl": "StableDiffusionXLPipeline", "tiny-animatediff": "AnimateDiffPipeline",
                   "toy-animatediff": "AnimateDiffPipeline", "tiny-wan": "WanPipeline",
                   "tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline",
                   "toy-sd3": "StableDiffusion3Pipeline"}


class ModelError(ValueError):
    """A model spec that cannot be used, or a model that cannot be loaded: one line naming it."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A model spec naming a local path that does not exist, or a folder without the files it needs."""


class ModelLoadError(ModelError, OSError):
    """A model that resolved but could not be loaded (offline hub id, broken folder)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is 'builtin', 'local' or 'hub'. A LoRA spec is its base model's
    source with ``lora`` set to the LoRA folder (and the base's motion adapter, when the run recorded one).
    A run trained on top of another LoRA run has that run's folder in ``base_loras`` (merged first)."""

    name: str
    kind: str
    lora: str | None = None
    motion_adapter: str | None = None
    base_loras: tuple[str, ...] = ()

    def location(self) -> str:
        return str(BUILTIN_MODELS[self.name]()) if self.kind == "builtin" else self.name

    @property
    def spec(self) -> str:
        """The spec as a user writes it (the LoRA folder with ``:lora``, else the model)."""
        return self.lora + LORA_SUFFIX if self.lora else self.name


def recorded_base(lora_folder: Path) -> tuple[str, str | None] | None:
    """``(model.name, model.motion_adapter)`` from the ``config.yaml`` of the diffalign run that wrote
    ``lora_folder`` (the folder itself or up to three folders above), or None."""
    for folder in [lora_folder, *lora_folder.resolve().parents][:4]:
        record = folder / "config.yaml"
        if record.is_file():
            try:
                model = (yaml.safe_load(record.read_text(encoding="utf-8")) or {}).get("model") or {}
            except (yaml.YAMLError, AttributeError, OSError):
                return None
            if isinstance(model, dict) and isinstance(model.get("name"), str):
                return model["name"], model.get("motion_adapter")
            return None
    return None


def resolve_model(model: str, *, lora_base: str | None = None, component: bool = False) -> ModelSource:
    """Classify a model spec without loading anything; raise a clear error if it cannot be one.

    ``component=True`` accepts a single-model folder (a ``config.json``: a VAE or motion adapter override).
    ``lora_base`` is the base for a ``FOLDER:lora`` spec; without it the run's recorded base is used.
    """
    if not isinstance(model, str) or not model.strip():
        raise ModelError(
            "model must be a non-empty string: a hub id, a local path, FOLDER:lora, or a built-in id "
            f"({', '.join(sorted(BUILTIN_MODELS))})"
        )
    if model.endswith(LORA_SUFFIX) and not component:
        return _resolve_lora(model.removesuffix(LORA_SUFFIX), lora_base)
    if model in BUILTIN_MODELS:
        return ModelSource(model, "builtin")
    path = Path(os.path.expanduser(model))
    if path.exists():
        if path.is_dir() and not (path / "model_index.json").exists():
            _explain_not_a_pipeline(path, component)
        return ModelSource(str(path), "local")
    looks_like_path = (
        model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep in model and os.sep != "/"
    )
    if looks_like_path or (path.parent != Path(".") and path.parent.is_dir()):
        raise ModelNotFoundError(f"model path {model!r} does not exist")
    if HUB_ID.match(model):
        return ModelSource(model, "hub")
    raise ModelError(
        f"unknown model {model!r}: not a built-in id ({', '.join(sorted(BUILTIN_MODELS))}), "
        "not an existing local path, and not a hub id of the form 'org/name'"
    )


def _explain_not_a_pipeline(path: Path, component: bool) -> None:
    if (path / LORA_WEIGHTS_FILE).is_file() or (
        any(path.glob("*.safetensors")) and not (path / "config.json").exists()
    ):
        if component:
            raise ModelError(f"{path} is a LoRA folder, not a model component")
        raise ModelError(f"model folder {path} is a LoRA folder: use {path}{LORA_SUFFIX}")
    config = path / "config.json"
    if not config.is_file():
        raise ModelNotFoundError(
            f"model folder {path} has no model_index.json: expected a diffusers pipeline folder"
        )
    if component:
        return
    try:
        info = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        info = {}
    what = info.get("_class_name") or ", ".join(info.get("architectures") or []) or "a single model"
    hint = f"; the pipeline folder is {path.parent}" if (path.parent / "model_index.json").is_file() else ""
    if "architectures" in info and "_class_name" not in info:
        hint = f" (a transformers model: a scorer takes it as --scorer NAME:model={path})"
    raise ModelError(f"model folder {path} holds one component ({what}), not a diffusers pipeline "
                     f"(no model_index.json){hint}")


def _resolve_lora(folder_text: str, lora_base: str | None) -> ModelSource:
    folder = Path(os.path.expanduser(folder_text))
    if not folder.is_dir():
        raise ModelNotFoundError(f"LoRA folder {folder} does not exist")
    if (folder / "model_index.json").is_file():
        raise ModelError(
            f"{folder} is a full pipeline folder, not a LoRA folder: use {folder} without {LORA_SUFFIX}"
        )
    if not any(folder.glob("*.safetensors")):
        raise ModelNotFoundError(
            f"LoRA folder {folder} has no .safetensors weights (expected {LORA_WEIGHTS_FILE}, as "
            "save_lora_weights writes)"
        )
    motion_adapter = None
    if lora_base is None:
        recorded = recorded_base(folder)
        if recorded is None:
            raise ModelError(
                f"LoRA folder {folder}: no base model is known (no diffalign config.yaml records "
                "one); name the base model (gallery: --lora-base ID_OR_PATH)"
            )
        lora_base, motion_adapter = recorded
    try:
        base = resolve_model(lora_base)  # a LoRA run itself when this run started from one
    except ModelError as err:
        raise ModelError(f"LoRA folder {folder}: its base model: {err}") from None
    earlier = (*base.base_loras, base.lora) if base.lora else ()
    if str(folder) in earlier:
        raise ModelError(f"LoRA folder {folder}: its recorded base leads back to itself")
    adapter = motion_adapter or base.motion_adapter
    return ModelSource(base.name, base.kind, lora=str(folder), motion_adapter=adapter, base_loras=earlier)


def pipeline_class_name(source: ModelSource) -> str | None:
    """The pipeline class a source loads as, read without loading weights (None when unknown, e.g. a
    hub id that is not in the local cache)."""
    if source.kind == "builtin" and source.name in BUILTIN_CLASSES:
        return BUILTIN_CLASSES[source.name]
    index = None
    if source.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.name, "model_index.json")
        index = Path(cached) if isinstance(cached, str) else None
    else:
        index = Path(source.location()) / "model_index.json"
    if index is None or not index.is_file():
        return None
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None


def is_video_model(source: ModelSource, motion_adapter: str | None = None) -> bool | None:
    """True for a video pipeline (AnimateDiff, Wan), False for an image one, None when unknown offline."""
    if motion_adapter is not None or source.motion_adapter is not None:
        return True
    name = pipeline_class_name(source)
    if name is None:
        return None
    video = {c for f in VIDEO_FAMILIES for c in FAMILIES[f].pipeline_classes}
    return name in video or "AnimateDiff" in name


def check_num_frames(source: ModelSource, num_frames: int | None, what: str = "--num-frames",
                     motion_adapter: str | None = None) -> None:
    """Refuse a frame count for an image model before it loads (a no-op when the class is unknown)."""
    if num_frames is None:
        return
    if num_frames < 1:
        raise ModelError(f"{what} must be >= 1, got {num_frames}")
    if is_video_model(source, motion_adapter) is False:
        raise ModelError(f"{what}={num_frames} is for video pipelines; {source.spec} is an image model "
                         f"({pipeline_class_name(source)})")


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
    lora_base: str | None = None,
):
    """Load a pipeline by model spec (a ModelSource, hub id, local folder, built-in id, or FOLDER:lora).

    ``vae`` overrides the pipeline's VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix`` for fp16 SDXL).
    ``motion_adapter`` (a ``MotionAdapter`` id or folder, e.g. ``guoyww/animatediff-motion-adapter-v1-5-2``)
    turns an SD 1.x base into an ``AnimateDiffPipeline``.
    ``custom_pipeline`` must be a local folder the user names (never fetched code) and
    ``trust_remote_code`` stays off unless asked for.
    """
    from diffusers import AutoencoderKL, DiffusionPipeline

    source = model if isinstance(model, ModelSource) else resolve_model(model, lora_base=lora_base)
    motion_adapter = motion_adapter or source.motion_adapter
    torch_dtype = parse_dtype(dtype)
    kwargs = {_DTYPE_KW: torch_dtype, "variant": variant, "trust_remote_code": trust_remote_code}
    if custom_pipeline is not None:
        if not (Path(custom_pipeline) / "pipeline.py").is_file():
            raise FileNotFoundError(
                f"custom pipeline {custom_pipeline!r} must be a local folder with a pipeline.py"
            )
        if not trust_remote_code:
            raise ValueError(
                f"custom pipeline {custom_pipeline!r} runs its own code: pass trust_remote_code=True to "
                "allow it"
            )
        kwargs["custom_pipeline"] = str(Path(custom_pipeline).resolve())
    if vae is not None:
        kwargs["vae"] = _load_or_explain(
            AutoencoderKL, resolve_model(vae, component=True), **{_DTYPE_KW: torch_dtype}
        )
    if motion_adapter is not None:
        from diffusers import AnimateDiffPipeline, MotionAdapter

        adapter = resolve_model(motion_adapter, component=True)
        kwargs["motion_adapter"] = _load_or_explain(MotionAdapter, adapter, **{_DTYPE_KW: torch_dtype})
        pipe = _load_or_explain(AnimateDiffPipeline, source, **kwargs)
    else:
        pipe = _load_or_explain(DiffusionPipeline, source, **kwargs)
    for folder in (*source.base_loras, source.lora) if source.lora else ():
        _merge_lora(pipe, folder, source.name)
    if device is not None:
        pipe.to(device)
    return pipe


@contextlib.contextmanager
def diffusers_log_level(level: int):
    """diffusers' logging verbosity set to ``level`` inside the block, restored after it."""
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(level)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before)


def _merge_lora(pipe, folder: str, base: str) -> None:
    """Load a LoRA folder and merge it into the weights (the pipeline is then a plain model)."""
    # quiet: "No LoRA keys associated to CLIPTextModel" (the LoRA is denoiser-only)
    with diffusers_log_level(logging.ERROR):
        try:
            pipe.load_lora_weights(folder)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(
                f"could not load LoRA folder {folder} onto {base}: {_first_line(err)}") from None
    pipe.fuse_lora()
    pipe.unload_lora_weights()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    # diffusers ends its offline message by pointing at a stack trace the user is not shown
    line = (text[0] if text else "").split(" Please check out the root cause")[0]
    return f"{type(err).__name__}: {line}"


def _load_or_explain(cls, source: ModelSource, **kwargs):
    """``cls.from_pretrained``, with any failure to find or read the model as one ModelError line."""
    # offline, diffusers logs "Couldn't connect to the Hub" before the error below
    quiet = diffusers_log_level(logging.ERROR) if source.kind == "hub" else contextlib.nullcontext()
    with quiet:
        try:
            return cls.from_pretrained(source.location(), **kwargs)
        except (OSError, ValueError, KeyError, TypeError) as err:
            if source.kind == "hub":
                raise ModelLoadError(
                    f"could not load {source.name!r} from the model hub ({_first_line(err)}). "
                    "Without network access, download it elsewhere and pass its local folder instead."
                ) from None
            raise ModelLoadError(
                f"could not load {cls.__name__} from {source.location()}: {_first_line(err)}"
            ) from None
