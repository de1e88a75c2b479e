"""A stock SDXL pipeline that can also return its denoising trajectory.

Load it with plain diffusers (diffalign must be installed; the sampling math lives there, once):

    pipe = DiffusionPipeline.from_pretrained(
        "stabilityai/stable-diffusion-xl-base-1.0",
        custom_pipeline="path/to/pipelines/diffalign_sdxl",
        trust_remote_code=True,  # diffusers runs a custom pipeline.py only when you opt in
    )
    out = pipe("a cat", return_trajectory=True, eta=1.0, seeds=[0])
    out.images            # [B, 3, H, W] in [0, 1]
    out.trajectory        # diffalign.sampler.Trajectory: latents [B, T+1, ...], log_probs [B, T], ...

Without ``return_trajectory`` it is exactly ``StableDiffusionXLPipeline``.
"""

from diffusers import StableDiffusionXLPipeline

from diffalign.sampler import sample


class DiffalignSDXLPipeline(StableDiffusionXLPipeline):
    def __call__(self, prompt=None, *args, return_trajectory: bool = False, seeds=None, **kwargs):
        if not return_trajectory:
            return super().__call__(prompt, *args, **kwargs)
        if args:
            raise TypeError("with return_trajectory=True pass the pipeline arguments by keyword")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = kwargs.pop("num_images_per_prompt", 1) or 1
        prompts = [p for p in prompts for _ in range(per_prompt)]
        return sample(
            self,
            prompts,
            seeds=seeds,
            generator=kwargs.pop("generator", None),
            num_steps=kwargs.pop("num_inference_steps", 50),
            guidance_scale=kwargs.pop("guidance_scale", 5.0),
            guidance_rescale=kwargs.pop("guidance_rescale", 0.0),
            eta=kwargs.pop("eta", 1.0),
            decode=kwargs.pop("output_type", "pt") != "latent",
            **kwargs,
        )
