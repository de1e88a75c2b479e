"""diffalign: align diffusion models with human preference.

One denoising-trajectory sampler (:mod:`diffalign.sampler`) and one scorer interface
(:mod:`diffalign.scorers`), shared by Diffusion-DPO, MaPO, SePPO and PRDP.
"""

__version__ = "0.1.0"
