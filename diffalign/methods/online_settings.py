"""The settings every online method (PRDP, DDPO) shares: prompts, reward, sampling and update sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffalign.prompt_sets import check_prompt_source, load_prompt_source
from diffalign.sampling import SamplingSettings, settings_of
from diffalign.scorers import check_scorer_names


# ----------------------------------------------------------------------------------------------------
# Settings (the ``method`` section of an online method's config)
# ----------------------------------------------------------------------------------------------------
@dataclass
class OnlineSettings:
    """Sampling, reward and update settings shared by the online methods."""

    # Prompts: a file (.txt, .jsonl, .json, .tsv/.csv), a shipped set (ddpo-animals, smoke, parti,
    # toy-train, toy-heldout), or a parquet/arrow file / hub dataset read through `prompt_column`.
    prompts: str = "ddpo-animals"
    prompt_column: str = "prompt"
    reward: str = "jpeg_incompressibility"  # a scorer spec: a name, or a weighted sum "10*pickscore+2*hpsv2"
    num_prompts: int = 32  # N prompts per epoch (per process)
    samples_per_prompt: int = 16  # B trajectories per prompt
    gradient_steps_per_epoch: int = 10  # K
    num_steps: int = 50
    guidance_scale: float = 5.0
    eta: float = 1.0  # DDIM noise; 1 = DDPM ancestral (the papers' choice), must be > 0
    height: int | None = None  # None: the model's default
    width: int | None = None
    # video models (AnimateDiff, Wan): frames per sample; None: the pipeline's default
    num_frames: int | None = None
    sample_batch_size: int = 8  # trajectories per sampling call
    train_timesteps: int | None = None
    # prompt groups per backward pass (gradients accumulate over the epoch's groups)
    micro_batch_prompts: int = 1
    recompute_chunk_size: int = 1  # timesteps batched into one UNet forward when recomputing log-probs
    # None: a micro-batch's steps in one graph; N: exact, N steps per graph
    steps_per_backward: int | None = None
    max_bad_reward_fraction: float = 0.25  # stop when more of an epoch's rewards are NaN/inf
    # score each sampling call's images in the background while the next is sampled
    async_scoring: bool = False
    # every sample of a prompt group starts from the same initial noise (its steps' noise still differs):
    # DanceGRPO's --init_same_noise
    shared_group_noise: bool = False

    def sampling(self) -> SamplingSettings:
        """How the method samples its epochs."""
        return settings_of(self)


def validate_online_settings(cfg: OnlineSettings, require) -> None:
    """Range checks on the settings; no model loads (scorer names and the prompt source are checked too)."""
    validate_prompts_and_reward(cfg, require)
    for key in ("num_prompts", "samples_per_prompt", "gradient_steps_per_epoch", "num_steps",
                "sample_batch_size", "micro_batch_prompts", "recompute_chunk_size"):
        value = getattr(cfg, key)
        require(value >= 1, f"method.{key}", value, "an integer >= 1")
    require(cfg.steps_per_backward is None or cfg.steps_per_backward >= 1, "method.steps_per_backward",
            cfg.steps_per_backward, "null or an integer >= 1")
    require(cfg.eta > 0, "method.eta", cfg.eta, "a number > 0 (online methods need stochastic steps)")
    require(cfg.guidance_scale >= 0, "method.guidance_scale", cfg.guidance_scale, "a number >= 0")
    require(
        cfg.train_timesteps is None or 1 <= cfg.train_timesteps <= cfg.num_steps,
        "method.train_timesteps",
        cfg.train_timesteps,
        f"null or an integer in [1, {cfg.num_steps}]",
    )
    validate_sizes(cfg, require)
    require(
        0 <= cfg.max_bad_reward_fraction < 1,
        "method.max_bad_reward_fraction",
        cfg.max_bad_reward_fraction,
        "a number in [0, 1)",
    )


def validate_prompts_and_reward(cfg, require) -> None:
    """``method.prompts`` names a readable prompt source and ``method.reward`` a scorer spec (no model
    loads); shared by every method that samples its own training data."""
    require(bool(cfg.prompts), "method.prompts", cfg.prompts, "a prompt file, a shipped set or a dataset")
    try:
        check_prompt_source(cfg.prompts)
        if Path(cfg.prompts).is_file():
            load_prompt_source(cfg.prompts, cfg.prompt_column)  # a local file: read it before any model loads
    except (OSError, ValueError) as err:  # OSError: e.g. a path name too long for the file system
        require(False, "method.prompts", cfg.prompts, f"a prompt source that exists ({err})")
    try:
        check_scorer_names([cfg.reward])
    except (ValueError, FileNotFoundError, ImportError) as err:
        require(
            False,
            "method.reward",
            cfg.reward,
            f"a scorer spec, e.g. 'toy_saturation' or '10*pickscore+2*hpsv2' ({err})",
        )


def validate_sizes(cfg, require) -> None:
    """``method.height`` / ``width`` (null or multiples of 8) and ``num_frames`` (null or >= 1)."""
    require(
        cfg.num_frames is None or cfg.num_frames >= 1,
        "method.num_frames",
        cfg.num_frames,
        "null or an integer >= 1",
    )
    for key in ("height", "width"):
        value = getattr(cfg, key)
        require(
            value is None or (value >= 8 and value % 8 == 0),
            f"method.{key}",
            value,
            "null or a multiple of 8",
        )
