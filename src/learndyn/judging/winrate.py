"""Win rates of pairwise verdicts, with a Wilson interval and a bootstrap interval over pairs.

The win rate of A is (wins + ½·ties) / (wins + losses + ties): a tie is half a win for each side, so
two equally good files score 0.5 whether the judge calls their pairs ties or splits them. Unparsed
pairs are left out of the rate (and counted), since nothing is known about them.

`ci_low`/`ci_high` is the Wilson score interval of that rate over the n judged pairs. Unlike the
percentile bootstrap, it does not collapse to a point when every pair went one way (20 wins of 20
give [0.839, 1], not [1, 1]: twenty pairs cannot prove a rate of exactly 1); with ties it is a little
wider than it needs to be, which errs on the safe side. `boot_low`/`boot_high` is the percentile
bootstrap over pairs (drawing multinomial counts of wins, ties and losses with the observed
frequencies, from a seeded generator so that a report is reproducible), kept beside it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from statistics import NormalDist
from typing import Any

from learndyn.errors import LearndynError

__all__ = ["rate_text", "win_rate"]

_VERDICTS = ("A", "B", "tie", "unparsed")


def win_rate(
    verdicts: Iterable[str | Mapping[str, Any]],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Counts and the win rate of A (ties half, unparsed excluded) with a bootstrap interval.

    `verdicts` are "A"/"B"/"tie"/"unparsed" strings or verdict rows (their `verdict` field; rows
    also give `inconsistent`: pairs whose two orders named opposite winners, a sign of position
    bias). With no parsed verdict the rate and interval are None.
    """
    if n_resamples < 1 or not 0 < confidence < 1:
        raise LearndynError("win_rate: need n_resamples >= 1 and 0 < confidence < 1")
    counts = dict.fromkeys(_VERDICTS, 0)
    inconsistent = 0
    for item in verdicts:
        verdict = item["verdict"] if isinstance(item, Mapping) else item
        if verdict not in counts:
            raise LearndynError(f"unknown verdict {verdict!r}; valid: {', '.join(_VERDICTS)}")
        counts[verdict] += 1
        if isinstance(item, Mapping) and {item.get("verdict_ab"), item.get("verdict_ba")} == {"A", "B"}:
            inconsistent += 1
    wins, losses, ties = counts["A"], counts["B"], counts["tie"]
    judged = wins + losses + ties
    result: dict[str, Any] = {
        "pairs": judged + counts["unparsed"], "wins": wins, "losses": losses, "ties": ties,
        "unparsed": counts["unparsed"], "inconsistent": inconsistent,
        "win_rate": None, "ci_low": None, "ci_high": None, "boot_low": None, "boot_high": None,
        "confidence": confidence, "n_resamples": n_resamples, "seed": seed,
    }
    if judged:
        import numpy as np

        result["win_rate"] = (wins + 0.5 * ties) / judged
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(judged, [wins / judged, losses / judged, ties / judged], size=n_resamples)  # (R, 3)
        rates = (draws[:, 0] + 0.5 * draws[:, 2]) / judged  # (R,)
        tail = (1 - confidence) / 2 * 100
        low, high = np.percentile(rates, [tail, 100 - tail])
        result["boot_low"], result["boot_high"] = float(low), float(high)
        result["ci_low"], result["ci_high"] = wilson(result["win_rate"], judged, confidence)
    return result


def wilson(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `rate` observed over `n` trials."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_text(rate: Mapping[str, Any]) -> str:
    """A `win_rate` result as "0.531 [0.312, 0.719]" (n/a without a parsed verdict), for tables."""
    if rate["win_rate"] is None:
        return "n/a"
    return f"{rate['win_rate']:.3f} [{rate['ci_low']:.3f}, {rate['ci_high']:.3f}]"
