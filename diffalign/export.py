"""The run's outputs stock diffusers loads: a LoRA folder or a pipeline folder, and its model card."""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.config import Config
from diffalign.families import family_of
from diffalign.files import apply_umask
from diffalign.models import BUILTIN_MODELS, LORA_WEIGHTS_FILE
from diffalign.objectives.context import unwrap


def denoiser_attr(pipe) -> str:
    """The pipeline attribute holding the trained denoiser: ``unet``, or ``transformer`` (Wan)."""
    return family_of(pipe).denoiser_attr


def save_lora(pipe, unet, out: Path, state_dict: dict | None = None) -> None:
    """A folder that ``pipe.load_lora_weights(out)`` accepts (diffusers LoRA format, safetensors), written
    by the pipeline's own ``save_lora_weights`` (``unet_lora_layers``, or Wan's
    ``transformer_lora_layers``). ``state_dict``: the denoiser's weights to write instead of its own
    (an FSDP-sharded denoiser's, gathered whole)."""
    from peft.utils import get_peft_model_state_dict  # heavy: loaded when a LoRA is written

    bare = unwrap(unet)
    attr = denoiser_attr(pipe)
    # PEFT's own key names (``lora_A`` / ``lora_B``), which every diffusers LoRA loader reads as they are.
    # ``convert_state_dict_to_diffusers`` must not be applied: it renames attention keys to the old
    # ``lora.down`` / ``lora.up`` form but leaves the others, and a loader then sees two formats and drops
    # one of them (the attention half on SDXL, or SD3's renamed keys).
    layers = get_peft_model_state_dict(bare, state_dict=state_dict)
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    type(pipe).save_lora_weights(
        out,
        safe_serialization=True,
        **{
            f"{attr}_lora_layers": layers,
            f"{attr}_lora_adapter_metadata": bare.peft_config["default"].to_dict(),
        },
    )
    apply_umask(out / LORA_WEIGHTS_FILE)


def reload_exported_lora(pipe, unet, out: Path) -> None:
    """Replace the trained adapter by the exported file, loaded as a user loads it (the pipeline's stock
    ``load_lora_weights``), and check that every trained tensor came back: the tuned evaluation then
    samples exactly what the run hands over, and an export that a loader would partly drop (as
    ``convert_state_dict_to_diffusers`` once made it) stops the run instead of passing unnoticed."""
    from peft.utils import get_peft_model_state_dict  # heavy: loaded when a LoRA is written

    bare = unwrap(unet)
    trained = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(bare).items()}
    bare.delete_adapters("default")
    pipe.load_lora_weights(out, adapter_name="default")
    loaded = get_peft_model_state_dict(bare, adapter_name="default")
    missing = sorted(set(trained) - set(loaded))
    changed = [
        k for k in trained if k in loaded and not torch.equal(trained[k].to(loaded[k].dtype), loaded[k].cpu())
    ]
    if missing or changed or len(loaded) != len(trained):
        raise RuntimeError(
            f"the exported LoRA {out / LORA_WEIGHTS_FILE} does not load back as trained with "
            f"load_lora_weights: {len(missing)} of {len(trained)} tensors missing, {len(changed)} "
            f"changed (first: {(missing or changed or ['?'])[0]})"
        )


def save_full(pipe, unet, out: Path) -> None:
    """A pipeline folder with the tuned denoiser (``from_pretrained(out)``; the denoiser alone is
    ``out/unet`` or ``out/transformer``)."""
    attr = denoiser_attr(pipe)
    original = getattr(pipe, attr)
    setattr(pipe, attr, unwrap(unet))
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        setattr(pipe, attr, original)
    for name in pipe.components:
        if (out / name).is_dir():
            apply_umask(out / name)
    apply_umask(out / "model_index.json")


def write_model_card(
    out: Path, cfg: Config, metrics: dict, evaluation: dict | None, elapsed_s: float
) -> None:
    kind = "LoRA adapters" if cfg.model.finetune == "lora" else "A fully fine-tuned denoiser"
    # A built-in id is not a hub id: the card names the folder it lives in on this machine.
    base = str(BUILTIN_MODELS[cfg.model.name]()) if cfg.model.name in BUILTIN_MODELS else cfg.model.name
    here = str(out)
    if cfg.model.motion_adapter and cfg.model.finetune == "lora":
        imports = "from diffusers import AnimateDiffPipeline, MotionAdapter"
        load = (f"adapter = MotionAdapter.from_pretrained({cfg.model.motion_adapter!r})\n"
                f"pipe = AnimateDiffPipeline.from_pretrained({base!r}, motion_adapter=adapter)\n"
                f"pipe.load_lora_weights({here!r})")
    else:
        imports = "from diffusers import DiffusionPipeline"
        load = (f"pipe = DiffusionPipeline.from_pretrained({base!r})\npipe.load_lora_weights({here!r})"
                if cfg.model.finetune == "lora" else f"pipe = DiffusionPipeline.from_pretrained({here!r})")
    spec = f"{here}:lora" if cfg.model.finetune == "lora" else here
    lines = [
        "---",
        f"base_model: {cfg.model.name}",
        "library_name: diffusers",
        "tags: [diffalign, " + cfg.method.name + ("" if cfg.model.finetune != "lora" else ", lora") + "]",
        "---",
        f"# {cfg.method.name.upper()} on {cfg.model.name}",
        "",
        f"{kind} trained with **{cfg.method.name}** by diffalign on `{cfg.data.source}` "
        f"for {cfg.train.max_steps} steps ({elapsed_s / 60:.1f} min).",
        "",
        "```python",
        imports,
        load,
        "```",
        "",
        f"With diffalign: `diffalign sample --model {spec} --prompt \"...\"  --out samples` "
        "(the same spec works for `gallery`, `pairs` and `toy eval`).",
        "",
        "## Final training metrics (mean of the last logging window)",
        "",
        *[f"- {k}: {v:.6g}" for k, v in metrics.items()],
        "",
    ]
    if evaluation:
        lines += ["## Held-out evaluation (same prompts, same seeds)", "",
                  "| scorer | base | tuned | change |", "|---|---|---|---|"]
        for name, row in evaluation["scorers"].items():
            lines.append(
                f"| {name} | {row['base_mean']:.5g} | {row['tuned_mean']:.5g} | {row['delta']:+.5g} |"
            )
        lines += [
            "",
            f"{len(evaluation['prompts'])} prompts x {len(evaluation['seeds'])} seeds; images in `eval/`.",
            "",
        ]
        pairs = evaluation.get("train_pairs") or {}
        if pairs.get("before") and pairs.get("after"):
            lines += ["## Method objective on training pairs (fixed noise draws)", "",
                      "| | loss | implicit accuracy | reward margin |", "|---|---|---|---|"]
            for when in ("before", "after"):
                m = pairs[when]
                lines.append(
                    f"| {when} | {m['loss']:.5g} | {m['implicit_acc']:.3f} | {m['reward_margin']:.5g} |"
                )
            lines.append("")
    lines += ["## Config", "", "```yaml", cfg.to_yaml().rstrip(), "```", ""]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")
