"""Rewards for the toy world (``toy-sdxl``): weight-free, differentiable, and cheap enough for CPU alignment.

They read colours through a *soft palette assignment*: each pixel is softly assigned to the toy world's
nine colours (six object colours, three backgrounds) with ``softmax(-|pixel - colour|^2 / temperature)``,
so every quantity below is a smooth function of the pixels and passes gradients.

- ``toy_faithfulness`` (needs toy captions): how well an image shows what its caption names: the share
  of the object-coloured mass that is the named colour, the share of the border that is the named
  background, and how close the object area is to what the caption's count and size imply. Each term is
  in [0, 1]; the score is their mean.
- ``toy_saturation`` (prompt-free): mean chroma (max minus min channel) over pixels. Grey scores 0;
  more and larger coloured objects score higher.
- ``toy_target_color`` (prompt-free): the share of pixels softly assigned to one target colour (red by
  default): a preference that can contradict the prompt.

``toy_geneval`` (needs toy captions) is the toy world's GenEval: *not* differentiable, it reads each image
with the fixed reader of ``diffalign toy eval`` (:mod:`diffalign.toy.evaluate`) and checks every attribute
its caption names (colour, shape, count, size, background, and position for a single object). Its score is
GenEval's: 1 when every named attribute is right, else 0 (``measure=all``, the default), or the fraction of
named attributes that are right (``measure=fraction``), or one attribute alone (``measure=color``, ...).
Videos (toy-animatediff captions, ``"... moving left ..."``) are read frame by frame plus the motion
direction over the whole clip (:mod:`diffalign.toy.video_evaluate`); a frame attribute counts as the
fraction of frames showing it, and ``all`` needs every frame and the motion right.
"""

from __future__ import annotations

import torch

from diffalign.images import to_tensor
from diffalign.scorers.base import Scorer, register_scorer
from diffalign.toy import data
from diffalign.toy.evaluate import ATTRIBUTES, attribute_hits
from diffalign.toy.video_evaluate import VIDEO_ATTRIBUTES, clip_hits

#: Mean object area in pixels (at 32x32) per size word, for one object and for several (these are smaller).
_AREA = {("small", 1): 53.0, ("large", 1): 180.0, ("small", 2): 53.0, ("large", 2): 97.0}


def soft_palette(images: torch.Tensor, temperature: float = 0.02) -> tuple[list[str], torch.Tensor]:
    """Palette names and per-pixel soft assignments [B, K, H, W] (sum 1 over K) of images [B, 3, H, W]."""
    names, colors = data.palette("all")
    colors = colors.to(images.device, images.dtype)
    distance = ((images.unsqueeze(1) - colors.view(1, -1, 3, 1, 1)) ** 2).sum(2)
    return names, torch.softmax(-distance / temperature, dim=1)


def _border(x: torch.Tensor) -> torch.Tensor:
    """The outermost ring of pixels of [B, K, H, W] as [B, K, N]."""
    return torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)


@register_scorer("toy_faithfulness")
class ToyFaithfulness(Scorer):
    """Mean of colour, background and object-area agreement with a toy caption, each in [0, 1]."""

    name = "toy_faithfulness"
    differentiable = True
    needs_prompts = True
    batch_size = 256
    TERMS = ("color", "background", "area")

    def __init__(self, temperature: float = 0.02, terms: tuple[str, ...] | list[str] = TERMS):
        unknown = set(terms) - set(self.TERMS)
        if unknown or not terms:
            raise ValueError(
                f"toy_faithfulness terms must be a non-empty subset of {self.TERMS}, got {tuple(terms)}"
            )
        self.temperature = temperature
        self.terms = tuple(terms)

    @staticmethod
    def check_prompts(prompts: list[str]) -> None:
        """Raise ValueError naming the first prompt that is not a toy caption (before anything loads)."""
        for prompt in prompts:
            data.parse_caption(prompt)

    def terms_of(self, images, prompts) -> dict[str, torch.Tensor]:
        """Each term [B] for images and their toy captions (a prompt that is not one raises ValueError)."""
        scenes = [data.parse_caption(p) for p in prompts]
        x = to_tensor(images).float().clamp(0, 1)
        names, p = soft_palette(x, self.temperature)
        n_objects = len(data.COLORS)
        objects = p[:, :n_objects].flatten(2).sum(-1)  # [B, 6] soft pixel counts per object colour
        index = torch.arange(len(scenes), device=x.device)
        named = torch.tensor([names.index(s.color) for s in scenes], device=x.device)
        # One pixel of slack: an image with no object colour at all scores ~0, not 0/0.
        color = objects[index, named] / (objects.sum(1) + 1.0)
        bg_named = torch.tensor([names.index(s.background) for s in scenes], device=x.device)
        background = _border(p)[index, bg_named].mean(-1)
        # Object area measured at 32x32; larger images are scaled to it.
        scale = data.IMAGE_SIZE**2 / (x.shape[-1] * x.shape[-2])
        area = objects.sum(1) * scale
        expected = torch.tensor([s.count * _AREA[(s.size, min(s.count, 2))] for s in scenes], device=x.device)
        area_term = torch.minimum(area + 1, expected) / torch.maximum(area + 1, expected)
        return {"color": color, "background": background, "area": area_term}

    def _score(self, images, prompts):
        terms = self.terms_of(images, prompts)
        return torch.stack([terms[t] for t in self.terms]).mean(0)


@register_scorer("toy_saturation")
class ToySaturation(Scorer):
    """Mean chroma (max minus min RGB channel) in [0, 1]; prompt-free and differentiable."""

    name = "toy_saturation"
    differentiable = True
    batch_size = 256

    def _score(self, images, prompts):
        x = to_tensor(images).float().clamp(0, 1)
        return (x.amax(dim=1) - x.amin(dim=1)).flatten(1).mean(1)


@register_scorer("toy_target_color")
class ToyTargetColor(Scorer):
    """Share of pixels softly assigned to ``color`` (a toy object colour, default red); prompt-free."""

    name = "toy_target_color"
    differentiable = True
    batch_size = 256

    def __init__(self, color: str = "red", temperature: float = 0.02):
        if color not in data.COLORS:
            raise ValueError(
                f"toy_target_color: unknown colour {color!r}; expected one of {', '.join(data.COLORS)}"
            )
        self.color = color
        self.temperature = temperature

    def _score(self, images, prompts):
        x = to_tensor(images).float().clamp(0, 1)
        names, p = soft_palette(x, self.temperature)
        return p[:, names.index(self.color)].flatten(1).mean(1)


@register_scorer("toy_geneval")
class ToyGenEval(Scorer):
    """GenEval on the toy world: are the caption's attributes in the image, read by ``diffalign toy eval``'s
    reader? 1/0 per image (``measure=all``), the fraction right (``fraction``), or one attribute's hit."""

    name = "toy_geneval"
    differentiable = False
    needs_prompts = True
    batch_size = 256
    MEASURES = ("all", "fraction", *ATTRIBUTES, "direction")

    def __init__(self, measure: str = "all"):
        if measure not in self.MEASURES:
            raise ValueError(
                f"toy_geneval: unknown measure {measure!r}; expected one of {', '.join(self.MEASURES)}"
            )
        self.measure = measure

    def hits(self, images, prompts) -> list[dict[str, float]]:
        """Per image [B, 3, H, W] or clip [B, F, 3, H, W]: each named attribute's hit (1/0; for clips, the
        fraction of frames, and the motion direction 1/0). A prompt that is not a toy caption raises
        ValueError."""
        if isinstance(images, torch.Tensor) and images.ndim == 5:
            return clip_hits(images.float(), list(prompts))
        rows = attribute_hits(to_tensor(images).float(), list(prompts))
        return [{name: float(hit) for name, hit in row.items()} for row in rows]

    def _measure(self, rows: list[dict[str, float]], video: bool) -> torch.Tensor:
        if self.measure == "all":
            values = [float(all(v == 1.0 for v in row.values())) for row in rows]
        elif self.measure == "fraction":
            values = [sum(row.values()) / len(row) for row in rows]
        else:
            known = VIDEO_ATTRIBUTES if video else ATTRIBUTES
            if self.measure not in known:
                raise ValueError(f"toy_geneval: measure {self.measure!r} is not an attribute of toy "
                                 f"{'videos' if video else 'images'} ({', '.join(known)})")
            # Position is named for single objects only: a scene of several scores it as right.
            values = [row.get(self.measure, 1.0) for row in rows]
        return torch.tensor(values, dtype=torch.float32)

    def _score(self, images, prompts):
        return self._measure(self.hits(images, prompts), video=False)

    def _score_video(self, videos, prompts):
        # Motion needs every frame: the clip is read whole (``video_frames`` does not subsample it).
        if isinstance(prompts, str):
            prompts = [prompts] * len(videos)
        if prompts is None:
            raise ValueError(f"scorer {self.name!r} needs one prompt per video")
        prompts = list(prompts)
        if len(prompts) != len(videos):
            raise ValueError(f"scorer {self.name!r}: got {len(videos)} videos but {len(prompts)} prompts")
        return self._measure(self.hits(videos, prompts), video=True)
