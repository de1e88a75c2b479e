"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on Human Preference Dataset v2.

Runs on mainline open_clip (not the ``hpsv2`` package, which pins old pytest/protobuf, reloads the
checkpoint on every call and scores one image at a time). The checkpoints ``HPS_v2_compressed.pt`` /
``HPS_v2.1_compressed.pt`` of ``xswu/HPSv2`` hold fp16 open_clip weights under ``"state_dict"``.
Images: long side to 224 (bicubic), zero-pad to a centered square (no crop), CLIP mean/std.
Score = plain cosine of the normalized features (papers print x100). v2.0 and v2.1 scores are not
comparable with each other; the default is v2.0, the ``hpsv2`` package's default.
"""

from __future__ import annotations

import logging
from pathlib import Path

from diffalign.models import parse_dtype
from diffalign.scorers.base import Scorer, register_scorer
from diffalign.scorers.clip_preprocess import CLIP_MEAN, CLIP_STD, check_path, preprocess
from diffalign.scorers.weights import TruncationWarning, load_state_dict, resolve_device, resolve_file

HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
#: A folder with this file (open_clip's ``local-dir`` format) defines its own architecture (tiny test models).
OPEN_CLIP_CONFIG = "open_clip_config.json"


class _QuietRandomInit(logging.Filter):
    # open_clip warns that the model is randomly initialized; here the HPS weights are loaded right after.
    def filter(self, record):
        message = record.getMessage()
        return "No pretrained weights loaded" not in message and "no CLIP weights found" not in message


def create_open_clip(arch: str):
    """An open_clip model (random init, weights loaded later) and its tokenizer from a name or config
    folder."""
    import open_clip

    quiet = _QuietRandomInit()
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(arch, pretrained=None, load_weights=False)
    finally:
        logging.getLogger().removeFilter(quiet)
    return model, open_clip.get_tokenizer(arch)


@register_scorer("hpsv2")
class HPSv2(Scorer):
    name = "hpsv2"
    needs_prompts = True
    differentiable = True

    def __init__(
        self,
        version: str | None = None,
        model: str = "xswu/HPSv2",
        arch: str = "ViT-H-14",
        dtype: str = "float32",
        device: str | None = None,
        preprocess: str = "auto",
    ):
        version = self.check_settings(version=version, model=model)
        self.version = version
        self.device, self.dtype = resolve_device(device), parse_dtype(dtype)
        self.preprocess_path = check_path(preprocess)
        checkpoint = resolve_file(
            model, HPS_FILES[version], what=f"HPS {version} checkpoint", setting="model", scorer="hpsv2"
        )
        if (checkpoint.parent / OPEN_CLIP_CONFIG).is_file() and Path(model).expanduser().exists():
            arch = f"local-dir:{checkpoint.parent}"
        self.model, self.tokenizer = create_open_clip(arch)
        self.model.load_state_dict(load_state_dict(checkpoint))
        self.model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.image_size = (
            self.model.visual.image_size[0]
            if isinstance(self.model.visual.image_size, tuple)
            else self.model.visual.image_size
        )
        self.truncation = TruncationWarning("hpsv2", self.tokenizer.context_length)

    @staticmethod
    def check_settings(version: str | None = None, model: str = "xswu/HPSv2", **_) -> str:
        """The checkpoint version (default v2.0); ``version`` picks a file of a folder or hub repo, so it is
        refused with ``model=FILE`` (one checkpoint already)."""
        if version is not None and Path(str(model)).expanduser().is_file():
            raise ValueError(
                f"scorer 'hpsv2': version={version} picks {' or '.join(HPS_FILES.values())} in a "
                f"folder or hub repo, but model={model} is one checkpoint file; drop version="
            )
        version = "v2.0" if version is None else str(version)
        version = {"v2": "v2.0", "2": "v2.0", "2.0": "v2.0", "2.1": "v2.1"}.get(version, version)
        if version not in HPS_FILES:
            raise ValueError(
                f"scorer 'hpsv2': unknown version {version!r}; expected one of {', '.join(HPS_FILES)}"
            )
        return version

    def _score(self, images, prompts):
        pixels = preprocess(images, self.image_size, "pad", CLIP_MEAN, CLIP_STD, path=self.preprocess_path)
        image = self.model.encode_image(pixels.to(self.device, self.dtype), normalize=True)
        # open_clip's tokenizer truncates silently; count BPE tokens plus start/end to say so.
        self.truncation.check([len(self.tokenizer.encode(p)) + 2 for p in prompts], prompts)
        text = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return (image * text).sum(dim=-1).float()


__all__ = ["HPSv2", "HPS_FILES"]
