"""ImageReward (Xu et al. 2023): a BLIP image-text model with a reward head, ``(raw - 0.16717) / 1.03334``.

Its model code (BLIP with a BERT cross-attention text encoder) lives only in the ``image-reward``
package, which pins ``timm==0.6.13`` and ``fairscale==0.4.13``; those conflict with this project's
``timm`` pin, so it is not a dependency. When the package is importable (e.g. in a separate environment)
this scorer uses it; otherwise building it raises an error that names what is missing.
Not differentiable through this wrapper (the package scores PIL images).
"""

from __future__ import annotations

import importlib.util

import torch

from diffalign.images import to_pil
from diffalign.scorers.base import Scorer, register_scorer
from diffalign.scorers.weights import resolve_device

MISSING = (
    "scorer 'imagereward' is not available: it needs the `image-reward` package (module `ImageReward`, BLIP "
    "model code), which is not installed. It pins timm==0.6.13 and fairscale==0.4.13, which conflict with "
    "this project's pins, so install it in a separate environment (`pip install image-reward`) to use this "
    "scorer; pickscore, hpsv2, aesthetic and clipscore need no extra package."
)


@register_scorer("imagereward")
class ImageReward(Scorer):
    name = "imagereward"
    needs_prompts = True

    @staticmethod
    def check_available() -> None:
        if importlib.util.find_spec("ImageReward") is None:
            raise NotImplementedError(MISSING)

    def __init__(self, model: str = "ImageReward-v1.0", device: str | None = None):
        self.check_available()
        import ImageReward as reward_package

        self.device = resolve_device(device)
        # The package downloads (or reads from its cache / a local .pt path) and normalizes scores itself.
        self.model = reward_package.load(model, device=str(self.device))

    def _score(self, images, prompts):
        scores = []
        for image, prompt in zip(to_pil(images), prompts, strict=True):
            scores.append(float(self.model.score(prompt, [image])))
        return torch.tensor(scores)


__all__ = ["ImageReward"]
