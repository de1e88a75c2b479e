"""Flow-matching training pieces for SD3 and FLUX, as the diffusers DreamBooth scripts compute them.

Pure functions over tensors and scheduler configs (no model, no pipeline call): where a sigma is drawn
(``draw_u``, ``training_sigmas``: logit-normal, mode or uniform densities), how a loss is weighted
(``loss_weights``: none, sigma_sqrt, cosmap), the model's shift (SD3's static shift in the scheduler table;
FLUX's dynamic ``mu`` from its packed token count), the flow interpolation ``x_t = (1 - σ) x0 + σ ε`` with
target ``ε - x0``, FLUX's 2x2 latent packing and image ids, and the LoRA targets of each family. diffusers'
own helpers do the work wherever they exist (``compute_density_for_timestep_sampling``,
``compute_loss_weighting_for_sd3``, ``calculate_shift``, ``FluxPipeline``'s packing static methods).

One model-side piece: :class:`RepeatedContextAttnProcessor`, SD3's joint attention where one context token
may stand for many identical ones (SD3 without T5: 256 zero states; see the class).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

#: Densities of u in [0, 1) that the SD3/FLUX scripts draw timesteps from (``--weighting_scheme``).
TIMESTEP_DENSITIES = ("logit_normal", "mode", "uniform")
#: Per-sample loss weightings of the same scripts (SD3 paper's names; ``none`` = 1).
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")

#: The transformer modules LoRA adapts by default: diffusers' train_dreambooth_lora_sd3.py (the joint
#: attention's image and context projections; Flow-GRPO uses the same eight) and train_dreambooth_lora_flux.py
#: (the same plus both feed-forwards of the double-stream blocks). PEFT matches them as name suffixes, so
#: SD3.5's second attention (``attn2``) and FLUX's single-stream ``proj_mlp``/``proj_out`` are left out, as
#: there.
LORA_TARGET_MODULES = {
    "sd3": ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
            "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"),
    "flux": ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
             "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
}


def draw_u(density: str, batch_size: int, *, logit_mean: float = 0.0, logit_std: float = 1.0,
           mode_scale: float = 1.29, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """``batch_size`` draws of u in [0, 1) from ``density`` (diffusers' defaults: logit_normal(0, 1), mode
    1.29)."""
    if density not in TIMESTEP_DENSITIES:
        raise ValueError(
            f"unknown timestep density {density!r}; expected one of {', '.join(TIMESTEP_DENSITIES)}"
        )
    return compute_density_for_timestep_sampling(
        density,
        batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=device,
        generator=generator,
    )


def u_of_uniform(density: str, uniform: torch.Tensor, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29) -> torch.Tensor:
    """u in [0, 1) with ``density`` from given uniform draws in (0, 1), one for one: what
    ``compute_density_for_timestep_sampling`` draws, as a function of a uniform (logit-normal: the
    inverse CDF ``sigmoid(mean + std * Phi^-1(v))``; mode: diffusers' map of its uniform draw), so that
    keyed per-pair draws keep their key."""
    if density not in TIMESTEP_DENSITIES:
        raise ValueError(
            f"unknown timestep density {density!r}; expected one of {', '.join(TIMESTEP_DENSITIES)}"
        )
    v = uniform.double()
    if density == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(v))
    if density == "mode":
        return 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    return v


def training_scheduler(config: dict) -> FlowMatchEulerDiscreteScheduler:
    """The pipeline's flow scheduler at its full training table (``num_train_timesteps`` sigmas, static shift
    applied)."""
    return FlowMatchEulerDiscreteScheduler.from_config(dict(config))


def training_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, u: torch.Tensor,
                    mu: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(sigma, timestep)`` for draws ``u``: as the scripts do,
    ``sigma = scheduler.sigmas[int(u N)]`` of the training table (which holds SD3's static shift), and
    ``timestep = 1000 sigma`` as the pipelines feed it.

    A dynamically shifted scheduler (FLUX) keeps its table unshifted: pass ``mu`` (:func:`flux_mu` of the
    packed token count) to shift it as ``FluxPipeline`` does at sampling, ``e^mu / (e^mu + 1/sigma - 1)``.
    """
    n = scheduler.config.num_train_timesteps
    index = (u.cpu() * n).long().clamp(0, n - 1)
    sigmas = scheduler.sigmas[index].float()
    if scheduler.config.use_dynamic_shifting:
        if mu is None:
            raise ValueError(
                "this scheduler shifts dynamically (use_dynamic_shifting): pass mu, e.g. flux_mu(tokens, "
                "config)"
            )
        sigmas = scheduler.time_shift(mu, 1.0, sigmas)
    elif mu is not None:
        raise ValueError("mu is only for a dynamically shifting scheduler; this one has a static shift "
                         f"{scheduler.config.shift}")
    return sigmas.to(u.device), (sigmas * n).to(u.device)


def static_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift of a sigma schedule, ``k sigma / (1 + (k - 1) sigma)`` (the scheduler's ``shift`` = k)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(image_seq_len: int, scheduler_config: dict) -> float:
    """FLUX's dynamic shift ``mu``: linear in the packed token count, 256 -> base_shift, 4096 -> max_shift."""
    c = scheduler_config
    return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))


def loss_weights(weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-row loss weights (``sigma_sqrt``: sigma^-2; ``cosmap``: 2 / (pi (1 - 2 sigma + 2 sigma^2));
    ``none``: 1)."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(
            f"unknown loss weighting {weighting!r}; expected one of {', '.join(LOSS_WEIGHTINGS)}"
        )
    return compute_loss_weighting_for_sd3(weighting, sigmas=sigmas).float()


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device).view(-1, *([1] * (like.ndim - 1)))


def interpolate(
    x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, target)``: the noisy input ``(1 - sigma) x0 + sigma noise`` and the velocity target
    ``noise - x0``."""
    s = _rows(sigmas, x0).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def flow_matching_losses(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                         weighting: str = "none") -> torch.Tensor:
    """Per-sample weighted ``mean over elements of (pred - (noise - x0))^2`` [N] in fp32, as the scripts
    reduce it."""
    w = _rows(loss_weights(weighting, sigmas.float()), pred)
    target = noise.float() - x0.float()
    return (w * (pred.float() - target) ** 2).flatten(1).mean(dim=1)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX packing: [B, C, H, W] -> [B, H/2 * W/2, 4C] (2x2 patches as tokens)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent height and width must be even, got {h}x{w}")
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: [B, H/2 * W/2, 4C] -> [B, C, H, W]."""
    return FluxPipeline._unpack_latents(packed, latent_height, latent_width, vae_scale_factor=1)


def latent_image_ids(
    latent_height: int, latent_width: int, device="cpu", dtype=torch.float32
) -> torch.Tensor:
    """FLUX's image position ids [H/2 * W/2, 3] = (0, row, column) of each packed token."""
    return FluxPipeline._prepare_latent_image_ids(None, latent_height // 2, latent_width // 2, device, dtype)


def packed_seq_len(latent_height: int, latent_width: int) -> int:
    """How many tokens FLUX's packed latents hold (what :func:`flux_mu` takes)."""
    return (latent_height // 2) * (latent_width // 2)


# ----------------------------------------------------------------------------------------------------
# SD3's joint attention with a repeated context token
# ----------------------------------------------------------------------------------------------------
class RepeatedContextAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0``, where the last context token may stand for ``context_repeats``
    identical tokens (a ``joint_attention_kwargs`` entry): its key gets ``log(context_repeats)`` added to
    every attention logit, which is what that many copies contribute to the softmax.

    SD3 without T5 (or with a T5 whose states are zero) conditions on 256 zero T5 states after CLIP's. Every
    block processes tokens one by one except in attention, where identical queries get identical outputs,
    so the 256 stay identical through the model and one of them, counted 256 times, is the same function
    (equal up to float rounding) at a fraction of the tokens. Called without ``context_repeats`` (a stock
    pipeline call) it is exactly the stock processor.
    """

    def __init__(self):
        self.stock = JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 context_repeats: int | None = None, **kwargs):
        if context_repeats is None or encoder_hidden_states is None:  # SD3.5's attn2 has no context
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        b, n = hidden_states.shape[:2]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = (heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)),
                   heads(attn.to_v(hidden_states)))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = math.log(context_repeats)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        image, context = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


def use_repeated_context(model: torch.nn.Module) -> bool:
    """Give ``model``'s joint attention :class:`RepeatedContextAttnProcessor` (it is the stock one on
    calls without ``context_repeats``). False, and nothing changed, when some attention runs a processor of
    the user's (IP-Adapter, a custom one): a repeated context token cannot be counted there. Checked on
    every call (a module walk: microseconds next to a forward), so processors set later are seen."""
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    ready = bool(attentions) and all(
        type(m.processor) in (JointAttnProcessor2_0, RepeatedContextAttnProcessor) for m in attentions)
    if ready:
        for m in attentions:
            if type(m.processor) is JointAttnProcessor2_0:
                m.set_processor(RepeatedContextAttnProcessor())
    return ready
