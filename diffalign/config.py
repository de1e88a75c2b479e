"""Typed training configuration: one dataclass per concern, mapped one-to-one from YAML.

A YAML file has one top-level section per dataclass below (``model``, ``lora``, ``data``, ``method``,
``optim``, ``train``, ``log``, ``checkpoint``, ``eval``). The ``method`` section names its method
(``name: dpo``) and holds that method's own settings, whose dataclass lives next to its loss in
:mod:`diffalign.methods`. Command-line overrides are ``dotted.key=value`` pairs parsed as YAML values.

Everything is checked here, before any model loads: an unknown key, a value of the wrong type or out of
range raises :class:`ConfigError` naming the key path, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diffalign.config_types import ConfigError, build_dataclass
from diffalign.families import FAMILIES
from diffalign.methods import METHODS
from diffalign.methods.base import SAMPLING_KINDS
from diffalign.models import check_num_frames, pipeline_class_name, resolve_model
from diffalign.prompts import read_prompts
from diffalign.sampling import SamplingSettings, settings_of
from diffalign.scorers import check_scorer_names


# ----------------------------------------------------------------------------------------------------
# The sections
# ----------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The base pipeline being aligned."""

    name: str = "tiny-sdxl"  # hub id, local diffusers folder, or built-in id (tiny-sdxl, toy-sdxl, ...)
    variant: str | None = None  # e.g. "fp16" weight files
    vae: str | None = None  # override the VAE (e.g. madebyollin/sdxl-vae-fp16-fix)
    # AnimateDiff: a MotionAdapter (hub id or folder) added to an SD 1.x base `name` (AnimateDiffPipeline)
    motion_adapter: str | None = None
    finetune: Literal["lora", "full"] = "lora"  # LoRA adapters on the UNet, or every UNet weight
    gradient_checkpointing: bool = False


@dataclass
class LoraConfig:
    """peft LoRA adapters on the UNet (used when ``model.finetune`` is ``lora``)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    init: Literal["gaussian", "default"] = "gaussian"  # gaussian: the diffusers training scripts' choice


@dataclass
class DataConfig:
    """Preference pairs: Pick-a-Pic v2 format (hub id / parquet / arrow) or JSONL of image paths."""

    source: str = ""  # hub id, parquet/arrow file or folder, a .jsonl file, or a `diffalign pairs` folder
    format: Literal["auto", "pickapic", "jsonl"] = "auto"
    split: str = "train"  # hub datasets only
    resolution: int = 64  # square training side in pixels
    random_crop: bool = False  # else center crop
    random_flip: bool = True  # one coin per pair: winner and loser flip together
    proportion_empty_prompts: float = 0.0  # the official DPO code silently uses 0.2
    max_pairs: int | None = None  # use only the first N non-tie pairs
    max_bad_fraction: float = 0.05  # stop if more than this fraction of rows read so far is unreadable
    num_workers: int = 0
    cache: bool = False  # encode text + VAE latents once (keyed by model and preprocessing)
    cache_dir: str | None = None  # default: $DIFFALIGN_CACHE/latents
    # Video models (AnimateDiff, Wan): frames per training video; null: eval.num_frames, else the pipeline's
    # default
    num_frames: int | None = None
    # a video of another length: evenly resample, or skip it
    frame_policy: Literal["resample", "reject"] = "resample"


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adafactor", "adamw8bit"] = "adamw"
    learning_rate: float = 1e-4
    scale_lr: bool = False  # multiply by batch size x accumulation x processes (the DPO scripts' option)
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant_with_warmup"
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # None: no clipping


@dataclass
class TrainingConfig:
    output_dir: str = "runs/diffalign"
    max_steps: int = 100  # optimizer steps
    batch_size: int = 1  # pairs per process per micro-step
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    resume: str | None = None  # "latest" or a checkpoint folder
    # stop after this many optimizer steps in a row with a NaN/inf loss or gradient
    max_nonfinite_steps: int = 5
    device: str | None = None  # None: accelerate's choice; "cpu" forces the CPU
    # Flow-matching models (SD3, FLUX, Wan), as diffusers' SD3/FLUX scripts: how the training sigma is drawn
    # from the pipeline's (shifted) flow schedule (their --weighting_scheme) and how each loss is weighted
    flow_timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform"
    flow_logit_mean: float = 0.0  # logit_normal only
    flow_logit_std: float = 1.0
    flow_mode_scale: float = 1.29  # mode only
    flow_loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    # FLUX (dynamically shifting schedulers): shift training sigmas by the resolution's mu, as at sampling
    flow_dynamic_shift: bool = False


@dataclass
class LogConfig:
    every_n_steps: int = 10
    # metrics.jsonl in the output folder is always written; tensorboard / wandb need their extra installed
    report_to: list[str] = field(default_factory=list)
    project: str = "diffalign"
    validation_every_n_steps: int = 0  # 0: never during training
    validation_prompts: list[str] = field(default_factory=list)
    # also run a small scored gallery (HTML page, eval.scorers) at validation steps
    validation_gallery: bool = False
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # 0: only the final output
    keep_last: int | None = None  # None: keep all
    on_sigterm: bool = True  # SIGTERM (preemption) saves a checkpoint and stops with exit status 143


@dataclass
class EvalConfig:
    """The before/after evaluation written at the end: same prompts, same seeds, base vs tuned."""

    enabled: bool = True
    prompts: list[str] = field(default_factory=list)  # empty: use prompts_file, else the validation prompts
    prompts_file: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    noise_per_prompt: bool = False  # true: prompt i of seed s draws noise seed s * 100000 + i, not s for all
    scorers: list[str] = field(default_factory=lambda: ["brightness"])
    num_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 1.0
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None  # video models; None: the pipeline's default
    batch_size: int = 8
    # The method's own loss / implicit accuracy on the first N training pairs at fixed noise draws,
    # before and after training (0: skip). Shows whether the objective was learned.
    train_pairs: int = 32
    train_pair_draws: int = 4
    every_n_steps: int = 0  # > 0: also every N steps, written as a curve (eval/curve.json, eval/curve.png)
    gallery: bool = False  # the gallery page of base vs tuned on these prompts (eval/gallery/index.html)

    def sampling(self) -> SamplingSettings:
        """The evaluation's sampling settings (also the validation samples')."""
        return settings_of(self)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: Any = None  # a method's config dataclass (diffalign.methods), chosen by `method.name`
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["method"] = {"name": self.method.name, **dataclasses.asdict(self.method)}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------------
# Range checks (types are already right here)
# ----------------------------------------------------------------------------------------------------
def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # e.g. a name too long for the file system
        return False


def _is_dir(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except OSError:
        return False


def _require(ok: bool, path: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(path, value, expected)


def validate(cfg: Config) -> None:
    """Value ranges and cross-field rules; only looks at strings and the file system (no model loads)."""
    try:
        source = resolve_model(cfg.model.name)
    except (ValueError, OSError) as err:  # OSError: e.g. a path name too long for the file system
        raise ConfigError("model.name", cfg.model.name, f"a model that exists ({err})") from None
    for key, frames in (("data.num_frames", cfg.data.num_frames), ("eval.num_frames", cfg.eval.num_frames),
                        ("method.num_frames", getattr(cfg.method, "num_frames", None))):
        if isinstance(frames, int) and frames >= 1:
            try:
                check_num_frames(source, frames, key, cfg.model.motion_adapter)
            except ValueError as err:
                raise ConfigError(key, frames, f"null for an image model ({err})") from None
    if cfg.model.motion_adapter is not None:
        try:
            resolve_model(cfg.model.motion_adapter)
        except (ValueError, OSError) as err:
            raise ConfigError(
                "model.motion_adapter", cfg.model.motion_adapter, f"a motion adapter that exists ({err})"
            ) from None
    if cfg.model.vae is not None:
        try:
            resolve_model(cfg.model.vae)
        except (ValueError, OSError) as err:
            raise ConfigError("model.vae", cfg.model.vae, f"a VAE that exists ({err})") from None
    lo = cfg.lora
    _require(lo.rank >= 1, "lora.rank", lo.rank, "an integer >= 1")
    _require(lo.alpha > 0, "lora.alpha", lo.alpha, "a number > 0")
    _require(0 <= lo.dropout < 1, "lora.dropout", lo.dropout, "a number in [0, 1)")
    _require(
        len(lo.target_modules) > 0,
        "lora.target_modules",
        lo.target_modules,
        "a non-empty list of module names",
    )

    d = cfg.data
    # Online, reward-gradient and NFT methods sample their own data from `method.prompts`; the others read
    # data.source.
    _require(bool(d.source) or METHODS[cfg.method.name].kind in SAMPLING_KINDS, "data.source", d.source,
             "a dataset: hub id, parquet/arrow path, .jsonl file or pairs folder")
    _require(
        d.resolution >= 8 and d.resolution % 8 == 0, "data.resolution", d.resolution, "a multiple of 8, >= 8"
    )
    _require(
        0 <= d.proportion_empty_prompts <= 1,
        "data.proportion_empty_prompts",
        d.proportion_empty_prompts,
        "a number in [0, 1]",
    )
    _require(
        d.max_pairs is None or d.max_pairs >= 1, "data.max_pairs", d.max_pairs, "null or an integer >= 1"
    )
    _require(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", d.max_bad_fraction, "a number in [0, 1]")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0")
    _require(
        d.num_frames is None or d.num_frames >= 1, "data.num_frames", d.num_frames, "null or an integer >= 1"
    )
    if d.cache:
        # A cache freezes preprocessing; random augmentation would be drawn once and reused forever.
        _require(not d.random_flip, "data.random_flip", d.random_flip, "false when data.cache is true")
        _require(not d.random_crop, "data.random_crop", d.random_crop, "false when data.cache is true")

    o = cfg.optim
    _require(o.learning_rate > 0, "optim.learning_rate", o.learning_rate, "a number > 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    _require(0 <= o.adam_beta1 < 1, "optim.adam_beta1", o.adam_beta1, "a number in [0, 1)")
    _require(0 <= o.adam_beta2 < 1, "optim.adam_beta2", o.adam_beta2, "a number in [0, 1)")
    _require(o.adam_epsilon > 0, "optim.adam_epsilon", o.adam_epsilon, "a number > 0")
    _require(o.lr_warmup_steps >= 0, "optim.lr_warmup_steps", o.lr_warmup_steps, "an integer >= 0")
    _require(
        o.max_grad_norm is None or o.max_grad_norm > 0,
        "optim.max_grad_norm",
        o.max_grad_norm,
        "null or a number > 0",
    )
    if o.optimizer == "adamw8bit":
        _require(importlib.util.find_spec("bitsandbytes") is not None, "optim.optimizer", o.optimizer,
                 "adamw or adafactor (adamw8bit needs `pip install bitsandbytes`)")

    t = cfg.train
    _require(t.max_steps >= 1, "train.max_steps", t.max_steps, "an integer >= 1")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    _require(
        t.gradient_accumulation_steps >= 1,
        "train.gradient_accumulation_steps",
        t.gradient_accumulation_steps,
        "an integer >= 1",
    )
    _require(t.flow_logit_std > 0, "train.flow_logit_std", t.flow_logit_std, "a number > 0")
    # the SD3 paper's range for which the mode density is a density (monotone map of the uniform)
    _require(-1 <= t.flow_mode_scale <= 2 / (math.pi - 2), "train.flow_mode_scale", t.flow_mode_scale,
             "a number in [-1, 2/(pi-2) = 1.75]")
    _require(
        t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", t.max_nonfinite_steps, "an integer >= 1"
    )
    _require(0 <= t.seed < 2**32, "train.seed", t.seed, "an integer in [0, 2**32)")  # numpy's seed range
    _require(t.resume is None or t.resume == "latest" or _is_dir(t.resume), "train.resume", t.resume,
             "null, 'latest', or an existing checkpoint folder")

    lg = cfg.log
    _require(lg.every_n_steps >= 1, "log.every_n_steps", lg.every_n_steps, "an integer >= 1")
    _require(
        lg.validation_every_n_steps >= 0,
        "log.validation_every_n_steps",
        lg.validation_every_n_steps,
        "an integer >= 0",
    )
    if lg.validation_every_n_steps:
        _require(bool(lg.validation_prompts), "log.validation_prompts", lg.validation_prompts,
                 "at least one prompt when log.validation_every_n_steps > 0")
    for i, tracker in enumerate(lg.report_to):
        _require(
            tracker in ("tensorboard", "wandb"), f"log.report_to[{i}]", tracker, "'tensorboard' or 'wandb'"
        )
        module = "tensorboard" if tracker == "tensorboard" else "wandb"
        if tracker == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None:
            continue
        _require(importlib.util.find_spec(module) is not None, f"log.report_to[{i}]", tracker,
                 f"an installed tracker (pip install 'diffalign[{module}]')")

    c = cfg.checkpoint
    _require(c.every_n_steps >= 0, "checkpoint.every_n_steps", c.every_n_steps, "an integer >= 0")
    _require(
        c.keep_last is None or c.keep_last >= 1,
        "checkpoint.keep_last",
        c.keep_last,
        "null or an integer >= 1",
    )

    e = cfg.eval
    if e.enabled:
        for i, name in enumerate(e.scorers):
            try:
                check_scorer_names([name])
            except (ValueError, NotImplementedError) as err:
                raise ConfigError(f"eval.scorers[{i}]", name, f"a scorer name or spec ({err})") from None
        _require(len(e.seeds) >= 1, "eval.seeds", e.seeds, "at least one seed")
        _require(
            e.num_steps >= 1, "eval.num_steps", e.num_steps, "an integer >= 1"
        )
        _require(e.eta >= 0, "eval.eta", e.eta, "a number >= 0")
        _require(e.guidance_scale >= 0, "eval.guidance_scale", e.guidance_scale, "a number >= 0")
        for i, seed in enumerate(e.seeds):
            _require(0 <= seed < 2**32, f"eval.seeds[{i}]", seed, "an integer in [0, 2**32)")
        for key in ("height", "width"):
            value = getattr(e, key)
            _require(
                value is None or (value >= 8 and value % 8 == 0),
                f"eval.{key}",
                value,
                "null or a multiple of 8, >= 8",
            )
        _require(
            e.num_frames is None or e.num_frames >= 1,
            "eval.num_frames",
            e.num_frames,
            "null or an integer >= 1",
        )
        _require(e.batch_size >= 1, "eval.batch_size", e.batch_size, "an integer >= 1")
        _require(e.train_pairs >= 0, "eval.train_pairs", e.train_pairs, "an integer >= 0")
        _require(e.train_pair_draws >= 1, "eval.train_pair_draws", e.train_pair_draws, "an integer >= 1")
        _require(e.every_n_steps >= 0, "eval.every_n_steps", e.every_n_steps, "an integer >= 0")
        _require(not e.noise_per_prompt or max(e.seeds, default=0) < 40_000, "eval.seeds", e.seeds,
                 "seeds < 40000 with eval.noise_per_prompt (noise seed s * 100000 + prompt index)")
        _require(e.prompts_file is None or _is_file(e.prompts_file), "eval.prompts_file", e.prompts_file,
                 "null or an existing prompt file")
        if e.prompts_file is not None and not e.prompts:  # read now, not after the model has loaded
            try:
                read_prompts(e.prompts_file)
            except ValueError as err:
                raise ConfigError(
                    "eval.prompts_file", e.prompts_file, f"a readable prompt file ({err})"
                ) from None
        _require(bool(e.prompts or e.prompts_file or lg.validation_prompts), "eval.prompts", e.prompts,
                 "prompts (or eval.prompts_file, or log.validation_prompts) when eval.enabled is true")

    spec = METHODS[cfg.method.name]
    if spec.validate is not None:
        spec.validate(cfg.method, _require)
    # a method that applies to some model families only (DiffusionNFT: flow matching), when the model's
    # pipeline class is known without loading it (else the objective checks the loaded pipeline)
    known = pipeline_class_name(source) if spec.check_family is not None else None
    for family in [f for f in FAMILIES.values() if known in f.pipeline_classes][:1]:
        try:
            spec.check_family(family)
        except NotImplementedError as err:
            expected = f"a model {spec.name} applies to ({err})"
            raise ConfigError("model.name", cfg.model.name, expected) from None


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set ``dotted.key=value`` pairs (values parsed as YAML) in the raw mapping."""
    if overrides and not isinstance(raw, dict):
        raise ConfigError("<root>", raw, f"a mapping with sections {', '.join(SECTIONS)}")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                item, item, "an override of the form dotted.key=value (e.g. optim.learning_rate=1e-5)"
            )
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(key, text, f"a YAML value ({err})") from None
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), child, "a section (mapping) to set sub-keys in")
            node = child
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict, *, check: bool = True) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("<root>", raw, f"a mapping with sections {', '.join(SECTIONS)}")
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(key, raw[key], f"no such section; sections: {', '.join(SECTIONS)}")
    kwargs = {}
    for name in SECTIONS:
        if name == "method":
            continue
        cls = typing.get_type_hints(Config)[name]
        kwargs[name] = build_dataclass(cls, raw.get(name), name)
    if not isinstance(raw.get("method") or {}, dict):
        raise ConfigError("method", raw.get("method"), "a mapping with a 'name' key")
    method_raw = dict(raw.get("method") or {})
    name = method_raw.pop("name", None)
    if name not in METHODS:
        raise ConfigError("method.name", name, f"one of {', '.join(repr(m) for m in METHODS)}")
    kwargs["method"] = build_dataclass(METHODS[name].config_class, method_raw, "method")
    cfg = Config(**kwargs)
    if check:
        validate(cfg)
    return cfg


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, check: bool = True
) -> Config:
    """Read a YAML config, apply ``dotted.key=value`` overrides, type-check and validate it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    if raw is None:  # an empty file: every default (an empty-but-not-null root is an error below)
        raw = {}
    resolve_config_paths(raw, path.parent)
    return config_from_dict(apply_overrides(raw, list(overrides)), check=check)


#: Keys whose value may name a file or folder to read. Written in a YAML file, a relative one means
#: relative to that file's folder; given as a command-line override, relative to the current folder.
#: ``train.output_dir`` is not among them: runs are written where the command runs.
INPUT_PATH_KEYS = (("model", "name"), ("model", "vae"), ("model", "motion_adapter"), ("data", "source"),
                   ("eval", "prompts_file"), ("method", "prompts"), ("method", "pretrain_data"),
                   ("train", "resume"))


def resolve_config_paths(raw: dict, folder: Path) -> None:
    """Make the input paths of a config read from ``folder`` absolute, in place.

    A value starting with ``./`` or ``../`` is always a path next to the config. Any other relative value
    (``data/pairs`` could also be a hub id) is taken as such a path only when it exists there; otherwise it
    is left as written (a hub id, a built-in model or prompt set, or a path relative to the current folder).
    A ``:lora`` suffix (a LoRA run as the model) is kept.
    """
    if not isinstance(raw, dict):
        return
    for section, key in INPUT_PATH_KEYS:
        node = raw.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        target, lora = (value.removesuffix(":lora"), ":lora") if value.endswith(":lora") else (value, "")
        candidate = folder / target
        if target.startswith(("./", "../")) or candidate.exists():
            node[key] = os.path.normpath(os.path.abspath(candidate)) + lora
