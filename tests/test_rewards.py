"""Reward specs: the built-in task, a sequence-classification reward model (as a reward and as a
judge), the user's function; and one clear line for a reward that raises or returns garbage."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from learndyn.errors import LearndynError
from learndyn.judging import make_judge
from learndyn.rewards import RewardModel, load_reward

CHAT = [{"role": "user", "content": "What is 2 + 3? Reply with the number only."}]


@pytest.fixture
def reward_folder(tiny_tokenizer, tmp_path, one_thread):
    """A tiny random LlamaForSequenceClassification with one output, saved with a chat template."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path / "rm"
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tiny_tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}")
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_reward_model_scores_each_text_as_a_plain_forward_would(reward_folder):
    reward = load_reward(f"reward:{reward_folder}")
    prompts = [CHAT, CHAT, "Plain prompt:", CHAT]
    completions = ["5", "It is 5, surely, without any doubt at all", " six", [{"role": "assistant", "content": "5"}]]
    got = reward(prompts=prompts, completions=completions)
    rm = RewardModel(str(reward_folder))
    for prompt, completion, value in zip(prompts, completions, got):
        ids = rm.tokenizer(rm.text(prompt, completion), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            alone = rm.model(**ids).logits[0, 0].item()  # one text, no padding
        assert value == pytest.approx(alone, rel=1e-5, abs=1e-6)
    assert got[0] == pytest.approx(got[3], rel=1e-6)  # chat completion form reads the same as text
    from learndyn.rewards import reward_model

    assert reward_model(str(reward_folder)) is reward_model(str(reward_folder))  # loaded once (check, then train)
    assert rm.text(CHAT, "5") == "<|user|>What is 2 + 3? Reply with the number only.\n<|assistant|>5\n"


def test_reward_model_as_a_judge_agrees_with_its_scores(reward_folder):
    judge = make_judge(f"reward:{reward_folder}")
    rm = judge.rewards
    items = [(CHAT, "5", "6"), (CHAT, "six", "five"), (CHAT, "5", "5")]
    judged = judge.judge(items)
    for (prompt, a, b), j in zip(items, judged):
        diff = rm.scores([prompt], [a])[0] - rm.scores([prompt], [b])[0]
        assert j.score == pytest.approx(diff, abs=1e-6)
        assert j.verdict == ("tie" if abs(diff) <= 0 else "A" if diff > 0 else "B")
    assert judged[2].verdict == "tie" and judge.spec == f"reward:{reward_folder}"


def test_a_causal_lm_or_a_missing_model_is_refused_in_one_line(tiny_folder, tmp_path):
    with pytest.raises(LearndynError, match="LlamaForCausalLM, not a sequence classifier"):
        load_reward(f"reward:{tiny_folder}")
    with pytest.raises(LearndynError, match="cannot load its config"):
        load_reward(f"reward:{tmp_path / 'nowhere'}")


def raises(prompts, completions, **kwargs):
    return {}["missing"]


def nan(prompts, completions, **kwargs):
    return [math.nan] * len(completions)


def short(prompts, completions, **kwargs):
    return [1.0]


def test_a_failing_reward_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "my_bad_rewards", sys.modules[__name__])
    for name, message in (("raises", "raised KeyError: 'missing'"), ("nan", "reward nan for completion 0"),
                          ("short", "returned 1 rewards for 2 completions")):
        with pytest.raises(LearndynError, match=f"--reward my_bad_rewards:{name}.*{message}"):
            load_reward(f"my_bad_rewards:{name}")(prompts=["p", "p"], completions=["a", "b"])


def test_arithmetic_is_a_reward_spec():
    reward = load_reward("arithmetic")
    assert reward(prompts=[CHAT, CHAT], completions=["5", "6"], answer=["5", "5"]) == [1.0, 0.0]


def test_judge_command_takes_a_reward_model(reward_folder, tmp_path):
    import json

    from test_cli import learndyn, read_rows

    rows = [{"example_id": f"q{i}", "prompt": CHAT, "response": r} for i, r in enumerate(["5", "six", "5"])]
    other = [dict(row, response=r) for row, r in zip(rows, ["6", "five", "5"])]
    for name, content in (("a.jsonl", rows), ("b.jsonl", other)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in content))
    result = learndyn("judge", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--judge", f"reward:{reward_folder}",
                      "--out", str(tmp_path / "v.jsonl"))
    assert result.returncode == 0, result.stderr
    verdicts = read_rows(tmp_path / "v.jsonl")
    assert len(verdicts) == 3 and verdicts[2]["verdict"] == "tie"  # identical answers
    assert all(v["judge"] == f"reward:{reward_folder}" for v in verdicts)
