"""LAION aesthetic predictor v2 (improved-aesthetic-predictor, ``sac+logos+ava1-l14-linearMSE``).

OpenAI CLIP ViT-L/14 image embedding, L2-normalized, into a stack of linear layers (dropout between, no
activations) trained with MSE on SAC + LAION-logos + AVA ratings. SD images score about 5.5-6.5; skipping
the normalization gives nonsense (20-30). The v1 predictor is a different (single linear) model.

The head was published at github.com/christophschuhmann/improved-aesthetic-predictor
(``sac+logos+ava1-l14-linearMSE.pth``); the default here is the same file on the Hugging Face hub as
``trl-lib/ddpo-aesthetic-predictor`` / ``aesthetic-model.pth`` (used by TRL's DDPO). ``head`` also takes a
local file, a folder holding ``head_file``, or a URL (e.g. the GitHub raw link).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffalign.models import parse_dtype
from diffalign.scorers.base import Scorer, register_scorer
from diffalign.scorers.clip_preprocess import CLIP_MEAN, CLIP_STD, check_path, preprocess
from diffalign.scorers.pickscore import pooled
from diffalign.scorers.weights import from_pretrained, load_state_dict, resolve_device, resolve_file

AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticHead(nn.Module):
    """The predictor's layers, named as in its checkpoint (``layers.{0,2,4,6,7}``)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


@register_scorer("aesthetic")
class Aesthetic(Scorer):
    name = "aesthetic"
    differentiable = True

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        head: str | None = None,
        head_file: str = "aesthetic-model.pth",
        dtype: str = "float32",
        device: str | None = None,
        preprocess: str = "auto",
    ):

        from transformers import CLIPModel

        self.device, self.dtype = resolve_device(device), parse_dtype(dtype)
        self.preprocess_path = check_path(preprocess)
        if head is None:
            # A local model folder may carry its head (the tiny test models do); otherwise the hub copy.
            local = Path(model).expanduser()
            head = (
                str(local / AESTHETIC_HEAD_FILE)
                if (local / AESTHETIC_HEAD_FILE).is_file()
                else "trl-lib/ddpo-aesthetic-predictor"
            )
        elif Path(head).expanduser().is_dir() and not (Path(head).expanduser() / head_file).exists():
            head_file = AESTHETIC_HEAD_FILE  # a folder holding the file under its published name
        head_path = resolve_file(head, head_file, what="aesthetic head", setting="head", scorer="aesthetic")
        # The full CLIPModel (as TRL's DDPO loads it): its checkpoints always carry the visual projection.
        self.clip = from_pretrained(
            CLIPModel, model, what="CLIP ViT-L/14 model", setting="model", scorer="aesthetic"
        )
        state = load_state_dict(head_path)
        self.head = AestheticHead(embed_dim=state["layers.0.weight"].shape[1])
        self.head.load_state_dict(state)
        for module in (self.clip, self.head):
            module.to(self.device, self.dtype).eval().requires_grad_(False)
        self.image_size = self.clip.config.vision_config.image_size

    def embed(self, images) -> torch.Tensor:
        """The L2-normalized CLIP image embedding the head was trained on."""
        pixels = preprocess(images, self.image_size, "crop", CLIP_MEAN, CLIP_STD, path=self.preprocess_path)
        embedding = pooled(self.clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        return embedding / embedding.norm(dim=-1, keepdim=True)

    def _score(self, images, prompts):
        return self.head(self.embed(images)).squeeze(-1).float()


__all__ = ["Aesthetic", "AestheticHead", "AESTHETIC_HEAD_FILE"]
