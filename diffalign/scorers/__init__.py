"""Scorers: one interface (:class:`Scorer`), one registry by name (:func:`make_scorer`).

Importing this package registers the built-in scorers. Wherever a scorer name is accepted, so is a spec:
``NAME[:KEY=VALUE,...]`` (``pickscore:model=/models/pickscore``, ``hpsv2:version=v2.1,dtype=float16``) or a
weighted sum of such terms (``10*pickscore + 2*hpsv2 + 0.05*aesthetic``).
"""

# Importing a scorer module registers its scorers: weight-free (simple), toy-sdxl rewards (toy) and the
# model-based ones (aesthetic, clipscore, hpsv2, hpsv3, imagereward, pickscore) and the served ones (remote,
# vlm_judge).
from diffalign.scorers import (  # noqa: F401
    aesthetic,
    clipscore,
    hpsv2,
    imagereward,
    pickscore,
    remote,
    simple,
    toy,
    vlm_judge,
)
from diffalign.scorers.base import (
    SCORERS,
    CombinedScorer,
    NormalizedScorer,
    Scorer,
    available_scorers,
    check_scorer_names,
    make_scorer,
    parse_scorer_spec,
    register_scorer,
)

__all__ = [
    "SCORERS",
    "CombinedScorer",
    "NormalizedScorer",
    "Scorer",
    "available_scorers",
    "check_scorer_names",
    "make_scorer",
    "parse_scorer_spec",
    "register_scorer",
]
