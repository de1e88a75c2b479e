"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

Score = ``logit_scale.exp() * cos(image, text)`` (about 100 x cosine; SD images score about 21-23).
Images: short side to 224 (bicubic), center crop 224, CLIP mean/std, from the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the model repo ships none).

:class:`HFCLIPScorer` holds what PickScore and CLIPScore share: a transformers ``CLIPModel``, its
tokenizer and image settings, and the two preprocessing paths of :mod:`clip_preprocess`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.models import parse_dtype
from diffalign.scorers.base import Scorer, register_scorer
from diffalign.scorers.clip_preprocess import CLIP_MEAN, CLIP_STD, check_path, preprocess
from diffalign.scorers.weights import TruncationWarning, from_pretrained, resolve_device


def pooled(output) -> torch.Tensor:
    """transformers 5 returns an output object from ``get_*_features`` (projected ``pooler_output``); 4.x a
    tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFCLIPScorer(Scorer):
    """A prompt-conditioned scorer on a transformers ``CLIPModel``: subclasses define :meth:`formula`."""

    needs_prompts = True
    differentiable = True
    default_model = ""
    default_processor = ""

    def __init__(
        self,
        model: str | None = None,
        processor: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        preprocess: str = "auto",
    ):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        model = model or self.default_model
        # A local model folder usually carries its own tokenizer/processor files; the hub PickScore repo does
        # not.
        processor = processor or (model if _has_tokenizer(model) else self.default_processor)
        self.device, self.dtype = resolve_device(device), parse_dtype(dtype)
        self.preprocess_path = check_path(preprocess)
        common = dict(scorer=self.name)
        self.model = from_pretrained(CLIPModel, model, what="CLIP model", setting="model", **common)
        self.model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = from_pretrained(
            CLIPTokenizer, processor, what="tokenizer", setting="processor", **common
        )
        try:
            image_processor = CLIPImageProcessor.from_pretrained(processor)
            crop = image_processor.crop_size  # a dict in transformers 4, a SizeDict in 5
            self.image_size = int(crop["height"])
            self.mean, self.std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        except OSError:  # a tokenizer-only folder: the CLIP defaults of the model's own input size
            self.image_size, self.mean, self.std = (
                self.model.config.vision_config.image_size,
                CLIP_MEAN,
                CLIP_STD,
            )
        self.max_length = min(
            self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings
        )
        self.truncation = TruncationWarning(self.name, self.max_length)

    def image_features(self, images) -> torch.Tensor:
        # transformers' (4.x, PIL) CLIPImageProcessor, PickScore's published one, floors the crop offset.
        pixels = preprocess(images, self.image_size, "crop", self.mean, self.std, path=self.preprocess_path,
                            crop_rounding="floor")
        features = pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        return features / features.norm(dim=-1, keepdim=True)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        self.truncation.check(lengths, prompts)
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        features = pooled(self.model.get_text_features(**tokens.to(self.device)))
        return features / features.norm(dim=-1, keepdim=True)

    def formula(self, cosine: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _score(self, images, prompts):
        cosine = (self.image_features(images) * self.text_features(prompts)).sum(dim=-1)
        return self.formula(cosine.float())


def _has_tokenizer(source: str) -> bool:

    path = Path(source).expanduser()
    return path.is_dir() and ((path / "vocab.json").exists() or (path / "tokenizer.json").exists())


@register_scorer("pickscore")
class PickScore(HFCLIPScorer):
    """PickScore v1: ``logit_scale.exp() * cosine`` on ``yuvalkirstain/PickScore_v1``."""

    name = "pickscore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def formula(self, cosine):
        return self.model.logit_scale.exp().float() * cosine


__all__ = ["HFCLIPScorer", "PickScore", "pooled"]
