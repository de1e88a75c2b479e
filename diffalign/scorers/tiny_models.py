"""Tiny random-weight scorer models of the real architecture families, built offline.

Each folder loads with the same code as the published weights (``make_scorer("KIND:model=FOLDER")``):

* ``pickscore`` / ``clipscore``: a transformers ``CLIPModel`` folder with ``CLIPImageProcessor`` and
  ``CLIPTokenizer`` files (PickScore's ViT-H uses GELU, OpenAI CLIP quick-GELU);
* ``hpsv2``: an open_clip ViT config (``open_clip_config.json``, open_clip's ``local-dir`` format) and the
  weights saved the way HPSv2 ships them: fp16 under ``"state_dict"`` in ``HPS_v2_compressed.pt`` and
  ``HPS_v2.1_compressed.pt`` (read back with ``weights_only=True``);
* ``aesthetic``: a CLIP ViT-L/14-style model (quick-GELU, patch 14) plus a random
  ``sac+logos+ava1-l14-linearMSE.pth`` head of the published layer layout;
* ``hpsv3``: a Qwen2-VL (patch 14, merge 2, M-RoPE sections) with a byte-level Qwen2 tokenizer, the
  Qwen2-VL chat template and image processor (the base-model files ``base=`` points at), and
  ``HPSv3.safetensors`` laid out like the published one (pre-4.52 key names ``visual.*`` / ``model.*``,
  the embedding resized to the tokenizer plus ``<|Reward|>``, the fp32 ``rm_head``).

The CLIP ones take 224 x 224 inputs like the real models (HPSv3: 448 x 448, 256 x 28 x 28 pixels) (the
preprocessing is the thing under test), with small widths so a forward pass costs milliseconds. Same seed,
same weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from diffalign.files import save_safetensors
from diffalign.scorers.aesthetic import AESTHETIC_HEAD_FILE, AestheticHead
from diffalign.scorers.clip_preprocess import CLIP_MEAN, CLIP_STD
from diffalign.scorers.hpsv2 import HPS_FILES, OPEN_CLIP_CONFIG, create_open_clip
from diffalign.scorers.hpsv3 import HPSV3_FILE, reward_head
from diffalign.tiny import _bytes_to_unicode, build_clip_tokenizer, cache_dir, write_folder_atomically

TINY_SCORER_KINDS = ("pickscore", "clipscore", "hpsv2", "aesthetic", "hpsv3")
#: Bump when the tiny architectures change, so cached builds are rebuilt.
TINY_SCORER_VERSION = 1

TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def build_tiny_clip(seed: int = 0, hidden_act: str = "gelu"):
    """A tiny transformers ``CLIPModel`` (224 px, patch 14, 49408-token vocabulary, 77 positions)."""
    from transformers import CLIPConfig, CLIPModel

    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act=hidden_act,
    )
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, **common),
        vision_config=dict(image_size=224, patch_size=14, **common),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def write_clip_processor(out_dir: str | os.PathLike) -> None:
    """The CLIP image processor (short side 224 bicubic, crop 224, CLIP mean/std) and tokenizer files."""
    from transformers import CLIPImageProcessor


    CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
        do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    ).save_pretrained(out_dir)
    build_clip_tokenizer().save_pretrained(out_dir)


def build_tiny_open_clip(seed: int = 0, config_dir: str | os.PathLike | None = None):
    """A tiny open_clip ``CLIP`` of :data:`TINY_OPEN_CLIP_CONFIG` (written to ``config_dir`` if given)."""

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(config_dir or tmp)
        (folder / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CONFIG}, indent=2))
        torch.manual_seed(seed)
        return create_open_clip(f"local-dir:{folder}")[0].eval()


QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Qwen2-VL-7B-Instruct's chat template (system turn, image placeholders, generation prompt).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}"
    "\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>{% elif "
    "content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_qwen2_vl_base(out: Path, seed: int):
    """A tiny Qwen2-VL base-model folder (config, byte-level tokenizer, processor); returns its config."""
    from transformers import (
        Qwen2Tokenizer,
        Qwen2VLConfig,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    byte_symbols = list(_bytes_to_unicode().values())
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(
            json.dumps({t: i for i, t in enumerate(byte_symbols)}, ensure_ascii=False)
        )
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = Qwen2Tokenizer(
            str(Path(tmp) / "vocab.json"),
            str(Path(tmp) / "merges.txt"),
            unk_token=None,
            bos_token=None,
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_VL_SPECIAL_TOKENS[1:])})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14,
                                            temporal_patch_size=2, merge_size=2)
    Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    ).save_pretrained(out)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
            tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.save_pretrained(out)
    return config, len(tokenizer)


def write_tiny_hpsv3(out: Path, seed: int) -> None:
    """The tiny base folder plus ``HPSv3.safetensors`` in the published (pre-4.52) key layout."""
    from transformers import Qwen2VLForConditionalGeneration

    config, num_tokens = write_qwen2_vl_base(out, seed)
    config.text_config.vocab_size = num_tokens + 1  # HPSv3 adds <|Reward|> and resizes the embedding
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    head = reward_head(config.text_config.hidden_size)
    legacy = {}
    for key, value in model.state_dict().items():  # transformers >= 4.52 names -> the released file's names
        key = key.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)
        legacy[key] = value.to(torch.bfloat16).contiguous()
    legacy |= {f"rm_head.{k}": v.float().contiguous() for k, v in head.state_dict().items()}
    save_safetensors(legacy, out / HPSV3_FILE)


def _write(kind: str, out: Path, seed: int) -> None:
    if kind in ("pickscore", "clipscore"):
        build_tiny_clip(seed, hidden_act="gelu" if kind == "pickscore" else "quick_gelu").save_pretrained(out)
        write_clip_processor(out)
    elif kind == "hpsv2":

        for i, filename in enumerate(HPS_FILES.values()):  # v2.0 and v2.1 differ, as the real ones do
            model = build_tiny_open_clip(seed + i, config_dir=out)
            state = {k: v.half() for k, v in model.state_dict().items()}
            torch.save({"state_dict": state}, out / filename)
    elif kind == "aesthetic":

        clip = build_tiny_clip(seed, hidden_act="quick_gelu")
        clip.save_pretrained(out)
        torch.manual_seed(seed + 1)
        torch.save(
            AestheticHead(embed_dim=clip.config.projection_dim).state_dict(), out / AESTHETIC_HEAD_FILE
        )
    elif kind == "hpsv3":
        write_tiny_hpsv3(out, seed)
    else:
        raise ValueError(f"unknown tiny scorer kind {kind!r}; expected one of {', '.join(TINY_SCORER_KINDS)}")


def save_tiny_scorer(kind: str, out_dir: str | os.PathLike, seed: int = 0, replace: bool = True) -> Path:
    """Write the tiny ``kind`` scorer model folder, atomically."""
    if kind not in TINY_SCORER_KINDS:
        raise ValueError(f"unknown tiny scorer kind {kind!r}; expected one of {', '.join(TINY_SCORER_KINDS)}")

    return write_folder_atomically(out_dir, lambda tmp: _write(kind, tmp, seed), replace)


def cached_tiny_scorer(kind: str, seed: int = 0) -> Path:
    """Path of the tiny ``kind`` scorer folder under :func:`diffalign.tiny.cache_dir`, built on first use."""

    path = cache_dir() / "tiny-scorers" / f"{kind}-seed{seed}-v{TINY_SCORER_VERSION}"
    if not path.is_dir() or not any(path.iterdir()):
        save_tiny_scorer(kind, path, seed, replace=False)
    return path


__all__ = [
    "TINY_SCORER_KINDS",
    "build_tiny_clip",
    "build_tiny_open_clip",
    "cached_tiny_scorer",
    "save_tiny_scorer",
]
