"""Weight-free scorers: DDPO's JPEG (in)compressibility and a differentiable brightness reward."""

from __future__ import annotations

import io

import torch
from PIL import Image

from diffalign.images import to_tensor, to_uint8
from diffalign.scorers.base import Scorer, register_scorer


def jpeg_size_kb(images, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image saved as JPEG at ``quality`` (DDPO: uint8 image, quality 95, bytes / 1000)."""
    sizes = []
    for array in to_uint8(to_tensor(images)):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes)


@register_scorer("jpeg_compressibility")
class JpegCompressibility(Scorer):
    """DDPO's compressibility reward: minus the JPEG size in kB (smaller files score higher)."""

    name = "jpeg_compressibility"

    def __init__(self, quality: int = 95):
        self.quality = quality

    def _score(self, images, prompts):
        return -jpeg_size_kb(images, self.quality)


@register_scorer("jpeg_incompressibility")
class JpegIncompressibility(JpegCompressibility):
    """DDPO's incompressibility reward: the JPEG size in kB (larger files score higher)."""

    name = "jpeg_incompressibility"

    def _score(self, images, prompts):
        return jpeg_size_kb(images, self.quality)


@register_scorer("brightness")
class Brightness(Scorer):
    """Mean Rec. 601 luma in [0, 1]; differentiable, prompt-free. A simple reward for tests and demos."""

    name = "brightness"
    differentiable = True
    batch_size = 256

    def _score(self, images, prompts):
        x = to_tensor(images).float().clamp(0, 1)
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1).flatten(1).mean(dim=1)
