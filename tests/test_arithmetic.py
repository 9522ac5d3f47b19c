"""The built-in verifiable task: seeded questions with correct answers, and TRL's reward signature."""

from __future__ import annotations

import re

from learndyn.arithmetic import final_number, questions, reward


def test_questions_are_seeded_correct_and_chat_formed():
    first, again, other = questions(60, seed=1), questions(60, seed=1), questions(60, seed=2)
    assert first == again and first != other
    assert len({q.example_id for q in first}) == 60
    for q in first:
        assert isinstance(q.prompt, list) and q.prompt[0]["role"] == "user"
        a, op, b = re.search(r"What is (\d+) ([+*-]) (\d+)\?", q.prompt[0]["content"]).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert q.chosen == q.extras["answer"] == str(expected) and expected >= 0
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
