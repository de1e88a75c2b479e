"""Gallery statistics: means with 95% confidence intervals and pairwise per-prompt win rates.

Images of one prompt are not independent draws (they share the prompt), so every interval treats the
**prompt** as the unit: a model's per-prompt mean score is one observation.

- ``mean_ci``: the mean of all images, with a Student-t interval from the per-prompt means
  (``mean ± t_{0.975, n-1} · sd / √n``, n = prompts). With one prompt there is no interval (None).
- ``win_rate``: for models A, B and each prompt, A wins when its per-prompt mean is better (in the
  scorer's direction), ties count one half. The rate is ``(wins + ties/2) / prompts`` with a Wilson score
  interval; the mean paired difference A − B gets a t interval like ``mean_ci``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

CONFIDENCE = 0.95


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (Newton steps on the CDF)."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"need 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -student_t_quantile(1 - p, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x: float, intervals: int = 2000) -> float:  # Simpson's rule on [0, x]; the pdf is smooth
        h = x / intervals
        total = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, intervals))
        return 0.5 + total * h / 3

    x = NormalDist().inv_cdf(p)
    for _ in range(50):
        step = (cdf(x) - p) / pdf(x)
        x -= step
        if abs(step) < 1e-10 * max(1.0, abs(x)):
            break
    return x


def t_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of ``values`` with a Student-t interval; no interval for fewer than 2 values."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion (``successes`` may be fractional: ties count one half)."""
    if n <= 0:
        raise ValueError("n must be positive")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def per_prompt_means(scores: dict[int, list[float]]) -> dict[int, float]:
    """prompt index -> mean score of its images."""
    return {p: sum(v) / len(v) for p, v in scores.items() if v}


def mean_ci(scores: dict[int, list[float]], confidence: float = CONFIDENCE) -> dict:
    """Mean over all images of one model and scorer, with an interval over prompts. ``scores``: prompt ->
    values."""
    values = [v for vs in scores.values() for v in vs]
    if not values:
        raise ValueError("no scores")
    _, low, high = t_interval(list(per_prompt_means(scores).values()), confidence)
    mean = sum(values) / len(values)
    # the interval is centred on the mean of prompt means; with equal images per prompt it is the same mean
    return {"mean": mean, "ci_low": low, "ci_high": high, "n_images": len(values), "n_prompts": len(scores)}


def win_rate(a: dict[int, list[float]], b: dict[int, list[float]], higher_is_better: bool = True,
             confidence: float = CONFIDENCE) -> dict:
    """Per-prompt win rate of A over B on the prompts both have scores for."""
    mean_a, mean_b = per_prompt_means(a), per_prompt_means(b)
    prompts = sorted(set(mean_a) & set(mean_b))
    if not prompts:
        raise ValueError("the two models share no scored prompt")
    sign = 1.0 if higher_is_better else -1.0
    diffs = [mean_a[p] - mean_b[p] for p in prompts]
    wins = sum(1 for d in diffs if sign * d > 0)
    ties = sum(1 for d in diffs if d == 0)
    losses = len(prompts) - wins - ties
    rate = (wins + 0.5 * ties) / len(prompts)
    low, high = wilson_interval(wins + 0.5 * ties, len(prompts), confidence)
    diff_mean, diff_low, diff_high = t_interval(diffs, confidence)
    return {
        "win_rate": rate,
        "ci_low": low,
        "ci_high": high,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "n_prompts": len(prompts),
        "mean_diff": diff_mean,
        "diff_ci_low": diff_low,
        "diff_ci_high": diff_high,
    }


def compute_stats(rows: Sequence[dict], models: Sequence[str], scorers: dict[str, bool],
                  confidence: float = CONFIDENCE) -> dict:
    """Statistics of a gallery's score rows.

    ``rows``: dicts with ``model``, ``prompt_index`` and ``scores`` (scorer -> value); ``models``: the models
    to compare, in order; ``scorers``: name -> higher_is_better. Returns ``{"means": {model: {scorer: ...}},
    "win_rates": [{"a", "b", "scorer", ...}]}`` for every ordered pair a before b.
    """
    table: dict[str, dict[str, dict[int, list[float]]]] = {m: {s: {} for s in scorers} for m in models}
    for row in rows:
        if row["model"] not in table:
            continue
        for scorer, value in row["scores"].items():
            if scorer in scorers and value is not None and math.isfinite(value):
                table[row["model"]][scorer].setdefault(row["prompt_index"], []).append(value)
    means = {m: {s: mean_ci(table[m][s], confidence) for s in scorers if table[m][s]} for m in models}
    pairs = []
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            for scorer, higher in scorers.items():
                if table[a][scorer] and table[b][scorer] and set(table[a][scorer]) & set(table[b][scorer]):
                    pairs.append({"a": a, "b": b, "scorer": scorer, "higher_is_better": higher,
                                  **win_rate(table[a][scorer], table[b][scorer], higher, confidence)})
    return {"confidence": confidence, "means": means, "win_rates": pairs}


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_tables(stats: dict) -> str:
    """Plain-text tables of the means and win rates (what the command prints)."""
    level = round(100 * stats["confidence"])
    lines = [f"{'model':<20} {'scorer':<24} {'mean':>10}  {level}% CI (over prompts)        {'images':>6}"]
    for model, by_scorer in stats["means"].items():
        for scorer, m in by_scorer.items():
            ci = f"[{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"
            lines.append(f"{model:<20} {scorer:<24} {m['mean']:>10.4f}  {ci:<30} {m['n_images']:>6}")
    if stats["win_rates"]:
        lines.append("")
        lines.append(
            f"{'A vs B':<32} {'scorer':<24} {'win rate A':>10}  {level}% CI          W/T/L      mean A-B"
        )
        for w in stats["win_rates"]:
            pair = f"{w['a']} vs {w['b']}"
            ci = f"[{w['ci_low']:.3f}, {w['ci_high']:.3f}]"
            wtl = f"{w['wins']}/{w['ties']}/{w['losses']}"
            lines.append(
                f"{pair:<32} {w['scorer']:<24} {w['win_rate']:>10.3f}  {ci:<16} {wtl:<10} "
                f"{w['mean_diff']:+.4f}"
            )
    return "\n".join(lines)
