"""The scorer interface: ``score(images, prompts) -> tensor [B]``, and the registry of scorers by name."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from diffalign.images import to_tensor

ImageBatch = torch.Tensor | Sequence[Image.Image]


class Scorer:
    """A reward on images (optionally conditioned on their prompts).

    Subclasses set the class attributes and implement ``_score`` for one batch: it receives either a
    float tensor ``[b, 3, H, W]`` in [0, 1] or a list of PIL images (whatever the caller passed; use
    :func:`diffalign.images.to_tensor` or a PIL preprocessing path) and returns ``[b]``.

    ``higher_is_better`` is the direction of the raw score. ``differentiable`` scorers keep the autograd
    graph from tensor inputs to the score, so they can serve as a reward gradient.

    Videos ``[B, F, 3, H, W]`` are scored frame by frame and averaged per video: over all frames
    (``video_frames=None``) or over ``video_frames`` evenly spaced ones (first and last included).
    """

    name: str = ""
    higher_is_better: bool = True
    differentiable: bool = False
    needs_prompts: bool = False
    batch_size: int = 16
    video_frames: int | None = None

    def _score(self, images: ImageBatch, prompts: list[str] | None) -> torch.Tensor:
        raise NotImplementedError

    def score(
        self, images: ImageBatch | Image.Image, prompts: Sequence[str] | str | None = None
    ) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        elif isinstance(images, torch.Tensor) and images.ndim == 3:
            images = to_tensor(images)
        elif isinstance(images, torch.Tensor) and images.ndim == 5:
            return self._score_video(images, prompts)
        n = len(images)
        if n == 0:
            raise ValueError(f"scorer {self.name!r}: no images to score")
        if isinstance(prompts, str):
            prompts = [prompts] * n
        if prompts is not None:
            prompts = list(prompts)
            if len(prompts) != n:
                raise ValueError(f"scorer {self.name!r}: got {n} images but {len(prompts)} prompts")
        elif self.needs_prompts:
            raise ValueError(f"scorer {self.name!r} needs one prompt per image")
        if isinstance(images, torch.Tensor) and (images.ndim != 4 or images.shape[1] != 3):
            raise ValueError(
                f"scorer {self.name!r}: image tensors must be [B, 3, H, W] in [0, 1], got "
                f"{tuple(images.shape)}"
            )
        keep_graph = self.differentiable and isinstance(images, torch.Tensor) and images.requires_grad
        with torch.set_grad_enabled(keep_graph and torch.is_grad_enabled()):
            scores = [
                self._score(
                    images[i : i + self.batch_size],
                    None if prompts is None else prompts[i : i + self.batch_size],
                )
                for i in range(0, n, self.batch_size)
            ]
        return torch.cat([s.reshape(-1).float() for s in scores])

    __call__ = score

    def hits(self, images, prompts) -> list[dict[str, float]] | None:
        """Per image, the named checks its score is made of (1 right, 0 wrong), for scorers built from such
        checks (``toy_geneval``: colour, shape, count ...); None for the others. The trainer's before/after
        grid draws them as ticks and crosses."""
        return None

    def _score_video(self, videos: torch.Tensor, prompts: Sequence[str] | str | None) -> torch.Tensor:
        b, f = videos.shape[:2]
        index = video_frame_indices(f, self.video_frames).to(videos.device)
        frames = videos[:, index].flatten(0, 1)
        k = len(index)
        if isinstance(prompts, str):
            prompts = [prompts] * b
        if prompts is not None:
            prompts = list(prompts)
            if len(prompts) != b:
                raise ValueError(f"scorer {self.name!r}: got {b} videos but {len(prompts)} prompts")
            prompts = [p for p in prompts for _ in range(k)]
        return self.score(frames, prompts).view(b, k).mean(dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def video_frame_indices(num_frames: int, k: int | None) -> torch.Tensor:
    """All frame indices (``k`` None or 0, or ``k >= num_frames``), else ``k`` evenly spaced ones."""
    if k is None or k <= 0 or k >= num_frames:
        return torch.arange(num_frames)
    return torch.linspace(0, num_frames - 1, k).round().long()


class CombinedScorer(Scorer):
    """A weighted sum of scorers, e.g. PRDP's ``10*pickscore + 2*hpsv2 + 0.05*aesthetic``.

    Each part preprocesses and batches on its own; the sum is differentiable when every part is.
    """

    def __init__(self, parts: Sequence[tuple[float, Scorer]]):
        if not parts:
            raise ValueError("a combined scorer needs at least one part")
        self.parts = list(parts)
        self.name = " + ".join(f"{w:g}*{s.name}" for w, s in self.parts)
        self.differentiable = all(s.differentiable for _, s in self.parts)
        self.needs_prompts = any(s.needs_prompts for _, s in self.parts)

    @property
    def video_frames(self):
        return self.parts[0][1].video_frames

    @video_frames.setter
    def video_frames(self, value):
        for _, scorer in self.parts:
            scorer.video_frames = value

    def score(self, images, prompts=None) -> torch.Tensor:
        total = None
        for weight, scorer in self.parts:
            value = weight * scorer.score(images, prompts)
            total = value if total is None else total + value.to(total.device)
        return total

    __call__ = score

    def __repr__(self) -> str:
        return f"CombinedScorer({self.name!r})"


NORMALIZATIONS = ("none", "zscore")


class NormalizedScorer(Scorer):
    """A scorer's scores standardised by running statistics: ``(s - mean) / std`` over every finite score
    seen so far, this batch included (``normalize=zscore``). Puts the terms of a weighted sum on one scale
    whatever their units (PickScore ~22, HPSv2 ~0.27), so the weights say how much each term counts.

    The statistics are constants for autograd (a differentiable scorer stays differentiable), live in
    this object (one per process; a resumed run starts them afresh) and are meant for training rewards;
    an evaluation reward should stay raw so runs can be compared.
    """

    def __init__(self, scorer: Scorer, eps: float = 1e-6):
        self.inner, self.eps = scorer, eps
        self.name = scorer.name
        self.higher_is_better, self.differentiable = scorer.higher_is_better, scorer.differentiable
        self.needs_prompts = scorer.needs_prompts
        self.count, self.mean, self.m2 = 0, 0.0, 0.0  # Welford's running mean and sum of squared deviations

    # The inner scorer batches and samples video frames; these settings are its own.
    batch_size = property(
        lambda self: self.inner.batch_size, lambda self, v: setattr(self.inner, "batch_size", v)
    )
    video_frames = property(
        lambda self: self.inner.video_frames, lambda self, v: setattr(self.inner, "video_frames", v)
    )

    @property
    def std(self) -> float:
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def update(self, values: torch.Tensor) -> None:
        for value in values[torch.isfinite(values)].double().tolist():
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (value - self.mean)

    def score(self, images, prompts=None) -> torch.Tensor:
        scores = self.inner.score(images, prompts)
        self.update(scores.detach().float().cpu())
        return (scores - self.mean) / max(self.std, self.eps)

    __call__ = score

    def __repr__(self) -> str:
        return f"NormalizedScorer({self.inner!r}, count={self.count})"


SCORERS: dict[str, Callable[..., Scorer]] = {}
#: Settings every scorer accepts (set on the built scorer, not passed to its constructor; ``normalize``
#: wraps it in a :class:`NormalizedScorer`).
COMMON_SETTINGS = ("batch_size", "video_frames", "normalize")


def register_scorer(name: str):
    """Class or factory decorator: ``make_scorer(name, **settings)`` will build it."""

    def decorate(factory):
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} is registered twice")
        SCORERS[name] = factory
        return factory

    return decorate


def available_scorers() -> list[str]:
    return sorted(SCORERS)


NUMBER_PATTERN = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TERM = re.compile(
    rf"^\s*(?:(?P<weight>{NUMBER_PATTERN})\s*\*\s*)?(?P<name>[A-Za-z_][\w.-]*)\s*(?::(?P<settings>.*))?$",
    re.S,
)


def _parse_value(text: str):
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _split_settings(text: str) -> list[str]:
    """Split on commas outside double or single quotes (a judge's prompt may hold commas)."""
    items, current, quote = [], "", None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == ",":
            items.append(current)
            current = ""
            continue
        current += char
    if quote:
        raise ValueError(f"unbalanced {quote} quote in scorer settings {text!r}")
    return [*items, current]


def _parse_settings(text: str | None, spec: str, positional: str | None = None) -> dict:
    """``KEY=VALUE,...``; a quoted value keeps commas and is a string. With ``positional`` (e.g. ``url``
    for ``remote:http://host:port``) a first item that is not ``KEY=VALUE`` is that setting's value."""
    settings = {}
    for i, item in enumerate(_split_settings(text or "")):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not (sep and key.strip().isidentifier()):
            if i == 0 and positional is not None:
                settings[positional] = item.strip()
                continue
            raise ValueError(f"scorer spec {spec!r}: setting {item.strip()!r} is not KEY=VALUE")
        value = value.strip()
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'"
        settings[key.strip()] = value[1:-1] if quoted else _parse_value(value)
    return settings


def parse_scorer_spec(spec: str) -> list[tuple[float | None, str, dict]]:
    """``"10*pickscore:model=/m,dtype=float16 + 2*hpsv2:version=v2.1"`` ->
    ``[(weight, name, settings), ...]``.

    A term is ``[WEIGHT*]NAME[:KEY=VALUE,...]``; terms are joined by ``+``. A ``+`` inside a setting value
    (the aesthetic head is ``sac+logos+ava1-l14-linearMSE.pth``) stays in the value, because what follows
    it is not a registered scorer name.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty scorer spec {spec!r}; known scorers: {', '.join(available_scorers())}")
    pieces: list[str] = []
    for piece in spec.split("+"):
        match = _TERM.match(piece)
        starts_term = match is not None and (match["name"] in SCORERS or match["weight"] is not None)
        if pieces and ":" in pieces[-1] and not starts_term:
            pieces[-1] += "+" + piece
        else:
            pieces.append(piece)
    terms = []
    for piece in pieces:
        match = _TERM.match(piece)
        if match is None:
            raise ValueError(
                f"cannot read scorer spec {spec!r} at {piece.strip()!r}: expected "
                "[WEIGHT*]NAME[:KEY=VALUE,...] joined by '+'; known scorers: "
                f"{', '.join(available_scorers())}"
            )
        name = match["name"]
        if name not in SCORERS:
            raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(available_scorers())}")
        weight = None if match["weight"] is None else float(match["weight"])
        positional = getattr(SCORERS[name], "positional_setting", None)
        terms.append((weight, name, _parse_settings(match["settings"], spec, positional)))
    return terms


def _check_settings(name: str, settings: dict) -> None:
    factory = SCORERS[name]
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p != "self"] + list(COMMON_SETTINGS)
    unknown = [k for k in settings if k not in accepted]
    if unknown:
        raise ValueError(
            f"scorer {name!r} has no setting {', '.join(map(repr, unknown))}; its settings: "
            f"{', '.join(accepted)}"
        )


def _check_normalize(name: str, settings: dict) -> None:
    value = settings.get("normalize", "none")
    if value not in NORMALIZATIONS:
        raise ValueError(f"scorer {name!r}: normalize={value!r}; expected one of {', '.join(NORMALIZATIONS)}")


def _build_one(name: str, settings: dict) -> Scorer:
    _check_settings(name, settings)
    _check_normalize(name, settings)
    normalize = settings.pop("normalize", "none")
    common = {k: settings.pop(k) for k in COMMON_SETTINGS if k in settings}
    scorer = SCORERS[name](**settings)
    for key, value in common.items():
        setattr(scorer, key, value)
    return NormalizedScorer(scorer) if normalize == "zscore" else scorer


def make_scorer(spec: str, **settings) -> Scorer:
    """Build a scorer from a name or spec: ``"pickscore"``, ``"hpsv2:version=v2.1,model=/path"``,
    ``"10*pickscore+2*hpsv2+0.05*aesthetic"``. Keyword ``settings`` go to a single scorer (they override the
    spec's); for a combined spec only the common settings (``batch_size``, ``video_frames``) are allowed.
    """
    terms = parse_scorer_spec(spec)
    if len(terms) == 1 and terms[0][0] is None:
        _, name, spec_settings = terms[0]
        scorer = _build_one(name, {**spec_settings, **settings})
        scorer.name = spec.strip() if spec.strip() != name else (scorer.name or name)
        return scorer
    extra = [k for k in settings if k not in COMMON_SETTINGS]
    if extra:
        raise ValueError(
            f"combined scorer {spec!r}: set {', '.join(extra)} per part in the spec (NAME:KEY=VALUE)"
        )
    parts = []
    for weight, name, part_settings in terms:
        scorer = _build_one(name, {**part_settings, **settings})
        scorer.name = name + (
            ":" + ",".join(f"{k}={v}" for k, v in part_settings.items()) if part_settings else ""
        )
        parts.append((1.0 if weight is None else weight, scorer))
    combined = CombinedScorer(parts)
    combined.name = spec.strip()
    return combined


def check_scorer_names(names: Sequence[str], prompts: Sequence[str] | None = None) -> None:
    """Validate scorer names/specs up front (before any model loads): names, setting keys, availability,
    and, when ``prompts`` are given, that each scorer can score them (a scorer class may define
    ``check_prompts(prompts)``, e.g. toy_faithfulness needs toy captions)."""
    for spec in names:
        for _, name, settings in parse_scorer_spec(spec):
            _check_settings(name, settings)
            _check_normalize(name, settings)
            check_available = getattr(SCORERS[name], "check_available", None)
            if check_available is not None:
                check_available()
            check_settings = getattr(SCORERS[name], "check_settings", None)  # cheap checks of the values
            if check_settings is not None:
                check_settings(**{k: v for k, v in settings.items() if k not in COMMON_SETTINGS})
            check_prompts = getattr(SCORERS[name], "check_prompts", None)
            if prompts is not None and check_prompts is not None:
                try:
                    check_prompts(list(prompts))
                except ValueError as err:
                    raise ValueError(f"scorer {name!r}: {err}") from None


__all__ = [
    "Scorer",
    "SCORERS",
    "CombinedScorer",
    "NormalizedScorer",
    "NORMALIZATIONS",
    "register_scorer",
    "available_scorers",
    "make_scorer",
    "check_scorer_names",
    "parse_scorer_spec",
    "video_frame_indices",
    "to_tensor",
]
