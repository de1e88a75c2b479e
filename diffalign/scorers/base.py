"""The scorer interface: ``score(images, prompts) -> tensor [B]``, and the registry of scorers by name."""

from __future__ import annotations

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
    """

    name: str = ""
    higher_is_better: bool = True
    differentiable: bool = False
    needs_prompts: bool = False
    batch_size: int = 16

    def _score(self, images: ImageBatch, prompts: list[str] | None) -> torch.Tensor:
        raise NotImplementedError

    def score(self, images: ImageBatch | Image.Image, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        if isinstance(images, Image.Image) or (isinstance(images, torch.Tensor) and images.ndim == 3):
            images = to_tensor(images)
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
            raise ValueError(f"scorer {self.name!r}: image tensors must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        keep_graph = self.differentiable and isinstance(images, torch.Tensor) and images.requires_grad
        with torch.set_grad_enabled(keep_graph and torch.is_grad_enabled()):
            scores = [
                self._score(images[i : i + self.batch_size], None if prompts is None else prompts[i : i + self.batch_size])
                for i in range(0, n, self.batch_size)
            ]
        return torch.cat([s.reshape(-1).float() for s in scores])

    __call__ = score

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


SCORERS: dict[str, Callable[..., Scorer]] = {}


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


def make_scorer(name: str, **settings) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(available_scorers())}")
    scorer = SCORERS[name](**settings)
    scorer.name = scorer.name or name
    return scorer


def check_scorer_names(names: Sequence[str]) -> None:
    """Validate scorer names up front (before any model loads)."""
    for name in names:
        if name not in SCORERS:
            raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(available_scorers())}")


__all__ = ["Scorer", "SCORERS", "register_scorer", "available_scorers", "make_scorer", "check_scorer_names", "to_tensor"]
