"""Scorers: one interface (:class:`Scorer`), one registry by name (:func:`make_scorer`).

Importing this package registers the built-in scorers.
"""

from diffalign.scorers import simple  # noqa: F401  (registers the weight-free scorers)
from diffalign.scorers.base import (
    SCORERS,
    Scorer,
    available_scorers,
    check_scorer_names,
    make_scorer,
    register_scorer,
)

__all__ = ["SCORERS", "Scorer", "available_scorers", "check_scorer_names", "make_scorer", "register_scorer"]
