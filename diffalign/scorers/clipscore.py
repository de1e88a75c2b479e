"""CLIPScore: prompt-image agreement of a plain CLIP model, ``max(weight * cos(image, text), 0)``.

Defaults follow torchmetrics' ``CLIPScore`` (``openai/clip-vit-large-patch14``, weight 100). Hessel et al.
(2021) define it with ViT-B/32 and weight 2.5: ``clipscore:model=openai/clip-vit-base-patch32,weight=2.5``.
"""

from __future__ import annotations

from diffalign.scorers.base import register_scorer
from diffalign.scorers.pickscore import HFCLIPScorer


@register_scorer("clipscore")
class CLIPScore(HFCLIPScorer):
    name = "clipscore"
    default_model = "openai/clip-vit-large-patch14"
    default_processor = "openai/clip-vit-large-patch14"

    def __init__(
        self,
        model: str | None = None,
        processor: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        preprocess: str = "auto",
        weight: float = 100.0,
    ):
        super().__init__(model=model, processor=processor, dtype=dtype, device=device, preprocess=preprocess)
        self.weight = weight

    def formula(self, cosine):
        return (self.weight * cosine).clamp(min=0)


__all__ = ["CLIPScore"]
