"""Judges, verdict files and win rates: the HTTP judge against a judge server on 127.0.0.1 that the
tests script, the local judge on the tiny random Llama, and `learndyn judge` as users run it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import ChatServer
from test_cli import assert_one_error_line, learndyn

from learndyn.errors import LearndynError
from learndyn.judging import (
    Judgment,
    LocalJudge,
    judge_files,
    make_judge,
    pairwise_messages,
    parse_answer,
    rate_text,
    read_pairs,
    read_verdicts,
    vote,
    win_rate,
)

KEY = "sk-judge-test-0123456789secret"
PROMPTS = ["How do I boil an egg?", "What is a horseshoe?", "Name a prime number.", "Is tea healthy?"]


# ---------------------------------------------------------------- a judge server on loopback


class JudgeServer(ChatServer):
    """An OpenAI-compatible endpoint. `answer(first, second, n)` gets the two responses as shown
    (first = "Response A") and the request number, and returns the reply text, or (status, body)
    for an HTTP error. Requests are kept in `requests` as (first, second, headers)."""

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()
        super().__init__(self._respond)

    def _respond(self, request: dict) -> tuple[int, object]:
        text = request["body"]["messages"][-1]["content"]
        first = text.split("[Response A]\n", 1)[1].split("\n\n[Response B]\n", 1)[0]
        second = text.split("[Response B]\n", 1)[1].rsplit("\n\n", 1)[0]
        with self.lock:
            self.requests.append((first, second, request["headers"]))
            n = len(self.requests)
        reply = self.answer(first, second, n)
        return reply if isinstance(reply, tuple) else (200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})


def prefers_good(first: str, second: str, n: int) -> str:
    """A fair judge: the response that says "good" wins, wherever it is shown."""
    if ("good" in first) == ("good" in second):
        return "tie"
    return "After comparing both:\n**A**" if "good" in first else "Verdict: B."


@pytest.fixture
def serve():
    servers = []

    def start(answer):
        servers.append(JudgeServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("LEARNDYN_JUDGE_KEY", KEY)
    return "LEARNDYN_JUDGE_KEY"


def write_responses(path: Path, responses: list[str], prompts: list = PROMPTS) -> Path:
    rows = [{"example_id": f"q{i}", "prompt": p, "response": r} for i, (p, r) in enumerate(zip(prompts, responses))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    """File A answers well (says "good") on every prompt but the last; file B never does."""
    a = write_responses(tmp_path / "a.jsonl", ["good egg", "good horseshoe", "good prime", "plain tea"])
    b = write_responses(tmp_path / "b.jsonl", ["plain egg", "plain horseshoe", "plain prime", "plain tea"])
    return a, b


def api_judge(server, api_key, **options):
    return make_judge("openai:judge-model", base_url=server.url, api_key_env=api_key, backoff=0, **options)


# ---------------------------------------------------------------- parsing and combining


@pytest.mark.parametrize("text, verdict", [
    ("A", "A"), ("b", "B"), ("Tie.", "tie"), ("**A**", "A"), ("[[B]]", "B"), ("Answer: A", "A"),
    ("Final verdict: **B**", "B"), ("Response A", "A"), ("Let me think.\nB is more helpful.\n\nB", "B"),
    ("A is better", "unparsed"), ("I would pick B", "unparsed"), ("A\nbecause it is kind", "unparsed"),
    ("", "unparsed"), ("AB", "unparsed"), ("C", "unparsed"), ("tie or A", "unparsed"),
])
def test_answers_are_parsed_strictly_never_guessed(text, verdict):
    assert parse_answer(text) == verdict


@pytest.mark.parametrize("ab, ba, combined", [
    ("A", "A", "A"), ("B", "B", "B"), ("tie", "tie", "tie"), ("A", "B", "tie"), ("B", "A", "tie"),
    ("A", "tie", "A"), ("tie", "B", "B"), ("A", "unparsed", "unparsed"), ("unparsed", "unparsed", "unparsed"),
])
def test_vote_combines_orders_and_position_bias_is_never_a_win(ab, ba, combined):
    assert vote(Judgment(ab, ""), Judgment(ba, "")) == combined


def test_pairwise_prompt_shows_prompt_and_both_responses_in_order():
    text = pairwise_messages([{"role": "user", "content": "Hi?"}], "first one", "")[0]["content"]
    assert "[Prompt]\nHi?" in text and text.index("first one") < text.index("[Response B]")
    assert "(empty response)" in text and text.endswith("A, B or tie.")


# ---------------------------------------------------------------- the API judge


def test_fair_judge_asks_both_orders_and_records_everything(serve, api_key, files, tmp_path):
    server = serve(prefers_good)
    out = tmp_path / "verdicts.jsonl"
    result = judge_files(*files, api_judge(server, api_key), out, progress=None)
    assert len(server.requests) == 8 and result.reused == 0
    shown = {(first, second) for first, second, _ in server.requests}
    assert ("good egg", "plain egg") in shown and ("plain egg", "good egg") in shown  # both orders
    assert all(headers["Authorization"] == f"Bearer {KEY}" for _, _, headers in server.requests)
    rows = read_verdicts(out)
    assert rows == result.rows and [r["index"] for r in rows] == [0, 1, 2, 3]
    first = rows[0]
    assert first["example_id"] == "q0" and first["prompt"] == PROMPTS[0] and first["judge"] == "openai:judge-model"
    assert (first["response_a"], first["response_b"]) == ("good egg", "plain egg")
    assert first["raw_ab"] == "After comparing both:\n**A**" and first["raw_ba"] == "Verdict: B."
    assert (first["verdict_ab"], first["verdict_ba"], first["verdict"]) == ("A", "A", "A")  # relative to the files
    assert [r["verdict"] for r in rows] == ["A", "A", "A", "tie"]
    rate = win_rate(rows)
    assert (rate["wins"], rate["losses"], rate["ties"], rate["unparsed"], rate["inconsistent"]) == (3, 0, 1, 0, 0)
    assert rate["win_rate"] == pytest.approx(3.5 / 4)


def test_pure_position_bias_gives_ties_never_a_win(serve, api_key, files, tmp_path):
    server = serve(lambda first, second, n: "A")
    rows = judge_files(*files, api_judge(server, api_key), tmp_path / "v.jsonl", progress=None).rows
    assert {(r["verdict_ab"], r["verdict_ba"], r["verdict"]) for r in rows} == {("A", "B", "tie")}
    rate = win_rate(rows)
    assert rate["ties"] == rate["inconsistent"] == 4 and rate["win_rate"] == 0.5


def test_unreadable_answers_are_counted_as_unparsed(serve, api_key, files, tmp_path):
    server = serve(lambda first, second, n: "I cannot decide between them." if "egg" in first else "A")
    rows = judge_files(*files, api_judge(server, api_key), tmp_path / "v.jsonl", progress=None).rows
    assert rows[0]["verdict_ab"] == rows[0]["verdict_ba"] == rows[0]["verdict"] == "unparsed"
    assert rows[0]["raw_ab"] == "I cannot decide between them."
    rate = win_rate(rows)
    assert rate["unparsed"] == 1 and rate["pairs"] == 4 and rate["ties"] == 3 and rate["win_rate"] == 0.5


def test_server_errors_are_retried(serve, api_key, files, tmp_path):
    busy = (500, {"error": {"message": "busy"}})
    server = serve(lambda first, second, n: busy if n == 1 else prefers_good(first, second, n))
    rows = judge_files(*files, api_judge(server, api_key, workers=1), tmp_path / "v.jsonl", progress=None).rows
    assert len(server.requests) == 9 and [r["verdict"] for r in rows] == ["A", "A", "A", "tie"]


def test_failing_endpoint_keeps_finished_verdicts_and_a_rerun_finishes_without_paying_twice(
        serve, api_key, files, tmp_path):
    state = {"down": True}

    def flaky(first, second, n):
        if state["down"] and n > 4:  # two pairs go through, then the endpoint dies
            return 503, {"error": {"message": f"overloaded, key {KEY}"}}
        return prefers_good(first, second, n)

    server = serve(flaky)
    out = tmp_path / "v.jsonl"
    judge = api_judge(server, api_key, workers=1, max_retries=1)
    with pytest.raises(LearndynError) as err:
        judge_files(*files, judge, out, progress=None)
    message = str(err.value)
    assert "HTTP 503" in message and "kept 2 of 4 verdicts" in message and "rerun" in message
    assert "\n" not in message and KEY not in message
    assert [r["index"] for r in read_verdicts(out)] == [0, 1]
    state["down"] = False
    before = len(server.requests)
    result = judge_files(*files, judge, out, progress=None)
    assert len(server.requests) - before == 4 and result.reused == 2  # only pairs 2 and 3 asked again
    clean = judge_files(*files, api_judge(serve(prefers_good), api_key), tmp_path / "clean.jsonl", progress=None)
    assert read_verdicts(out) == clean.rows
    before = len(server.requests)
    assert judge_files(*files, judge, out, progress=None).reused == 4 and len(server.requests) == before


def test_a_row_cut_short_by_a_kill_is_judged_again(serve, api_key, files, tmp_path):
    server = serve(prefers_good)
    out = tmp_path / "v.jsonl"
    judge_files(*files, api_judge(server, api_key), out, progress=None)
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:25], encoding="utf-8")
    before = len(server.requests)
    result = judge_files(*files, api_judge(server, api_key), out, progress=None)
    assert result.reused == 2 and len(server.requests) - before == 4
    assert [r["index"] for r in read_verdicts(out)] == [0, 1, 2, 3]


def test_verdicts_of_another_judge_or_other_responses_are_not_reused(serve, api_key, files, tmp_path):
    server = serve(prefers_good)
    out = tmp_path / "v.jsonl"
    judge_files(*files, api_judge(server, api_key), out, progress=None)
    other = make_judge("openai:other-model", base_url=server.url, api_key_env=api_key)
    with pytest.raises(LearndynError, match="judge 'openai:judge-model', not 'openai:other-model'"):
        judge_files(*files, other, out, progress=None)
    changed = write_responses(files[1].parent / "b2.jsonl",
                              ["plain egg", "better horseshoe", "plain prime", "plain tea"])
    with pytest.raises(LearndynError, match="pair 1 compares other responses"):
        judge_files(files[0], changed, api_judge(server, api_key), out, progress=None)
    result = judge_files(files[0], changed, api_judge(server, api_key), out, overwrite=True, progress=None)
    assert result.reused == 0 and len(read_verdicts(out)) == 4


def test_max_pairs_judges_a_prefix(serve, api_key, files, tmp_path):
    server = serve(prefers_good)
    result = judge_files(*files, api_judge(server, api_key), tmp_path / "v.jsonl", max_pairs=2, progress=None)
    assert len(result.rows) == 2 and len(server.requests) == 4


def test_missing_key_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.delenv("LEARNDYN_NO_JUDGE_KEY", raising=False)
    with pytest.raises(LearndynError) as err:
        make_judge("openai:m", api_key_env="LEARNDYN_NO_JUDGE_KEY")
    assert "LEARNDYN_NO_JUDGE_KEY" in str(err.value) and "\n" not in str(err.value)


def test_key_never_reaches_the_verdict_file_or_errors(serve, api_key, files, tmp_path):
    server = serve(lambda first, second, n: f"Your key {KEY} works.\nA")
    out = tmp_path / "v.jsonl"
    judge_files(*files, api_judge(server, api_key), out, progress=None)
    assert KEY not in out.read_text(encoding="utf-8") and "***" in out.read_text(encoding="utf-8")
    judge = api_judge(serve(lambda *_: (401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})), api_key)
    with pytest.raises(LearndynError) as err:
        judge_files(*files, judge, tmp_path / "w.jsonl", progress=None)
    assert "HTTP 401" in str(err.value) and KEY not in str(err.value) and KEY not in repr(judge)


def test_a_redirecting_endpoint_never_hands_the_key_to_another_host(key_trap, api_key, files, tmp_path):
    redirect, trap = key_trap
    origin = redirect(302)
    judge = make_judge("openai:judge-model", base_url=origin.url, api_key_env=api_key, timeout=5, backoff=0, workers=1)
    out = tmp_path / "v.jsonl"
    with pytest.raises(LearndynError) as err:
        judge_files(*files, judge, out, progress=None)
    assert trap.requests == []  # before the fix: a GET with "Authorization: Bearer <key>", answered "A"
    assert f"HTTP 302 redirect to {trap.url.removesuffix('/v1')}," in str(err.value) and KEY not in str(err.value)
    assert not out.exists() or KEY not in out.read_text(encoding="utf-8")


def test_rate_limit_spaces_requests(serve, api_key, files, tmp_path):
    server = serve(prefers_good)
    start = time.monotonic()
    judge_files(*files, api_judge(server, api_key, rate_limit=20), tmp_path / "v.jsonl", progress=None)
    assert time.monotonic() - start >= 7 / 20 - 0.02  # 8 requests: 7 intervals of 1/20 s, even with 4 workers


def test_unknown_judges_list_the_valid_forms():
    with pytest.raises(LearndynError, match="unknown judge 'gpt4'; valid: openai:MODEL, local"):
        make_judge("gpt4")
    with pytest.raises(LearndynError, match="needs a model name"):
        make_judge("openai")
    with pytest.raises(LearndynError, match="unknown option.*colour"):
        make_judge("local", colour="red")


# ---------------------------------------------------------------- response files


def test_mismatched_prompts_are_refused_naming_the_first_mismatch(tmp_path, files):
    a, _ = files
    other = PROMPTS[:2] + ["Name an even number.", "Is coffee healthy?"]
    b = write_responses(tmp_path / "b.jsonl", ["x"] * 4, other)
    with pytest.raises(LearndynError) as err:
        read_pairs(a, b)
    message = str(err.value)
    assert f"{a}:3 and {b}:3" in message and "pair 2" in message
    assert "'Name a prime number.'" in message and "'Name an even number.'" in message and "\n" not in message
    short = write_responses(tmp_path / "short.jsonl", ["x"] * 3, PROMPTS[:3])
    with pytest.raises(LearndynError, match=f"{a}:4: no partner row in {short}"):
        read_pairs(a, short)


def test_chat_prompts_pair_up_and_bad_rows_name_the_line(tmp_path):
    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    a = write_responses(tmp_path / "a.jsonl", ["1", "2", "3", ""], chat)
    b = write_responses(tmp_path / "b.jsonl", ["5", "6", "7", "8"], chat)
    pairs = read_pairs(a, b)
    assert pairs[3].prompt == chat[3] and pairs[3].response_a == ""  # an empty answer is still an answer
    b.write_text(b.read_text() + json.dumps({"prompt": "extra"}) + "\n")
    with pytest.raises(LearndynError, match=f"{b}:5: missing field 'response'"):
        read_pairs(a, b)


# ---------------------------------------------------------------- win rates


def test_win_rate_all_wins_is_one_but_its_interval_is_not_a_point():
    rate = win_rate(["A"] * 20)
    assert rate["win_rate"] == 1.0 and rate["ci_high"] == 1.0
    assert rate["ci_low"] == pytest.approx(20 / (20 + 1.959964**2))  # Wilson's lower bound at p = 1: n / (n + z²)
    assert (rate["boot_low"], rate["boot_high"]) == (1.0, 1.0)  # the bootstrap collapses; the reported interval does not
    none = win_rate(["B"] * 5)
    assert none["win_rate"] == 0.0 and none["ci_low"] == 0.0 and none["ci_high"] == pytest.approx(1 - 5 / (5 + 1.959964**2))


def test_wilson_interval_covers_the_true_rate_as_promised():
    """Coverage over 2000 simulated judges of true win rate 0.8 with 20 pairs each: about 95%."""
    import numpy as np

    rng = np.random.default_rng(0)
    covered = 0
    for wins in rng.binomial(20, 0.8, size=2000):
        rate = win_rate(["A"] * int(wins) + ["B"] * (20 - int(wins)))
        covered += rate["ci_low"] <= 0.8 <= rate["ci_high"]
    assert 0.93 <= covered / 2000 <= 0.99


def test_win_rate_balanced_is_a_half_with_an_interval_around_it():
    rate = win_rate(["A", "B"] * 100)
    assert rate["win_rate"] == 0.5 and 0.41 < rate["ci_low"] < 0.46 and 0.54 < rate["ci_high"] < 0.59
    assert win_rate(["A", "B"] * 100) == rate  # seeded


def test_win_rate_counts_ties_half_and_leaves_unparsed_out():
    rate = win_rate(["A", "A", "tie", "B", "unparsed", "unparsed"])
    assert (rate["pairs"], rate["wins"], rate["losses"], rate["ties"], rate["unparsed"]) == (6, 2, 1, 1, 2)
    assert rate["win_rate"] == pytest.approx(2.5 / 4)
    empty = win_rate(["unparsed"])
    assert empty["win_rate"] is None and empty["ci_low"] is None
    assert rate_text(empty) == "n/a" and rate_text(win_rate(["A"] * 3)) == "1.000 [0.439, 1.000]"
    with pytest.raises(LearndynError, match="unknown verdict 'C'"):
        win_rate(["C"])


def test_bootstrap_interval_equals_resampling_pairs():
    import numpy as np

    verdicts = ["A"] * 30 + ["tie"] * 10 + ["B"] * 20
    scores = np.array([{"A": 1.0, "tie": 0.5, "B": 0.0}[v] for v in verdicts])
    rng = np.random.default_rng(123)
    plain = scores[rng.integers(0, len(scores), size=(4000, len(scores)))].mean(axis=1)
    rate = win_rate(verdicts, n_resamples=4000)
    assert rate["ci_low"] == pytest.approx(np.percentile(plain, 2.5), abs=0.015)
    assert rate["ci_high"] == pytest.approx(np.percentile(plain, 97.5), abs=0.015)


# ---------------------------------------------------------------- the local judge


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])  # GPT-2 has absolute positions
def test_local_judge_batches_and_is_deterministic(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    items = [(p, f"Answer {i}.", f"Other answer {i}, longer {'x' * i}.") for i, p in enumerate(PROMPTS)]
    items.append(([{"role": "user", "content": "Hi"}], "", "Hello!"))
    one = LocalJudge(model, tokenizer, batch_size=1).judge(items)
    batched = LocalJudge(model, tokenizer, batch_size=3).judge(items)
    assert all(j.verdict in ("A", "B", "tie") and j.raw.startswith("logp(A)=") for j in batched)
    for x, y in zip(one, batched):  # left padding with position ids: batch-size invariant
        assert x.score == pytest.approx(y.score, abs=1e-4)
    assert LocalJudge(model, tokenizer, batch_size=3).judge(items) == batched
    wide = LocalJudge(model, tokenizer, tie_margin=100.0).judge(items)
    assert {j.verdict for j in wide} == {"tie"}


def test_local_judge_cancels_a_constant_position_bias(tiny_llama):
    judge = LocalJudge(*tiny_llama, tie_margin=0.1)
    bias, quality = 3.0, 0.5  # log-odds toward position A, and toward file A's response
    ab = Judgment("A", "", bias + quality)  # file A shown first
    ba = Judgment("B", "", quality - bias)  # file A shown second, already relative to the files
    assert judge.combine(ab, ba) == "A" and vote(ab, ba) == "tie"
    assert judge.combine(Judgment("A", "", 3.0), Judgment("B", "", -2.95)) == "tie"


def test_local_judge_files_and_lazy_loading(tiny_llama, files, tmp_path):
    model, tokenizer = tiny_llama
    out = tmp_path / "v.jsonl"
    judge = LocalJudge(model, tokenizer, model_name="tiny-llama", batch_size=4)
    assert judge.spec == "local:tiny-llama"
    rows = judge_files(*files, judge, out, progress=None).rows
    for row in rows:
        assert row["verdict_ab"] in ("A", "B", "tie") and row["verdict_ba"] in ("A", "B", "tie")
        assert isinstance(row["score_ab"], float) and row["raw_ba"].startswith("logp(A)=")
        assert row["verdict"] == judge.combine(Judgment(row["verdict_ab"], "", row["score_ab"]),
                                               Judgment(row["verdict_ba"], "", row["score_ba"]))
    tie = rows[3]  # identical responses: the two orders are the same question, so they cancel exactly
    assert tie["score_ab"] == pytest.approx(-tie["score_ba"], abs=1e-5) and tie["verdict"] == "tie"
    # A rerun with everything cached never loads the model: here the model does not even exist.
    lazy = make_judge("local:tiny-llama")
    assert judge_files(*files, lazy, out, progress=None).reused == 4 and lazy.model is None
    assert all(row["tie_margin"] == 0.02 for row in read_verdicts(out))
    with pytest.raises(LearndynError, match="tie margin 0.02, not 0.5"):
        judge_files(*files, make_judge("local:tiny-llama", tie_margin=0.5), out, progress=None)


def test_local_judge_needs_a_chat_template(tiny_llama):
    model, tokenizer = tiny_llama
    tokenizer.chat_template = None
    with pytest.raises(LearndynError, match="chat_template"):
        LocalJudge(model, tokenizer)


# ---------------------------------------------------------------- `learndyn judge`


def test_cli_judge_prints_counts_and_win_rate(serve, files, tmp_path):
    server = serve(prefers_good)
    out = tmp_path / "verdicts.jsonl"
    args = ("judge", str(files[0]), str(files[1]), "--judge", "openai:judge-model", "--base-url", server.url,
            "--out", str(out), "--rate-limit", "100")
    result = learndyn(*args, OPENAI_API_KEY=KEY)
    assert result.returncode == 0, result.stderr
    assert "4 pairs judged by openai:judge-model in both orders (4 now, 0 reused)" in result.stdout
    assert "A wins 3, B wins 0, ties 1, unparsed 0" in result.stdout
    assert "win rate of A: 0.875, 95% Wilson interval [0.396, 0.987]" in result.stdout
    assert len(read_verdicts(out)) == 4 and KEY not in out.read_text() + result.stdout + result.stderr
    again = learndyn(*args, OPENAI_API_KEY=KEY)
    assert "(0 now, 4 reused)" in again.stdout and len(server.requests) == 8
    line = assert_one_error_line(learndyn(*args, "--api-key-env", "LEARNDYN_NO_JUDGE_KEY"))
    assert "LEARNDYN_NO_JUDGE_KEY" in line


def test_cli_judge_bad_input_is_one_line(files, tmp_path):
    a, _ = files
    b = write_responses(tmp_path / "b2.jsonl", ["x"] * 4, ["Other?"] + PROMPTS[1:])
    line = assert_one_error_line(learndyn("judge", str(a), str(b), "--judge", "local", "--out", str(tmp_path / "v.jsonl")))
    assert f"{a}:1 and {b}:1" in line and "prompts of pair 0 differ" in line
    assert "valid: openai:MODEL, local[:MODEL]" in assert_one_error_line(
        learndyn("judge", str(a), str(b), "--judge", "bard", "--out", str(tmp_path / "v.jsonl")))


def test_parallel_failure_keeps_whatever_finished_and_resume_restores_pair_order(serve, api_key, files, tmp_path):
    state = {"down": True}

    def horseshoe_fails(first, second, n):
        if state["down"] and "horseshoe" in first:
            return 500, {"error": {"message": "down"}}
        return prefers_good(first, second, n)

    server = serve(horseshoe_fails)
    out = tmp_path / "v.jsonl"
    judge = api_judge(server, api_key, workers=4, max_retries=0)
    with pytest.raises(LearndynError, match="of 4 verdicts"):
        judge_files(*files, judge, out, progress=None)
    assert 1 not in [r["index"] for r in read_verdicts(out)]
    state["down"] = False
    judge_files(*files, judge, out, progress=None)
    clean = judge_files(*files, api_judge(serve(prefers_good), api_key), tmp_path / "clean.jsonl", progress=None)
    assert read_verdicts(out) == clean.rows  # pair order restored
