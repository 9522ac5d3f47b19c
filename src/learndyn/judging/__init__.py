"""Pairwise judging of two response files: which model answered better, and how sure are we?

    prompt.py    the pairwise question and the strict reading of a text answer
    judges.py    judges by name: `openai:MODEL` (any OpenAI-compatible endpoint), `local[:MODEL]`
                 (log p("A") vs log p("B") of a local chat model); how two orders combine
    verdicts.py  `judge_files`: both orders of every pair into a verdict file that is also the cache
    winrate.py   `win_rate`: counts, the win rate (ties half) and a seeded bootstrap interval

    judge = make_judge("openai:gpt-4o-mini", base_url=URL, rate_limit=2)
    result = judge_files("a.jsonl", "b.jsonl", judge, "verdicts.jsonl")
    win_rate(result.rows)   # {"wins": ..., "win_rate": 0.61, "ci_low": 0.52, "ci_high": 0.70, ...}

Nothing here imports torch until the local judge runs.
"""

from learndyn.judging.judges import JUDGES, Judge, Judgment, JudgingFailed, LocalJudge, OpenAIJudge, make_judge, vote
from learndyn.judging.prompt import pairwise_messages, parse_answer
from learndyn.judging.verdicts import Judged, Pair, judge_files, read_pairs, read_verdicts
from learndyn.judging.winrate import rate_text, win_rate

__all__ = ["JUDGES", "Judge", "Judged", "Judgment", "JudgingFailed", "LocalJudge", "OpenAIJudge", "Pair",
           "judge_files", "make_judge", "pairwise_messages", "parse_answer", "rate_text", "read_pairs", "read_verdicts",
           "vote", "win_rate"]
