"""Model families: everything that differs between SD 1.x/2.x, SDXL, AnimateDiff and Wan, one entry each.

A :class:`Family` owns its pipeline's conditioning (what the sampler captures, how the trainer encodes
prompts, SDXL's micro-conditioning), its frame and size rules and defaults, how its denoiser is called,
its sampling step rule and its training noise (DDPM or flow matching). The sampler, the objectives and
the trainer only ever ask the entry; adding a family is one entry here (and a tiny builder in
:mod:`diffalign.tiny` for its tests). See the README's "Adding a model family".
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffalign.denoising import DDPMNoise, FlowMatchingNoise
from diffalign.flow_matching import latent_image_ids, pack_latents, unpack_latents, use_repeated_context
from diffalign.steps import DDIMStep, FlowSDEStep

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Family:
    """How one pipeline family conditions, calls and trains its denoiser.

    ``capture(callback_tensors, batch_size, do_cfg) -> (cond, uncond)`` turns the tensors the pipeline hands
    to ``callback_on_step_end`` at step 0 into per-sample conditioning ``[B, ...]``; ``call(denoiser, x, t,
    cond)`` runs the denoiser on latents ``x`` at per-row timesteps ``t``; ``encode_prompt(pipe, captions,
    device)`` is the same conditioning for training captions; ``micro_conditioning`` names the per-item
    batch tensors (``time_ids``) that join it; ``make_step_rule(eta)`` is the sampling rule (``eta``: DDIM's
    eta, or the flow SDE's noise level); ``make_training_noise(scheduler_config, **flow_settings)``
    (:data:`~diffalign.denoising.FLOW_DEFAULTS`'s keys) the noise process of the denoising losses;
    ``check_frames(n)`` says why ``n`` frames cannot be used (None when they can).

    ``check_sampling(pipe, request)`` says why a sampling request (``height``/``width`` resolved, the
    guidance and the pipeline keywords) cannot be sampled (None when it can); ``prepare_sampling(pipe,
    prompts, request) -> (pipeline inputs, conditioning)`` encodes the prompts once for pipelines whose
    callback lacks conditioning tensors (FLUX) or whose encoding the family shortens (SD3's zero T5 states as
    one repeated token): the inputs replace ``prompt`` (and ``negative_prompt``) in the pipeline call and the
    conditioning joins the callback's tensors for ``capture``.
    """

    name: str
    pipeline_classes: tuple[str, ...]
    denoiser_attr: str
    callback_inputs: tuple[str, ...]
    capture: Callable[[dict, int, bool], tuple[dict, dict]]
    call: Callable[..., torch.Tensor]
    encode_prompt: Callable[..., dict[str, torch.Tensor]]
    make_step_rule: Callable[[float], object] = DDIMStep
    make_training_noise: Callable[..., object] = DDPMNoise.from_pipeline_config
    micro_conditioning: tuple[str, ...] = ()
    video: bool = False
    check_frames: Callable[[int], str | None] = lambda n: None if n >= 1 else "at least 1 frame"
    check_sampling: Callable[[object, dict], str | None] = lambda pipe, request: None
    prepare_sampling: Callable[..., tuple[dict, dict]] | None = None
    #: ``training_latents(pipe, sampled, height, width)``: a sample's final latents (as the scheduler saw
    #: them) in the training losses' layout, e.g. FLUX's packed tokens back to [N, C, h, w].
    training_latents: Callable[..., torch.Tensor] = lambda pipe, sampled, height, width: sampled

    def default_size(self, pipe) -> dict[str, int]:
        """The pipeline's own ``height``/``width`` (and ``num_frames`` for video): its ``__call__`` defaults,
        else the denoiser's ``sample_size`` in pixels (what diffusers itself falls back to)."""
        params = inspect.signature(type(pipe).__call__).parameters
        sizes = {k: params[k].default for k in ("height", "width", "num_frames")
                 if k in params and isinstance(params[k].default, int)}
        sample_size = getattr(getattr(pipe, self.denoiser_attr).config, "sample_size", None)
        if isinstance(sample_size, int) and hasattr(pipe, "vae_scale_factor"):
            for key in ("height", "width"):
                sizes.setdefault(key, sample_size * pipe.vae_scale_factor)
        # FLUX: no sample_size in the transformer config; its __call__ uses default_sample_size
        default_sample_size = getattr(pipe, "default_sample_size", None)
        if isinstance(default_sample_size, int) and hasattr(pipe, "vae_scale_factor"):
            for key in ("height", "width"):
                sizes.setdefault(key, default_sample_size * pipe.vae_scale_factor)
        return sizes


# ----------------------------------------------------------------------------------------------------
# Conditioning as the sampler captures it
# ----------------------------------------------------------------------------------------------------
def _split_negative_positive(names: dict[str, str]):
    """Capture for pipelines whose callback tensors are ``[negative; positive]`` along dim 0 under CFG."""

    def capture(tensors, b, do_cfg):
        cond = {name: tensors[key][-b:] for key, name in names.items()}
        uncond = {name: tensors[key][:b] for key, name in names.items()} if do_cfg else {}
        return cond, uncond

    return capture


def _capture_per_frame(tensors, b, do_cfg):
    # AnimateDiff repeats each prompt's embedding once per frame ([neg; pos] then repeat_interleave(F)).
    embeds = tensors["prompt_embeds"]
    frames = embeds.shape[0] // (2 * b if do_cfg else b)
    capture = _split_negative_positive({"prompt_embeds": "encoder_hidden_states"})
    return capture({"prompt_embeds": embeds[::frames]}, b, do_cfg)


def _capture_separate_negative(tensors, b, do_cfg):
    # Wan keeps positive and negative embeddings apart and runs two forward passes.
    cond = {"encoder_hidden_states": tensors["prompt_embeds"]}
    return cond, ({"encoder_hidden_states": tensors["negative_prompt_embeds"]} if do_cfg else {})


# ----------------------------------------------------------------------------------------------------
# Conditioning for training captions (the pipeline's own encode_prompt)
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def _encode_sd(pipe, captions: list[str], device) -> dict[str, torch.Tensor]:
    # SD 1.x/2.x and AnimateDiff (one embedding per video; the motion UNet call repeats it per frame)
    embeds, _ = pipe.encode_prompt(captions, device, 1, False)
    return {"encoder_hidden_states": embeds}


@torch.no_grad()
def _encode_sdxl(pipe, captions: list[str], device) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled}


@torch.no_grad()
def _encode_wan(pipe, captions: list[str], device) -> dict[str, torch.Tensor]:
    # 512 tokens as WanPipeline.__call__ (encode_prompt alone defaults to 226): the sampler's conditioning
    embeds, _ = pipe.encode_prompt(prompt=captions, do_classifier_free_guidance=False,
                                   max_sequence_length=512, device=device)
    return {"encoder_hidden_states": embeds}


# ----------------------------------------------------------------------------------------------------
# Denoiser calls
# ----------------------------------------------------------------------------------------------------
def _call_unet(unet, x, t, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    return unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                added_cond_kwargs=added or None, return_dict=False)[0]


def _call_motion_unet(unet, x, t, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    # x: [N, C, F, H, W]; the motion UNet takes one text embedding per frame.
    embeds = cond["encoder_hidden_states"].repeat_interleave(x.shape[2], dim=0)
    return unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]


def _call_wan(transformer, x, t, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                       return_dict=False)[0]


def _wan_frames(n: int) -> str | None:
    return None if n >= 1 and (n - 1) % 4 == 0 else "4k+1 frames for Wan's VAE (e.g. 5, 9, 17, 81)"


# ----------------------------------------------------------------------------------------------------
# SD3 and FLUX (flow-matching MMDiTs)
# ----------------------------------------------------------------------------------------------------
def _call_default(pipe, name: str):
    """The default of ``name`` in the pipeline's ``__call__`` (what a stock call uses)."""
    return inspect.signature(type(pipe).__call__).parameters[name].default


#: SD3 pipelines already told that they run without T5 (said once per pipeline)
_WARNED_WITHOUT_T5: weakref.WeakSet = weakref.WeakSet()


def _sd3_t5_problem(pipe) -> str | None:
    """SD3 may drop T5 (diffusers' documented memory saving: its states are zeros, CLIP conditions alone):
    said once, as a warning; a T5 encoder without its tokenizer cannot encode at all."""
    if getattr(pipe, "text_encoder_3", None) is not None:
        if getattr(pipe, "tokenizer_3", None) is None:
            return (f"{type(pipe).__name__} has text_encoder_3 (T5) but no tokenizer_3: load the pipeline "
                    "with both, or with text_encoder_3=None to drop T5")
        return None
    if pipe not in _WARNED_WITHOUT_T5:
        _WARNED_WITHOUT_T5.add(pipe)
        log.warning("%s without T5 (text_encoder_3 is None): diffusers encodes T5's states as zeros, prompts "
                    "condition through CLIP-L/G only (lower prompt adherence)", type(pipe).__name__)
    return None


def _flux_t5_problem(pipe) -> str | None:
    if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "tokenizer_2", None) is None:
        return (f"{type(pipe).__name__} has no T5 (text_encoder_2 / tokenizer_2 is None): FLUX.1 conditions "
                "on T5's states and cannot drop it; load the pipeline with text_encoder_2 and tokenizer_2")
    return None


def _raise_if(problem: str | None) -> None:
    if problem is not None:
        raise ValueError(problem)


def _collapse_zero_t5(transformer, embeds: list[torch.Tensor], t5_tokens: int) -> list[torch.Tensor] | None:
    """``embeds`` with their T5 part (the last ``t5_tokens`` states) as one token, when that part is exactly
    zero in all of them (SD3 without T5, or a zero T5 like toy-sd3's) and the transformer can count the token
    ``t5_tokens`` times (:class:`~diffalign.flow_matching.RepeatedContextAttnProcessor`); None otherwise."""
    if t5_tokens < 2 or any(e.shape[1] <= t5_tokens or e[:, -t5_tokens:].count_nonzero() for e in embeds):
        return None
    if not use_repeated_context(transformer):
        return None
    return [e[:, : e.shape[1] - t5_tokens + 1] for e in embeds]


def _sd3_embeddings(pipe, captions: list[str], device, negative_prompt=None, do_cfg: bool = False):
    """``(cond, uncond)`` as StableDiffusion3Pipeline.__call__ encodes them (the same prompt for CLIP-L,
    CLIP-G and T5, T5 at the call's default length); zero T5 states are one token counted that many times
    (``context_repeats``, see :func:`_collapse_zero_t5`)."""
    _raise_if(_sd3_t5_problem(pipe))
    t5_tokens = _call_default(pipe, "max_sequence_length")
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=captions, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=do_cfg,
        negative_prompt=negative_prompt, max_sequence_length=t5_tokens)
    cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    uncond = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled} if do_cfg else {}
    parts = [d for d in (cond, uncond) if d]
    collapsed = _collapse_zero_t5(pipe.transformer, [d["encoder_hidden_states"] for d in parts], t5_tokens)
    if collapsed is not None:
        for d, short in zip(parts, collapsed, strict=True):
            d["encoder_hidden_states"] = short
            d["context_repeats"] = torch.full((len(captions),), float(t5_tokens), device=short.device)
    return cond, uncond


@torch.no_grad()
def _encode_sd3(pipe, captions: list[str], device) -> dict[str, torch.Tensor]:
    return _sd3_embeddings(pipe, captions, device)[0]


@torch.no_grad()
def _prepare_sd3(pipe, prompts: list[str], request: dict) -> tuple[dict, dict]:
    # encoded once here and handed to the pipeline, so that zero T5 states can be one repeated token (the
    # pipeline would encode all of them); the callback's embeddings then are these
    do_cfg = request["guidance_scale"] > 1  # StableDiffusion3Pipeline.do_classifier_free_guidance
    cond, uncond = _sd3_embeddings(pipe, prompts, pipe._execution_device, request["negative_prompt"], do_cfg)
    inputs = {"prompt_embeds": cond["encoder_hidden_states"],
              "pooled_prompt_embeds": cond["pooled_projections"], "negative_prompt": None}
    if do_cfg:
        inputs |= {"negative_prompt_embeds": uncond["encoder_hidden_states"],
                   "negative_pooled_prompt_embeds": uncond["pooled_projections"]}
    if "context_repeats" in cond:
        inputs["joint_attention_kwargs"] = {"context_repeats": _call_default(pipe, "max_sequence_length")}
        return inputs, {"context_repeats": cond["context_repeats"]}
    return inputs, {}


_split_sd3 = _split_negative_positive({"prompt_embeds": "encoder_hidden_states",
                                       "pooled_prompt_embeds": "pooled_projections"})


def _capture_sd3(tensors, b, do_cfg):
    cond, uncond = _split_sd3(tensors, b, do_cfg)
    if "context_repeats" in tensors:  # zero T5 states as one token (the same count with and without CFG)
        for d in (cond, uncond) if uncond else (cond,):
            d["context_repeats"] = tensors["context_repeats"]
    return cond, uncond


def _call_sd3(transformer, x, t, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    # t in [0, 1000] (sigma * 1000), as StableDiffusion3Pipeline passes it
    repeats = cond.get("context_repeats")
    kwargs = None
    if repeats is not None:
        if not use_repeated_context(transformer):
            raise ValueError(f"{type(transformer).__name__}: conditioning with a repeated zero-T5 token "
                             "needs the stock joint attention processors; a custom one is set")
        kwargs = {"context_repeats": int(round(float(repeats[0])))}
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                       pooled_projections=cond["pooled_projections"], joint_attention_kwargs=kwargs,
                       return_dict=False)[0]


def _size_rule(pipe, packing: int) -> tuple[int, str]:
    """``(multiple, why)``: sizes must be multiples of VAE factor x patch size (x FLUX's 2x2 packing)."""
    patch = getattr(pipe.transformer.config, "patch_size", 1)
    why = f"VAE factor {pipe.vae_scale_factor} x patch size {patch}"
    if packing > 1:
        why += f" x packing {packing}"
    return pipe.vae_scale_factor * patch * packing, why


def _check_size(pipe, request: dict, packing: int) -> str | None:
    multiple, why = _size_rule(pipe, packing)
    height, width = request.get("height"), request.get("width")
    if height is None or width is None or (height % multiple == 0 and width % multiple == 0):
        return None
    fit = [max(multiple, size // multiple * multiple) for size in (height, width)]
    return (f"height={height}, width={width}: {type(pipe).__name__} needs both divisible by {multiple} "
            f"({why}), e.g. {fit[0]}x{fit[1]}")


def _check_sd3(pipe, request: dict) -> str | None:
    return _sd3_t5_problem(pipe) or _check_size(pipe, request, packing=1)


def _check_flux(pipe, request: dict) -> str | None:
    if (problem := _flux_t5_problem(pipe)) is not None:
        return problem
    cfg_asked = request.get("negative_prompt") is not None or (request.get("true_cfg_scale") or 1.0) > 1
    if cfg_asked:
        return (f"{type(pipe).__name__} (FLUX.1, guidance-distilled) samples without classifier-free "
                "guidance: leave negative_prompt unset and true_cfg_scale at 1; guidance_scale sets the "
                "guidance embedding")
    return _check_size(pipe, request, packing=2)


@torch.no_grad()
def _encode_flux(pipe, captions: list[str], device,
                 guidance_scale: float | None = None) -> dict[str, torch.Tensor]:
    # CLIP-L pooled + T5 states at FluxPipeline.__call__'s length; FLUX.1-dev's guidance embedding as a
    # per-sample tensor (the pipeline's default 3.5 for training captions), none for schnell
    _raise_if(_flux_t5_problem(pipe))
    embeds, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, device=device,
                                           max_sequence_length=_call_default(pipe, "max_sequence_length"))
    cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if pipe.transformer.config.guidance_embeds:
        scale = _call_default(pipe, "guidance_scale") if guidance_scale is None else guidance_scale
        cond["guidance"] = torch.full((len(captions),), float(scale), device=embeds.device,
                                      dtype=torch.float32)
    return cond


_FLUX_COND = ("encoder_hidden_states", "pooled_projections", "guidance", "img_ids")


def _prepare_flux(pipe, prompts: list[str], request: dict) -> tuple[dict, dict]:
    # FluxPipeline's callback holds neither the pooled embeddings nor the ids: encode once here, hand the
    # pipeline the embeddings, and keep the packed tokens' image ids [B, HW/4, 3] (as prepare_latents
    # makes them, in the embeddings' dtype)
    cond = _encode_flux(pipe, prompts, pipe._execution_device, request["guidance_scale"])
    embeds, vae = cond["encoder_hidden_states"], pipe.vae_scale_factor
    ids = latent_image_ids(request["height"] // vae, request["width"] // vae, embeds.device, embeds.dtype)
    cond["img_ids"] = ids.expand(len(prompts), -1, -1).contiguous()
    inputs = {"prompt_embeds": embeds, "pooled_prompt_embeds": cond["pooled_projections"]}
    return inputs, cond


def _capture_flux(tensors, b, do_cfg):
    return {k: tensors[k] for k in _FLUX_COND if k in tensors}, {}


def _flux_forward(transformer, x, t, cond: dict[str, torch.Tensor], img_ids: torch.Tensor) -> torch.Tensor:
    text = cond["encoder_hidden_states"]
    txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype)  # as FluxPipeline.encode_prompt
    # FluxPipeline casts t to the latents' dtype, then divides by 1000
    return transformer(hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=cond.get("guidance"),
                       pooled_projections=cond["pooled_projections"], encoder_hidden_states=text,
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


def _flux_training_latents(pipe, sampled: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # FluxPipeline's latent size for an image of height x width (its prepare_latents)
    scale = pipe.vae_scale_factor
    return unpack_latents(sampled, 2 * (height // (scale * 2)), 2 * (width // (scale * 2)))


def _call_flux(transformer, x, t, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    if x.ndim == 4:  # training latents [N, C, H, W]: FLUX sees them packed 2x2, with their image ids
        h, w = x.shape[-2:]
        ids = latent_image_ids(h, w, x.device, x.dtype)
        return unpack_latents(_flux_forward(transformer, pack_latents(x), t, cond, ids), h, w)
    return _flux_forward(transformer, x, t, cond, cond["img_ids"][0])  # sampled: packed [N, HW/4, 4C]


FAMILIES: dict[str, Family] = {
    "sd": Family("sd", ("StableDiffusionPipeline",), "unet", ("prompt_embeds",),
                 _split_negative_positive({"prompt_embeds": "encoder_hidden_states"}), _call_unet,
                 _encode_sd),
    "sdxl": Family(
        "sdxl", ("StableDiffusionXLPipeline",), "unet", ("prompt_embeds", "add_text_embeds", "add_time_ids"),
        _split_negative_positive(
            {"prompt_embeds": "encoder_hidden_states", "add_text_embeds": "text_embeds",
             "add_time_ids": "time_ids"}
        ),
        _call_unet, _encode_sdxl, micro_conditioning=("time_ids",),
    ),
    "animatediff": Family("animatediff", ("AnimateDiffPipeline",), "unet", ("prompt_embeds",),
                          _capture_per_frame, _call_motion_unet, _encode_sd, video=True),
    "wan": Family("wan", ("WanPipeline",), "transformer", ("prompt_embeds", "negative_prompt_embeds"),
                  _capture_separate_negative, _call_wan, _encode_wan,
                  make_step_rule=lambda eta: FlowSDEStep(noise_level=eta),
                  make_training_noise=FlowMatchingNoise.from_pipeline_config, video=True,
                  check_frames=_wan_frames),
    "sd3": Family("sd3", ("StableDiffusion3Pipeline",), "transformer",
                  ("prompt_embeds", "pooled_prompt_embeds"), _capture_sd3, _call_sd3, _encode_sd3,
                  make_step_rule=lambda eta: FlowSDEStep(noise_level=eta),
                  make_training_noise=FlowMatchingNoise.from_pipeline_config, check_sampling=_check_sd3,
                  prepare_sampling=_prepare_sd3),
    "flux": Family("flux", ("FluxPipeline",), "transformer", ("prompt_embeds",), _capture_flux, _call_flux,
                   _encode_flux, make_step_rule=lambda eta: FlowSDEStep(noise_level=eta),
                   make_training_noise=FlowMatchingNoise.from_pipeline_config, check_sampling=_check_flux,
                   prepare_sampling=_prepare_flux, training_latents=_flux_training_latents),
}

#: Families whose samples are clips [B, F, 3, H, W] and whose pipelines take ``num_frames``.
VIDEO_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.video)


def family_of(pipe) -> Family:
    for cls in type(pipe).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.pipeline_classes:
                return family
    known = ", ".join(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise NotImplementedError(f"the trajectory sampler does not support {type(pipe).__name__}; "
                              f"supported: {known}")
