"""The online loop shared by PRDP and DDPO: sample, score, then K gradient steps on the stored steps.

One epoch::

    θ_old ← θ                                    (the policy as it is now: the sampler records log π_old)
    N prompts × B trajectories ← sample(θ_old)   (diffalign.sampler.sample, DDIM with eta 1)
    rewards ← weighted sum of scorers            (NaN/inf dropped and counted; all-equal groups skipped)
    log π_ref per step ← recompute(reference)    (PRDP; with LoRA: the same UNet with adapters disabled)
    repeat K times:                              (one optimizer step each)
        log π_θ ← recompute(θ) on all stored steps, or a random subset of them
        loss ← the method's loss (diffalign.methods.prdp / ddpo); backward, clip, step

The trainer (:mod:`diffalign.train`) runs it through :class:`OnlineObjective`: ``batches()`` samples an
epoch and yields it K times, and each call is one gradient step. The settings are the fields of
:class:`OnlineSettings`, shared by every online method's config; ``train.max_steps`` counts optimizer steps, so a run has ``ceil(max_steps / K)`` epochs.
Under ``accelerate launch`` every process samples its own N prompts (the effective batch is N × B ×
processes) and gradients are averaged as usual.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

log = logging.getLogger("diffalign.online")


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
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    eta: float = 1.0  # DDIM noise; 1 = DDPM ancestral (the papers' choice), must be > 0
    height: int | None = None  # None: the model's default
    width: int | None = None
    num_frames: int | None = None  # video models (AnimateDiff, Wan): frames per sample; None: the pipeline's default
    sample_batch_size: int = 8  # trajectories per sampling call
    train_timesteps: int | None = None  # None: all stored steps; N: a random subset of N steps per gradient step
    micro_batch_prompts: int = 1  # prompt groups per backward pass (gradients accumulate over the epoch's groups)
    recompute_chunk_size: int = 1  # timesteps batched into one UNet forward when recomputing log-probs
    steps_per_backward: int | None = None  # None: a micro-batch's steps in one graph; N: exact, N steps per graph
    max_bad_reward_fraction: float = 0.25  # stop when more of an epoch's rewards are NaN/inf
    async_scoring: bool = False  # score each sampling call's images in the background while the next is sampled


def validate_online_settings(cfg: OnlineSettings, require) -> None:
    """Range checks on the settings; no model loads (scorer names and the prompt source are checked too)."""
    from diffalign.scorers import check_scorer_names

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
        require(False, "method.reward", cfg.reward, f"a scorer spec, e.g. 'toy_saturation' or '10*pickscore+2*hpsv2' ({err})")
    for key in ("num_prompts", "samples_per_prompt", "gradient_steps_per_epoch", "num_inference_steps",
                "sample_batch_size", "micro_batch_prompts", "recompute_chunk_size"):
        value = getattr(cfg, key)
        require(value >= 1, f"method.{key}", value, "an integer >= 1")
    require(cfg.steps_per_backward is None or cfg.steps_per_backward >= 1, "method.steps_per_backward",
            cfg.steps_per_backward, "null or an integer >= 1")
    require(cfg.eta > 0, "method.eta", cfg.eta, "a number > 0 (online methods need stochastic steps)")
    require(cfg.guidance_scale >= 0, "method.guidance_scale", cfg.guidance_scale, "a number >= 0")
    require(cfg.train_timesteps is None or 1 <= cfg.train_timesteps <= cfg.num_inference_steps,
            "method.train_timesteps", cfg.train_timesteps, f"null or an integer in [1, {cfg.num_inference_steps}]")
    require(cfg.num_frames is None or cfg.num_frames >= 1, "method.num_frames", cfg.num_frames, "null or an integer >= 1")
    for key in ("height", "width"):
        value = getattr(cfg, key)
        require(value is None or (value >= 8 and value % 8 == 0), f"method.{key}", value, "null or a multiple of 8")
    require(0 <= cfg.max_bad_reward_fraction < 1, "method.max_bad_reward_fraction", cfg.max_bad_reward_fraction,
            "a number in [0, 1)")


# ----------------------------------------------------------------------------------------------------
# Prompt sources
# ----------------------------------------------------------------------------------------------------
TOY_PROMPT_SETS = ("toy-train", "toy-heldout")
_TABLE_SUFFIXES = (".parquet", ".arrow")


def check_prompt_source(spec: str) -> None:
    """Cheap check that ``spec`` can be a prompt source (no dataset is read)."""
    from diffalign.data import _HUB_ID
    from diffalign.gallery.prompt_sets import check_prompt_spec

    path = Path(spec)
    if spec in TOY_PROMPT_SETS or (path.is_file() and path.suffix in _TABLE_SUFFIXES):
        return
    if not path.exists() and _HUB_ID.match(spec) and "." not in Path(spec).suffix:
        return  # a hub dataset id: loaded at run time
    check_prompt_spec(spec)


def load_prompt_source(spec: str, column: str = "prompt") -> list[str]:
    """The prompts of ``spec``: a file, a shipped set, the toy world's splits, or a dataset column."""
    from diffalign.gallery.prompt_sets import known_prompt_sets, load_prompts

    check_prompt_source(spec)
    if spec in TOY_PROMPT_SETS:
        from diffalign.toy.data import toy_prompts

        return toy_prompts(spec.removeprefix("toy-"))
    path = Path(spec)
    if (path.is_file() and path.suffix in _TABLE_SUFFIXES) or (not path.exists() and spec not in known_prompt_sets()):
        return _dataset_column(spec, column)
    if path.suffix == ".jsonl" and column != "prompt":
        from diffalign.prompts import read_prompts

        return read_prompts(path, key=column)
    return load_prompts(spec)


def _dataset_column(spec: str, column: str) -> list[str]:
    import datasets

    path = Path(spec)
    if path.is_file():
        try:
            data = datasets.Dataset.from_parquet(str(path)) if path.suffix == ".parquet" else datasets.Dataset.from_file(str(path))
        except Exception as err:  # pyarrow raises many types for a broken file
            raise ValueError(f"prompt dataset {path}: cannot read as {path.suffix[1:]} ({type(err).__name__}: {err})") from None
    else:
        try:
            data = datasets.load_dataset(spec, split="train")
        except Exception as err:
            raise RuntimeError(f"could not load prompt dataset {spec!r} ({type(err).__name__}: {err}); "
                               "without network access pass a local .txt/.jsonl/.parquet file") from err
    if column not in data.column_names:
        raise ValueError(f"prompt dataset {spec}: no column {column!r} (has: {', '.join(data.column_names)}); "
                         "set method.prompt_column")
    prompts = [str(p).strip() for p in data[column] if p is not None and str(p).strip()]
    if not prompts:
        raise ValueError(f"prompt dataset {spec}: column {column!r} has no non-empty prompts")
    return prompts


# ----------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------
class RewardError(RuntimeError):
    """A scorer raised, or too many rewards were not finite."""


def make_reward(spec: str) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """``reward(images, prompts) -> [B]`` on the CPU: the scorer spec's (weighted) score.

    A scorer that raises becomes a :class:`RewardError` naming it (the failing part of a weighted sum).
    """
    from diffalign.scorers import CombinedScorer, make_scorer

    scorer = make_scorer(spec)
    parts = scorer.parts if isinstance(scorer, CombinedScorer) else [(1.0, scorer)]

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = torch.zeros(len(images))
        for weight, part in parts:
            try:
                scores = part.score(images, prompts)
            except Exception as err:
                raise RewardError(f"reward scorer {part.name!r} raised {type(err).__name__}: {err}") from err
            total += weight * scores.detach().float().cpu()
        return total

    return reward


# ----------------------------------------------------------------------------------------------------
# One epoch's samples
# ----------------------------------------------------------------------------------------------------
@dataclass
class OnlineBatch:
    """The trajectories of one epoch, with everything the losses need, for the kept samples only.

    ``logp_old`` / ``logp_ref`` are [n, S] at the stochastic ``steps`` (indices into the trajectory).
    """

    trajectory: object  # diffalign.sampler.Trajectory
    rewards: torch.Tensor  # [n]
    groups: torch.Tensor  # [n] prompt group id
    steps: torch.Tensor  # [S]
    logp_old: torch.Tensor  # [n, S]
    logp_ref: torch.Tensor | None = None  # [n, S]
    advantages: torch.Tensor | None = None  # [n]
    stats: dict = field(default_factory=dict)

    def to(self, device) -> OnlineBatch:
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return OnlineBatch(self.trajectory, move(self.rewards), move(self.groups), self.steps, move(self.logp_old),
                           move(self.logp_ref), move(self.advantages), self.stats)

    def select(self, index: torch.Tensor, columns: torch.Tensor | None = None) -> OnlineBatch:
        pick = (lambda x: x[index]) if columns is None else (lambda x: x[index][:, columns])
        return OnlineBatch(
            trajectory=self.trajectory.select(index), rewards=self.rewards[index], groups=self.groups[index],
            steps=self.steps if columns is None else self.steps[columns], logp_old=pick(self.logp_old),
            logp_ref=None if self.logp_ref is None else pick(self.logp_ref),
            advantages=None if self.advantages is None else self.advantages[index], stats=self.stats)


def sample_epoch(pipe, prompts: list[str], settings: OnlineSettings, seeds: list[int], reward, model_name: str = ""):
    """Sample ``len(prompts) × B`` trajectories (grouped by prompt) and score them.

    Returns ``(trajectory, rewards [n], groups [n], timings)`` with all samples, NaN rewards included.
    Videos are scored by the reward's image scorers averaged over frames.
    """
    from diffalign.sampler import Trajectory, sample
    from diffalign.scorers.async_scoring import ScoringQueue

    frames = {"num_frames": settings.num_frames} if settings.num_frames is not None else {}
    jobs = [(p, g) for g, p in enumerate(prompts) for _ in range(settings.samples_per_prompt)]
    parts, images = [], []
    scoring = ScoringQueue(reward) if settings.async_scoring else None
    t0 = time.perf_counter()
    for start in range(0, len(jobs), settings.sample_batch_size):
        chunk = jobs[start : start + settings.sample_batch_size]
        out = sample(pipe, [p for p, _ in chunk], seeds=seeds[start : start + len(chunk)],
                     num_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                     eta=settings.eta, height=settings.height, width=settings.width, model_name=model_name, **frames)
        parts.append(_on_cpu(out.trajectory))  # an epoch's trajectories wait on the host, not the GPU
        images.append(out.images.cpu())
        if scoring is not None:
            scoring.submit(images[-1], [p for p, _ in chunk])
    t1 = time.perf_counter()
    trajectory = Trajectory.cat(parts)
    # async: scoring_s is only the wait for the batches still being scored when sampling ended
    rewards = scoring.gather() if scoring is not None else reward(torch.cat(images), trajectory.prompts)
    t2 = time.perf_counter()
    groups = torch.tensor([g for _, g in jobs])
    return trajectory, rewards, groups, {"sampling_s": t1 - t0, "scoring_s": t2 - t1}


def _on_cpu(trajectory):
    from dataclasses import replace

    cpu = lambda d: {k: v.cpu() for k, v in d.items()}  # noqa: E731
    return replace(trajectory, latents=trajectory.latents.cpu(), log_probs=trajectory.log_probs.cpu(),
                   cond=cpu(trajectory.cond), uncond=cpu(trajectory.uncond))


def filter_rewards(rewards: torch.Tensor, groups: torch.Tensor, max_bad_fraction: float):
    """Which samples to keep: finite rewards, in groups whose rewards are not all equal.

    Raises :class:`RewardError` when more than ``max_bad_fraction`` of the rewards are NaN/inf.
    """
    finite = torch.isfinite(rewards)
    num_bad = int((~finite).sum())
    if num_bad:
        log.warning("dropped %d of %d samples with a NaN/inf reward", num_bad, len(rewards))
        if num_bad > max_bad_fraction * len(rewards):
            raise RewardError(f"{num_bad} of {len(rewards)} rewards are NaN/inf (more than "
                              f"max_bad_reward_fraction={max_bad_fraction}); check the reward scorers")
    keep = finite.clone()
    num_flat = 0
    for g in groups.unique():
        member = (groups == g) & finite
        values = rewards[member]
        if len(values) < 2 or bool((values == values[0]).all()):
            keep &= ~member
            num_flat += 1
    if num_flat:
        log.warning("skipped %d prompt group(s) whose rewards are all equal (or fewer than 2): nothing to learn "
                    "from them", num_flat)
    return keep, {"num_bad_rewards": num_bad, "num_flat_groups": num_flat}


def stochastic_steps(trajectory) -> torch.Tensor:
    return torch.nonzero(trajectory.stochastic, as_tuple=True)[0]


@torch.no_grad()
def batched_log_probs(denoiser, trajectory, steps: torch.Tensor, *, chunk_size: int, sample_batch: int) -> torch.Tensor:
    """``recompute_log_probs`` over many samples, ``sample_batch`` at a time, without gradients."""
    from diffalign.sampler import recompute_log_probs

    out = []
    for start in range(0, len(trajectory), sample_batch):
        part = trajectory.select(torch.arange(start, min(start + sample_batch, len(trajectory))))
        out.append(recompute_log_probs(denoiser, part, steps, chunk_size=chunk_size).float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------
# The objective the trainer drives (diffalign.train): one call = one gradient step
# ----------------------------------------------------------------------------------------------------
def micro_batches(groups: torch.Tensor, prompts_per_micro_batch: int) -> list[torch.Tensor]:
    """Sample indices split by whole prompt groups (PRDP's pairs never cross a micro-batch)."""
    ids = groups.unique()
    return [torch.nonzero(torch.isin(groups, ids[i : i + prompts_per_micro_batch]), as_tuple=True)[0]
            for i in range(0, len(ids), prompts_per_micro_batch)]


def online_loss(method_cfg, part: OnlineBatch, logp: torch.Tensor):
    """The method's loss on (part of) an epoch batch; ``logp`` [n, S] are the policy's log-probs."""
    if method_cfg.name == "prdp":
        from diffalign.methods.prdp import prdp_loss

        return prdp_loss(logp, part.logp_old, part.logp_ref, part.rewards, part.groups, beta=method_cfg.beta,
                         clip_epsilon=method_cfg.clip_epsilon, log_ratio=method_cfg.log_ratio)
    if method_cfg.name == "ddpo":
        from diffalign.methods.ddpo import ddpo_loss

        return ddpo_loss(logp, part.logp_old, part.advantages, clip_range=method_cfg.clip_range,
                         adv_clip_max=method_cfg.adv_clip_max)
    raise NotImplementedError(f"method {method_cfg.name!r} has no online loss")


def loss_weight(method_cfg, part: OnlineBatch) -> float:
    """How much of the epoch's mean a micro-batch carries: its pairs (PRDP) or its samples (DDPO)."""
    if method_cfg.name == "prdp":
        from diffalign.methods.prdp import reward_pairs

        return float(len(reward_pairs(part.rewards, part.groups)[0]))
    return float(len(part.rewards))


MAX_EMPTY_EPOCHS = 5


class OnlineObjective:
    """PRDP / DDPO for the trainer: ``batches()`` samples an epoch and yields it K times; each call is one
    gradient step of the method's loss over all of the epoch's samples, micro-batch by micro-batch."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.settings = ctx.cfg.method
        self.prompts = load_prompt_source(self.settings.prompts, self.settings.prompt_column)
        self.reward = make_reward(self.settings.reward)
        self.epoch = 0
        self.current: OnlineBatch | None = None  # the epoch being trained on, used ``self.used`` times so far
        self.used = 0
        self.steps_rng = torch.Generator().manual_seed(ctx.cfg.train.seed)
        log.info("%s: %d prompts from %s; reward %s", self.settings.name, len(self.prompts), self.settings.prompts,
                 self.settings.reward)

    # -- sampling ------------------------------------------------------------------------------------
    def collect(self) -> OnlineBatch | None:
        """Sample, score and store one epoch; None when no prompt group has anything to learn from."""
        from diffalign.train import unwrap

        ctx, m = self.ctx, self.settings
        seed = epoch_seed(ctx.cfg.train.seed, self.epoch, ctx.accelerator.process_index)
        prompts = choose_prompts(self.prompts, m.num_prompts, seed)
        seeds = [seed + i for i in range(len(prompts) * m.samples_per_prompt)]
        unet = unwrap(ctx.unet)
        unet.eval()
        trajectory, rewards, groups, timings = sample_epoch(ctx.pipe, prompts, m, seeds, self.reward, ctx.cfg.model.name)
        unet.train()
        keep, stats = filter_rewards(rewards, groups, m.max_bad_reward_fraction)
        finite = rewards[torch.isfinite(rewards)]
        stats |= timings | {"reward_mean": float(finite.mean()) if len(finite) else float("nan"),
                            "reward_std": float(finite.std()) if len(finite) > 1 else 0.0}
        if not bool(keep.any()):
            log.warning("epoch %d: no prompt group with distinct rewards; sampling again", self.epoch)
            return None
        index = torch.nonzero(keep, as_tuple=True)[0]
        trajectory, rewards, groups = trajectory.select(index), rewards[index], groups[index]
        steps = stochastic_steps(trajectory)
        batch = OnlineBatch(trajectory, rewards, groups, steps, trajectory.log_probs[:, steps].float(), stats=stats)
        if m.name == "ddpo":
            from diffalign.methods.ddpo import per_prompt_advantages

            batch.advantages = per_prompt_advantages(rewards, groups)
        if ctx.spec.needs_reference:
            t0 = time.perf_counter()
            with ctx.reference() as reference:
                batch.logp_ref = batched_log_probs(reference, trajectory, steps, chunk_size=m.recompute_chunk_size,
                                                   sample_batch=m.sample_batch_size)
            stats["reference_s"] = time.perf_counter() - t0
        return batch

    def batches(self):
        """The current epoch's batch, ``gradient_steps_per_epoch x accumulation`` times, then a new epoch."""
        repeats = self.settings.gradient_steps_per_epoch * self.ctx.cfg.train.gradient_accumulation_steps
        while True:
            if self.current is None or self.used >= repeats:
                self.current, self.used = self.next_epoch(), 0
            self.used += 1
            yield self.current

    def next_epoch(self) -> OnlineBatch:
        for _ in range(MAX_EMPTY_EPOCHS):
            batch = self.collect()
            self.epoch += 1
            if batch is not None:
                return batch
        raise RewardError(f"{MAX_EMPTY_EPOCHS} epochs in a row had no prompt group with distinct rewards: the "
                          f"reward ({self.settings.reward}) does not separate samples")

    # -- one gradient step -----------------------------------------------------------------------------
    def __call__(self, batch: OnlineBatch):
        """Backward every piece of the epoch's loss but the last here; return a loss whose value is the
        whole epoch's loss and whose gradient is the last piece's (the trainer calls backward on it)."""
        from diffalign.methods import LossOutput

        ctx, m = self.ctx, self.settings
        t0 = time.perf_counter()
        columns = None
        if m.train_timesteps is not None and m.train_timesteps < len(batch.steps):
            columns = torch.randperm(len(batch.steps), generator=self.steps_rng)[: m.train_timesteps].sort().values
        parts = [batch.select(index, columns) for index in micro_batches(batch.groups, m.micro_batch_prompts)]
        weights = [loss_weight(m, part) for part in parts]
        parts, weights = [p for p, w in zip(parts, weights, strict=True) if w > 0], [w for w in weights if w > 0]
        total = sum(weights)
        metrics: dict[str, float] = {}
        done = 0.0
        for j, (part, weight) in enumerate(zip(parts, weights, strict=True)):
            out, pieces = self._loss_pieces(part, weight / total)
            for k, piece in enumerate(pieces):
                last = j == len(parts) - 1 and k == len(pieces) - 1
                with contextlib.nullcontext() if last else ctx.accelerator.no_sync(ctx.unet):
                    term, value = piece()
                    if not last:
                        ctx.accelerator.backward(term)
                done += value
            for key, value in {"implicit_acc": out.implicit_acc, "reward_margin": out.reward_margin, **out.extra}.items():
                metrics[key] = metrics.get(key, 0.0) + float(value) * weight / total
        loss = term + (done - float(term.detach()))  # value: the epoch's loss; gradient: the last piece's
        metrics |= {k: v for k, v in batch.stats.items()} | {"train_s": time.perf_counter() - t0}
        implicit_acc = torch.tensor(metrics.pop("implicit_acc"))
        reward_margin = torch.tensor(metrics.pop("reward_margin"))
        return LossOutput(loss, implicit_acc, reward_margin, {k: torch.tensor(float(v)) for k, v in metrics.items()})

    def _loss_pieces(self, part: OnlineBatch, scale: float):
        """The method's loss on one micro-batch, as pieces ``() -> (graph term, loss value)`` whose
        gradients sum to the gradient of ``scale × loss``.

        One piece: all of the micro-batch's steps in one graph. With ``steps_per_backward``: the policy's
        log-probs are first computed without a graph, ``d loss / d log π_θ`` is taken on them, and each
        chunk of steps is recomputed with a graph and back-propagated as ``Σ grad · log π_θ`` (exact, one
        more forward pass, memory for only ``steps_per_backward`` steps).
        """
        from diffalign.sampler import recompute_log_probs

        ctx, m = self.ctx, self.settings
        recompute = lambda steps: recompute_log_probs(ctx.unet, part.trajectory, steps, chunk_size=m.recompute_chunk_size)  # noqa: E731
        if m.steps_per_backward is None or m.steps_per_backward >= len(part.steps):
            logp = recompute(part.steps).float()
            out = online_loss(m, part.to(logp.device), logp)
            term = out.loss * scale
            return out, [lambda: (term, float(term.detach()))]
        with torch.no_grad():
            logp = recompute(part.steps).float()
        leaf = logp.requires_grad_(True)
        out = online_loss(m, part.to(leaf.device), leaf)
        (grad,) = torch.autograd.grad(out.loss * scale, leaf)
        value = float(out.loss.detach()) * scale
        chunks = torch.arange(len(part.steps)).split(m.steps_per_backward)

        def piece(cols, first):
            return lambda: ((grad[:, cols] * recompute(part.steps[cols]).float()).sum(), value if first else 0.0)

        return out, [piece(cols, k == 0) for k, cols in enumerate(chunks)]

    # -- checkpoints: the epoch counter, and the current epoch's samples so a resume finishes that epoch --
    def state_dict(self) -> dict:
        current = None
        if self.current is not None:
            current = {f.name: getattr(self.current, f.name) for f in fields(OnlineBatch)}
            current["trajectory"] = {f.name: getattr(self.current.trajectory, f.name) for f in fields(self.current.trajectory)}
        return {"epoch": self.epoch, "used": self.used, "steps_rng": self.steps_rng.get_state(), "current": current}

    def load_state_dict(self, state: dict) -> None:
        from diffalign.sampler import Trajectory

        self.epoch, self.used = state["epoch"], state["used"]
        self.steps_rng.set_state(state["steps_rng"])
        current = state["current"]
        if current is not None:
            current = dict(current, trajectory=Trajectory(**current["trajectory"]))
        self.current = None if current is None else OnlineBatch(**current)


def build_online_objective(ctx) -> OnlineObjective:
    return OnlineObjective(ctx)


def epoch_seed(seed: int, epoch: int, process: int) -> int:
    return (seed * 1_000_003 + epoch * 9_973 + process * 101) % (2**31)


def choose_prompts(prompts: list[str], n: int, seed: int) -> list[str]:
    """N prompts for one epoch: without replacement when there are enough, else with replacement."""
    rng = random.Random(seed)
    return rng.sample(prompts, n) if n <= len(prompts) else rng.choices(prompts, k=n)
