"""The built-in verifiable task: seeded questions with correct answers, and TRL's reward signature."""

from __future__ import annotations

import re

import pytest

from learndyn.arithmetic import final_number, questions, reward
from learndyn.errors import LearndynError


def test_questions_are_seeded_correct_and_chat_formed():
    first, again, other = questions(60, seed=1), questions(60, seed=1), questions(60, seed=2)
    assert first == again and first != other
    assert len({q.example_id for q in first}) == 60
    for q in first:
        assert isinstance(q.prompt, list) and q.prompt[0]["role"] == "user"
        a, op, b = re.search(r"What is (\d+) ([+*-]) (\d+)\?", q.prompt[0]["content"]).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert q.chosen == q.columns["answer"] == str(expected) and expected >= 0
        assert q.rejected != q.chosen and final_number(q.rejected) is not None
    assert {q.prompt[0]["content"].split()[3] for q in first} == {"+", "-", "*"}


def test_reward_checks_the_last_number_against_the_answer():
    prompts = [[{"role": "user", "content": "What is 7 * 8? Reply with the number only."}]] * 6
    completions = ["56", "7 * 8 = 56.", "It is 55", "no idea", "1,056 or maybe 56", "56 ... no, 57"]
    assert reward(prompts, completions, answer=["56"] * 6) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert reward(prompts, completions) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]  # the answer worked out from the prompt
    chat = [[{"role": "assistant", "content": "The answer is 56"}]]
    assert reward(prompts[:1], chat, answer=["56"], trainer_state=None, completion_ids=[[1]]) == [1.0]  # TRL's kwargs
    assert final_number("minus -3 and 1,200.5") == 1200.5 and final_number("none") is None


def test_chosen_semantic_rewords_the_correct_answer_and_earns_full_reward():
    qs = questions(60, seed=1)
    semantic = [q.extras["chosen_semantic"] for q in qs]
    assert all(s != q.chosen and final_number(s) == float(q.chosen) for s, q in zip(semantic, qs))
    assert len({s.replace(q.chosen, "N") for s, q in zip(semantic, qs)}) > 2  # several wordings, seeded
    assert [q.extras for q in questions(60, seed=1)] == [q.extras for q in qs]
    prompts, answers = [q.prompt for q in qs], [q.columns["answer"] for q in qs]
    assert reward(prompts, semantic, answer=answers) == [1.0] * 60
    chat = [[{"role": "assistant", "content": s}] for s in semantic]  # as TRL hands chat completions over
    assert reward(prompts, chat, answer=answers) == [1.0] * 60
    assert reward(prompts, [q.rejected for q in qs], answer=answers) == [0.0] * 60


def test_task_is_a_data_source_with_ranges_and_splits():
    from learndyn.data import load_preferences

    head = load_preferences("arithmetic[0:8]")
    assert head == questions(8, seed=0)
    assert load_preferences("arithmetic[4:8]") == head[4:]  # a range keeps the questions' identity
    test = load_preferences("arithmetic:test[:8]")
    assert not {q.example_id for q in test} & {q.example_id for q in head}
    assert all(q.columns["answer"] == q.chosen for q in test)
    with pytest.raises(LearndynError, match="no split 'dev'"):
        load_preferences("arithmetic:dev")
