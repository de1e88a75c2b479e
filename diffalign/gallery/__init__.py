"""Gallery evaluation runs: generate with several models on the same prompts and noise, score, compare,
browse.

``run_gallery`` is the Python entry point (also for validation inside training); ``diffalign gallery`` is
the command (:mod:`diffalign.gallery.cli`).
"""

from diffalign.gallery.run import GallerySettings, ModelSpec, parse_model_arg, run_gallery, validate_models
from diffalign.prompt_sets import known_prompt_sets, load_prompts, select_prompts

__all__ = [
    "GallerySettings",
    "ModelSpec",
    "known_prompt_sets",
    "load_prompts",
    "parse_model_arg",
    "run_gallery",
    "select_prompts",
    "validate_models",
]
