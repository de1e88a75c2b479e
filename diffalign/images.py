"""Conversions between PIL images and float tensors in [0, 1], shared by the sampler, scorers and gallery."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, F, ...) as 8-bit RGB; transparency composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [0, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def to_tensor(images: torch.Tensor | Sequence[Image.Image] | Image.Image) -> torch.Tensor:
    """A batch [B, 3, H, W] in [0, 1] from a tensor batch, one tensor, or same-size PIL images."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        return images.unsqueeze(0) if images.ndim == 3 else images
    tensors = [pil_to_tensor(im) if isinstance(im, Image.Image) else im for im in images]
    return torch.stack(tensors)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, H, W, 3] uint8 from [B, 3, H, W] floats in [0, 1] (rounded, as PIL saving does)."""
    return (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )


def to_pil(images: torch.Tensor | Sequence[Image.Image]) -> list[Image.Image]:
    if not isinstance(images, torch.Tensor):
        return [to_rgb(im) for im in images]
    return [Image.fromarray(a) for a in to_uint8(to_tensor(images))]
