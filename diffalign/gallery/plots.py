"""Matplotlib figures of a gallery: score distributions per scorer, win rates with their intervals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_plots(out: Path, rows: Sequence[dict], stats: dict, models: Sequence[str],
                scorers: Sequence[str]) -> list[str]:
    """Write ``plots/scores_<scorer>.png`` and ``plots/win_rates.png``; return their paths relative to
    ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    for scorer in scorers:
        data = [
            [r["scores"][scorer] for r in rows if r["model"] == m and scorer in r["scores"]] for m in models
        ]
        if not any(data):
            continue
        fig, ax = plt.subplots(figsize=(max(3.8, 1.6 + 1.3 * len(models)), 3.4), dpi=110)
        present = [(m, d) for m, d in zip(models, data, strict=True) if d]
        positions = range(1, len(present) + 1)
        parts = ax.violinplot(
            [d for _, d in present], positions=positions, showmeans=False, showextrema=False
        )
        for i, body in enumerate(parts["bodies"]):
            body.set_facecolor(COLORS[i % len(COLORS)])
            body.set_alpha(0.35)
        for i, (m, d) in enumerate(present):
            x = [i + 1 + 0.06 * ((j % 7) - 3) for j in range(len(d))]
            ax.scatter(x, d, s=9, color=COLORS[i % len(COLORS)], alpha=0.8, linewidths=0)
            mean = stats["means"].get(m, {}).get(scorer)
            if mean:
                low, high = mean["ci_low"], mean["ci_high"]
                err = None if low is None else [[mean["mean"] - low], [high - mean["mean"]]]
                ax.errorbar([i + 1.22], [mean["mean"]], yerr=err, fmt="o", color="black", capsize=3, ms=4)
        ax.set_xticks(list(positions), [m for m, _ in present], rotation=15 if len(present) > 3 else 0)
        ax.set_ylabel(scorer)
        ax.set_title(f"{scorer}: images, mean ± 95% CI", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        name = f"plots/scores_{_safe(scorer)}.png"
        fig.savefig(out / name)
        plt.close(fig)
        written.append(name)

    pairs = stats["win_rates"]
    if pairs:
        fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.42 * len(pairs)), dpi=110)
        labels = [f"{w['a']} vs {w['b']} · {w['scorer']}" for w in pairs]
        rates = [w["win_rate"] for w in pairs]
        err = [[w["win_rate"] - w["ci_low"] for w in pairs], [w["ci_high"] - w["win_rate"] for w in pairs]]
        y = list(range(len(pairs)))[::-1]
        colors = [COLORS[scorers.index(w["scorer"]) % len(COLORS)] if w["scorer"] in scorers else COLORS[0]
                  for w in pairs]
        ax.barh(y, rates, xerr=err, color=colors, alpha=0.8, capsize=3)
        ax.axvline(0.5, color="black", lw=0.8, ls="--")
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("per-prompt win rate of A (ties count ½), 95% Wilson interval")
        fig.tight_layout()
        fig.savefig(out / "plots/win_rates.png")
        plt.close(fig)
        written.append("plots/win_rates.png")
    return written
