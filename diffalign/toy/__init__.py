"""The toy world: a procedural captioned dataset and ``toy-sdxl``, a tiny SDXL pretrained on it on a CPU.

``toy-sdxl`` has the real SDXL pipeline architecture (VAE, ``text_time`` UNet, two CLIP text encoders,
the real CLIP tokenizer) at small width, so alignment methods can be seen to work in CPU minutes.
``toy-sd3`` is its flow-matching sibling: a stock ``StableDiffusion3Pipeline`` (an MMDiT trained with the
flow-matching loss on the same scenes; toy-sdxl's VAE and text encoders).
``toy-animatediff`` is its video sibling: a stock ``AnimateDiffPipeline`` (motion UNet trained on
moving-shape clips, toy-sdxl's VAE and first text encoder).
"""

from pathlib import Path

#: How the toy pipelines sample unless told otherwise (what they were pretrained and evaluated with).
TOY_NUM_STEPS = 20
TOY_GUIDANCE = 3.0

#: The shipped pretrained toy pipeline (diffusers format), made by ``diffalign toy pretrain``.
TOY_SDXL_DIR = Path(__file__).parent / "weights" / "toy-sdxl"


def toy_sdxl_path() -> Path:
    """The folder of the shipped ``toy-sdxl`` pipeline; a clear error if this checkout lacks it."""
    if not (TOY_SDXL_DIR / "model_index.json").exists():
        raise FileNotFoundError(
            f"the toy-sdxl weights are missing from {TOY_SDXL_DIR}; rebuild them with "
            "'diffalign toy pretrain --out RUN' and copy RUN/pipeline there"
        )
    return TOY_SDXL_DIR


#: The shipped pretrained toy flow-matching pipeline (diffusers format), made by
#: ``diffalign toy pretrain-flow``.
TOY_SD3_DIR = Path(__file__).parent / "weights" / "toy-sd3"


def toy_sd3_path() -> Path:
    """The folder of the shipped ``toy-sd3`` pipeline; a clear error if this checkout lacks it."""
    if not (TOY_SD3_DIR / "model_index.json").exists():
        raise FileNotFoundError(
            f"the toy-sd3 weights are missing from {TOY_SD3_DIR}; rebuild them with "
            "'diffalign toy pretrain-flow --out RUN' and copy RUN/pipeline there"
        )
    return TOY_SD3_DIR


#: The shipped pretrained toy video pipeline (diffusers format), made by ``diffalign toy pretrain-video``.
TOY_ANIMATEDIFF_DIR = Path(__file__).parent / "weights" / "toy-animatediff"


def toy_animatediff_path() -> Path:
    """The folder of the shipped ``toy-animatediff`` pipeline; a clear error if this checkout lacks it."""
    if not (TOY_ANIMATEDIFF_DIR / "model_index.json").exists():
        raise FileNotFoundError(
            f"the toy-animatediff weights are missing from {TOY_ANIMATEDIFF_DIR}; rebuild them with "
            "'diffalign toy pretrain-video --out RUN' and copy RUN/pipeline there"
        )
    return TOY_ANIMATEDIFF_DIR
