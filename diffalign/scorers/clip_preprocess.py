"""CLIP-style image preprocessing, two ways: the exact PIL path and a differentiable torch path.

CLIP-family scorers prepare images in one of two published ways:

* ``"crop"`` (OpenAI CLIP, PickScore, CLIPScore, the LAION aesthetic predictor): resize the *short* side to
  ``size`` (bicubic), center-crop ``size x size``, normalize with the CLIP mean/std. Where the leftover is
  odd, torchvision's ``CenterCrop`` (OpenAI CLIP) rounds the crop offset half-to-even, while the
  transformers ``CLIPImageProcessor`` that PickScore was published with floors it: ``crop_rounding``.
* ``"pad"`` (HPSv2): resize the *long* side to ``size`` (bicubic), zero-pad (black) to ``size x size`` with
  the image centered, normalize.

The PIL path reproduces the reference pipelines (torchvision ``Resize`` / ``CenterCrop`` on PIL images,
open_clip's ``resize_mode="longest"``) pixel for pixel. The torch path does the same steps on float
tensors (clamp, antialiased bicubic resize, crop or pad, normalize) and keeps the autograd graph, so a
scorer can serve as a reward gradient. The two differ only by PIL's uint8 rounding and its slightly
different resampling kernel support: about 0.004 mean absolute difference in normalized units, 0.017 at
most (``tests/test_scorers_real.py`` bounds it at 0.006 mean and 0.03 max over odd sizes and aspects; the
scores of the tiny test models then move by under 2% of their spread across images).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.images import pil_to_tensor, to_pil, to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("crop", "pad")


def resized_size(height: int, width: int, size: int, mode: str) -> tuple[int, int]:
    """The (height, width) after resizing the short side (``crop``) or the long side (``pad``) to ``size``."""
    if mode == "crop":
        # torchvision Resize(int): the short side becomes ``size``, the long side is truncated, not rounded.
        if height <= width:
            return size, int(size * width / height)
        return int(size * height / width), size
    if mode == "pad":
        # open_clip ResizeKeepRatio(longest=1) / HPSv2's ResizeMaxSize: both sides scaled and rounded.
        scale = size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))
    raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")


def crop_box(height: int, width: int, size: int, rounding: str = "round") -> tuple[int, int]:
    """Top-left corner of the centered ``size x size`` crop: torchvision's ``round`` or transformers'
    ``floor``."""
    if rounding == "round":
        return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    if rounding == "floor":
        return (height - size) // 2, (width - size) // 2
    raise ValueError(f"unknown crop rounding {rounding!r}; expected 'round' or 'floor'")


def pad_amounts(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that centers an image in ``size x size``."""
    pad_w, pad_h = max(size - width, 0), max(size - height, 0)
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def preprocess_pil(
    images: Sequence[Image.Image],
    size: int = 224,
    mode: str = "crop",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    crop_rounding: str = "round",
) -> torch.Tensor:
    """The reference path: any PIL mode/size -> normalized ``[B, 3, size, size]`` float32."""
    out = []
    for image in images:
        image = to_rgb(image)
        h, w = image.height, image.width
        nh, nw = resized_size(h, w, size, mode)
        image = image.resize((nw, nh), Image.BICUBIC)
        if mode == "crop":
            top, left = crop_box(nh, nw, size, crop_rounding)
            image = image.crop((left, top, left + size, top + size))
            array = np.asarray(image, dtype=np.float32) / 255.0
        else:
            left, right, top, bottom = pad_amounts(nh, nw, size)
            array = np.pad(
                np.asarray(image, dtype=np.float32) / 255.0, ((top, bottom), (left, right), (0, 0))
            )
        out.append(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))
    return _normalize(torch.stack(out), mean, std)


def preprocess_tensor(
    images: torch.Tensor,
    size: int = 224,
    mode: str = "crop",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    crop_rounding: str = "round",
) -> torch.Tensor:
    """The differentiable path: ``[B, 3, H, W]`` in [0, 1] -> normalized ``[B, 3, size, size]``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected image tensors [B, 3, H, W], got {tuple(images.shape)}")
    if images.device.type == "cpu" and len(images) > 1:
        # On CPU a whole-batch resize of large images is memory-bound: image by image is about 2x faster
        # (benchmarks/scorers.py). On a GPU the batch stays one kernel per step.
        return torch.cat(
            [preprocess_tensor(image[None], size, mode, mean, std, crop_rounding) for image in images]
        )
    x = images.float().clamp(0, 1)
    h, w = x.shape[-2:]
    nh, nw = resized_size(h, w, size, mode)
    if (nh, nw) != (h, w):
        # antialias=True uses PIL's cubic kernel (a = -0.5) widened when downscaling, like Image.resize.
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    if mode == "crop":
        top, left = crop_box(nh, nw, size, crop_rounding)
        x = x[:, :, top : top + size, left : left + size]
    else:
        left, right, top, bottom = pad_amounts(nh, nw, size)
        x = F.pad(x, (left, right, top, bottom), value=0.0)
    return _normalize(x, mean, std)


PATHS = ("auto", "pil", "torch")


def check_path(path: str) -> str:
    if path not in PATHS:
        raise ValueError(f"unknown preprocessing path {path!r}; expected one of {', '.join(PATHS)}")
    return path


def preprocess(
    images: torch.Tensor | Sequence[Image.Image],
    size: int = 224,
    mode: str = "crop",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    path: str = "auto",
    crop_rounding: str = "round",
) -> torch.Tensor:
    """Pick the path: ``auto`` = torch for tensors (differentiable), PIL for PIL images; or force one.

    ``path="pil"`` on tensors rounds them to uint8 first, exactly as saving and reloading the image would.
    """
    check_path(path)
    is_tensor = isinstance(images, torch.Tensor)
    if path == "pil" or (path == "auto" and not is_tensor):
        return preprocess_pil(
            to_pil(images) if is_tensor else list(images), size, mode, mean, std, crop_rounding
        )
    if not is_tensor:

        sizes = {im.size for im in images}
        if len(sizes) > 1:
            return torch.cat(
                [
                    preprocess_tensor(pil_to_tensor(im)[None], size, mode, mean, std, crop_rounding)
                    for im in images
                ]
            )
        images = torch.stack([pil_to_tensor(im) for im in images])
    return preprocess_tensor(images, size, mode, mean, std, crop_rounding)


__all__ = ["CLIP_MEAN", "CLIP_STD", "preprocess", "preprocess_pil", "preprocess_tensor", "resized_size"]
