"""HPSv3 (Ma et al. 2025): a Qwen2-VL-7B-Instruct fine-tuned into a human-preference reward (MIT license).

Published layout (``MizzenAI/HPSv3``): one file ``HPSv3.safetensors`` with the whole model's state dict:
the Qwen2-VL weights (the embedding resized to the tokenizer plus one added special token ``<|Reward|>``)
and ``rm_head.*``, a head ``Linear(hidden, 1024) - ReLU - Dropout - Linear(1024, 16) - ReLU - Linear(16, 2)``
kept in fp32. Older checkpoints name the parts ``visual.*`` / ``model.*``; transformers >= 4.52 names them
``model.visual.*`` / ``model.language_model.*``; both load. The processor, tokenizer and architecture come
from the base model ``Qwen/Qwen2-VL-7B-Instruct`` (``base=``; a folder holding ``config.json`` next to the
checkpoint is used instead, as the tiny test model does).

Scoring follows the released inference code: each image is resized to 256 x 28 x 28 pixels (Qwen-VL's
``smart_resize``, bicubic), put in a user turn with the instruction below and the closing
``" Please provide the overall ratings of this image: <|Reward|> END "``, run through the vision tower
and the language model with plain sequential positions (what the released forward feeds the language
model), and the head's output at the ``<|Reward|>`` token is ``(mu, sigma)``; the score is ``mu``.
Not differentiable through this wrapper (PIL preprocessing). Needs no package beyond transformers.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from safetensors.torch import load_file

from diffalign.images import to_pil
from diffalign.models import parse_dtype
from diffalign.scorers.base import Scorer, register_scorer
from diffalign.scorers.weights import from_pretrained, resolve_device, resolve_file

HPSV3_FILE = "HPSv3.safetensors"
BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # min_pixels = max_pixels in the released inference code
PATCH_FACTOR = 28  # patch 14 x spatial merge 2

INSTRUCTION = (
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference.\n"
    "Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best.\n"
    "\n"
    "**Visual Quality:**\n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such "
    "as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy "
    "to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a "
    "sense of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, "
    "violent, or adult material. If such content is present, the image quality and satisfaction score should "
    "be the lowest possible.\n"
    "\n"
    "**Text Alignment:**\n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance:** Evaluate how accurately the subject(s) in the image (e.g., person, animal, "
    "object) align with the textual description. The subject should match the description in terms of "
    "number, appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how "
    "well the image adheres to this style.\n"
    "- **Contextual Consistency:** Assess whether the background, setting, and surrounding elements in the "
    "image logically fit the scenario described in the prompt. The environment should support and enhance "
    "the subject without contradictions.\n"
    "- **Attribute Fidelity:** Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence:** Evaluate whether the overall meaning and intent of the prompt are captured in "
    "the image. The generated content should not introduce elements that conflict with or distort the "
    "original description.\n"
    "\n"
    "Textual prompt - {text_prompt}\n"
)
RATING_REQUEST = " Please provide the overall ratings of this image: <|Reward|> END "


def reward_head(hidden_size: int, output_dim: int = 2) -> torch.nn.Sequential:
    """HPSv3's ``rm_head`` (``rm_head_type: ranknet`` without extra settings), in fp32."""
    return torch.nn.Sequential(
        torch.nn.Linear(hidden_size, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
        torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, output_dim),
    ).float()


def modern_key(key: str) -> str:
    """A Qwen2-VL state-dict key in transformers >= 4.52 naming (``visual.x`` -> ``model.visual.x``, ...)."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + key.removeprefix("model.")
    return key


def smart_resize(
    height: int, width: int, factor: int = PATCH_FACTOR, pixels: int = PIXELS
) -> tuple[int, int]:
    """Qwen-VL's ``smart_resize`` with ``min_pixels = max_pixels = pixels``: sides multiple of ``factor``,
    area about ``pixels``, aspect ratio kept (448 x 448 for a square image)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"scorer 'hpsv3': aspect ratio above 200 ({width} x {height})")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > pixels:
        beta = math.sqrt(height * width / pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < pixels:
        beta = math.sqrt(pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@register_scorer("hpsv3")
class HPSv3(Scorer):
    name = "hpsv3"
    needs_prompts = True
    batch_size = 8

    def __init__(self, model: str = "MizzenAI/HPSv3", base: str | None = None, dtype: str = "bfloat16",
                 device: str | None = None):
        from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

        self.device, self.dtype = resolve_device(device), parse_dtype(dtype)
        checkpoint = resolve_file(model, HPSV3_FILE, what="HPSv3 checkpoint", setting="model", scorer="hpsv3")
        if base is None:
            base = str(checkpoint.parent) if (checkpoint.parent / "config.json").is_file() else BASE_MODEL
        common = dict(what="Qwen2-VL base model (config and processor)", setting="base", scorer="hpsv3")
        self.processor = from_pretrained(AutoProcessor, base, padding_side="right", **common)
        self.processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_token_id = self.processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        config = from_pretrained(AutoConfig, base, **common)
        if config.model_type != "qwen2_vl":
            raise ValueError(
                f"scorer 'hpsv3': base {base} is a {config.model_type!r} model; HPSv3 is built on qwen2_vl"
            )

        state = {modern_key(k): v for k, v in load_file(str(checkpoint)).items()}
        head_state = {
            k.removeprefix("rm_head."): state.pop(k) for k in list(state) if k.startswith("rm_head.")
        }
        embed = state.get("model.language_model.embed_tokens.weight")
        if embed is None:
            raise ValueError(
                f"scorer 'hpsv3': {checkpoint} has no embed_tokens weight; is it an HPSv3 checkpoint?"
            )
        if embed.shape[0] < len(self.processor.tokenizer):
            raise ValueError(
                f"scorer 'hpsv3': {checkpoint} embeds {embed.shape[0]} tokens but the tokenizer of {base} "
                f"with {REWARD_TOKEN} has {len(self.processor.tokenizer)}; wrong base model?"
            )
        config.text_config.vocab_size = embed.shape[0]  # HPSv3 resized the embedding to the tokenizer
        with torch.device("meta"):
            expected = set(Qwen2VLForConditionalGeneration(config).state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected or not head_state:
            raise ValueError(
                f"scorer 'hpsv3': {checkpoint} does not match the Qwen2-VL architecture of {base}: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}, reward head keys {len(head_state)}"
            )
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(None, config=config, state_dict=state,
                                                                    dtype=self.dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self.head = reward_head(
            config.text_config.hidden_size, head_state[next(reversed(head_state))].shape[0]
        )
        self.head.load_state_dict(head_state)
        self.head.to(self.device).eval().requires_grad_(False)

    def messages(self, prompt: str) -> list[dict]:
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt) + RATING_REQUEST},
                ],
            }
        ]

    def inputs(self, images: list[Image.Image], prompts: list[str]):
        resized = [
            image.resize(smart_resize(image.height, image.width)[::-1], Image.BICUBIC) for image in images
        ]
        texts = [
            self.processor.apply_chat_template(self.messages(p), tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        return self.processor(text=texts, images=resized, padding=True, return_tensors="pt").to(self.device)

    @torch.no_grad()
    def _score(self, images, prompts):
        batch = self.inputs(to_pil(images), prompts)
        vlm = self.model.model
        embeds = vlm.language_model.embed_tokens(batch["input_ids"])
        vision = vlm.visual(batch["pixel_values"].to(vlm.visual.dtype), grid_thw=batch["image_grid_thw"])
        image_embeds = vision if isinstance(vision, torch.Tensor) else vision.pooler_output
        image_mask = (batch["input_ids"] == self.model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        # No position_ids: the released forward lets the language model number tokens 0..L-1.
        hidden = vlm.language_model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"]
        ).last_hidden_state
        at_token = batch["input_ids"] == self.reward_token_id
        if not bool((at_token.sum(dim=1) == 1).all()):
            raise ValueError(
                f"scorer 'hpsv3': expected one {REWARD_TOKEN} token per prompt; is the tokenizer right?"
            )
        mu_sigma = self.head(hidden[at_token].float())
        return mu_sigma[:, 0]


__all__ = ["BASE_MODEL", "HPSV3_FILE", "HPSv3", "INSTRUCTION", "RATING_REQUEST", "modern_key", "smart_resize"]
