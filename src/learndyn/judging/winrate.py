"""Win rates of pairwise verdicts, with a bootstrap interval over pairs.

The win rate of A is (wins + ½·ties) / (wins + losses + ties): a tie is half a win for each side, so
two equally good files score 0.5 whether the judge calls their pairs ties or splits them. Unparsed
pairs are left out of the rate (and counted), since nothing is known about them. The interval is the
percentile bootstrap over pairs: resampling pairs with replacement is drawing multinomial counts of
wins, ties and losses with the observed frequencies, which is what is done (cheap for any number of
pairs), from a seeded generator so that a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
        "win_rate": None, "ci_low": None, "ci_high": None,
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
        result["ci_low"], result["ci_high"] = float(low), float(high)
    return result


def rate_text(rate: Mapping[str, Any]) -> str:
    """A `win_rate` result as "0.531 [0.312, 0.719]" (n/a without a parsed verdict), for tables."""
    if rate["win_rate"] is None:
        return "n/a"
    return f"{rate['win_rate']:.3f} [{rate['ci_low']:.3f}, {rate['ci_high']:.3f}]"
