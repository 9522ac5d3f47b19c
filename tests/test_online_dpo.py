"""On-policy DPO (`train dpo --on-policy`): samples from the current policy, ranked by a reward
function or a judge, trained with the probes tracked as in off-policy DPO."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import ChatServer, completion
from test_training import probes  # noqa: F401  (the probe-set fixture)

from learndyn.data import load_preferences, render_prompt
from learndyn.errors import LearndynError
from learndyn.judging import Judgment, LocalJudge, vote
from learndyn.probes.files import write_probes
from learndyn.training.online import JudgeReward, load_reward
from learndyn.training.recipes import TrainSettings, build_trainer, load_trainable, train
from learndyn.training.runs import read_config, read_metrics, write_config

CALLS: list[dict] = []  # what `record_and_prefer_short` was called with, one entry per call
NOT_CALLABLE = 42


def record_and_prefer_short(prompts, completions, completion_ids, trainer_state, **kwargs):
    """A reward function (TRL's signature) that keeps its arguments: shorter samples are better."""
    CALLS.append({"prompts": prompts, "completions": completions, "step": trainer_state.global_step})
    return [-len(c[0]["content"]) for c in completions]


def wrong_length(prompts, completions, **kwargs):
    return [0.0]


@pytest.fixture
def settings(tiny_folder, probes, tmp_path):  # noqa: F811
    """On-policy DPO on the tiny model: 4 prompts, 2 per step, 6 sampled tokens."""
    write_probes(probes, tmp_path / "p.jsonl")
    return dict(phase="dpo", data="example", probes=str(tmp_path / "p.jsonl"), out=str(tmp_path / "run"),
                model=str(tiny_folder), limit=4, batch_size=2, epochs=1, every=1, learning_rate=1e-2, max_length=256,
                on_policy=True, max_new_tokens=6)


def _greedy(model, tokenizer, prompts: list, max_new_tokens: int) -> list[str]:
    """The model's greedy answers, batched and left-padded as TRL samples them."""
    import torch

    texts = [render_prompt(p, tokenizer) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    answers = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def test_reward_ranks_two_fresh_samples_per_prompt_from_the_policy(settings, tiny_llama):
    CALLS.clear()
    # temperature near 0: sampling becomes greedy decoding, so the policy's samples can be recomputed
    run = train(TrainSettings(**settings, reward="test_online_dpo:record_and_prefer_short", temperature=1e-5))
    assert [call["step"] for call in CALLS] == [0, 1]  # fresh samples at every optimizer step
    data_prompts = [p.prompt for p in load_preferences("example", limit=4)]
    for call in CALLS:
        prompts, completions = call["prompts"], call["completions"]
        assert len(prompts) == len(completions) == 4 and prompts[:2] == prompts[2:]  # 2 samples per prompt
        assert all(p in data_prompts for p in prompts)
    model, tokenizer = tiny_llama  # the starting weights (tiny_folder saved them)
    first = CALLS[0]
    greedy = _greedy(model, tokenizer, first["prompts"][:2], settings["max_new_tokens"])
    assert all(greedy) and [c[0]["content"] for c in first["completions"]] == greedy * 2  # the starting policy

    config = read_config(run)
    assert config["on_policy"] is True and config["reward"] == "test_online_dpo:record_and_prefer_short"
    assert config["max_new_tokens"] == 6 and config["temperature"] == 1e-5
    assert (run / "checkpoints" / "final" / "config.json").is_file()
    metrics = read_metrics(run)
    assert sorted(set(metrics["step"])) == [0, 1, 2] and set(metrics["phase"]) == {"dpo"}
    chosen = metrics[metrics.response_type == "chosen"].groupby("step")["logp_sum"].mean()
    assert chosen[2] != chosen[0]  # the probes were scored on the model being trained


def test_judge_ranks_pairs_and_its_tally_reaches_the_training_logs(settings, tiny_folder, tmp_path):
    values = TrainSettings(**settings, judge=f"local:{tiny_folder}")
    model, tokenizer = load_trainable(str(tiny_folder), "cpu")
    prefs = load_preferences("example", limit=4, need_rejected=False)
    trainer = build_trainer(values, model, tokenizer, prefs, tmp_path / "run")
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "judge/pairs" in entry]
    assert [entry["judge/pairs"] for entry in logged] == [2.0, 4.0]  # cumulative: 2 pairs per step
    last = logged[-1]
    assert sum(last[f"judge/{k}"] for k in ("first", "second", "ties", "unparsed")) == 4.0
    assert trainer.reward_funcs[0].tally["pairs"] == 4


class ScriptedJudge:
    """A judge whose verdict on each presentation is scripted by `decide(first, second)`."""

    spec, pairs_per_call = "scripted", 8
    combine = staticmethod(vote)

    def __init__(self, decide):
        self.decide, self.calls = decide, []

    def judge(self, items):
        self.calls.append(list(items))
        return [Judgment(self.decide(first, second), "") for _, first, second in items]


def test_judge_reward_picks_the_winner_of_both_orders_and_the_first_sample_on_a_tie():
    fair = ScriptedJudge(lambda first, second: "A" if "good" in first else "B")
    reward = JudgeReward(fair)
    assert reward.winners(["q", "q"], ["good", "bad"], ["bad", "good"]) == [0, 1]
    assert fair.calls == [[("q", "good", "bad"), ("q", "bad", "good"), ("q", "bad", "good"), ("q", "good", "bad")]]

    biased = JudgeReward(ScriptedJudge(lambda first, second: "A"))  # pure position bias: a tie by votes
    assert biased.winners(["q"], ["bad"], ["good"]) == [0]
    unsure = JudgeReward(ScriptedJudge(lambda first, second: "unparsed" if first == "good" else "B"))
    assert unsure.winners(["q"], ["bad"], ["good"]) == [0]  # unparsed: the first sample, like a tie
    assert biased.tally == {"pairs": 1, "first": 0, "second": 0, "ties": 1, "unparsed": 0}
    assert unsure.tally["unparsed"] == 1

    # TRL's layout: every prompt's first sample, then every second one; chat completions as messages
    chat = [[{"role": "assistant", "content": text}] for text in ("good", "bad", "bad", "good")]
    assert reward(prompts=["p", "q", "p", "q"], completions=chat) == [1.0, 0.0, 0.0, 1.0]
    assert reward.tally == {"pairs": 4, "first": 2, "second": 2, "ties": 0, "unparsed": 0}


def test_judge_reward_reads_the_local_judges_log_odds_relative_to_each_sample():
    class ScoredJudge(LocalJudge):  # constant position bias 0.8 toward "A", +-0.1 for the better response
        def judge(self, items):
            return [Judgment("A", "", 0.8 + (0.1 if first == "good" else -0.1)) for _, first, _ in items]

    reward = JudgeReward(ScoredJudge(model_name="unused"))  # the model is never loaded
    assert reward.winners(["q", "q"], ["good", "bad"], ["bad", "good"]) == [0, 1]  # bias cancels


def test_bad_on_policy_settings_are_one_line_errors(settings):
    cases = {
        "on_policy applies to DPO only": dict(phase="sft"),
        "--reward foo: expected arithmetic, reward:MODEL or MODULE:FUNCTION": dict(reward="foo"),
        "cannot import no_such_module_learndyn": dict(reward="no_such_module_learndyn:f"),
        "has no attribute missing": dict(reward="test_online_dpo:missing"),
        "is a int, not a function": dict(reward="test_online_dpo:NOT_CALLABLE"),
        "unknown judge 'gpt4'": dict(judge="gpt4"),
        "does not support loss 'hinge'; valid: sigmoid, ipo": dict(loss="hinge"),
        "add --on-policy": dict(on_policy=False, reward="test_online_dpo:record_and_prefer_short"),
        "positive temperature": dict(temperature=0.0),
    }
    for message, change in cases.items():
        with pytest.raises(LearndynError, match=message) as caught:
            TrainSettings(**{**settings, **change})
        assert "\n" not in str(caught.value)
    assert not Path(settings["out"]).exists()  # refused before the run folder was touched
    with pytest.raises(LearndynError, match="returned 1 rewards for 2 completions"):
        load_reward("test_online_dpo:wrong_length")(prompts=["p", "p"], completions=["a", "b"])


def test_openai_judge_endpoint_settings_are_checked_before_any_work(settings, monkeypatch):
    monkeypatch.delenv("LEARNDYN_NO_SUCH_KEY", raising=False)
    openai = dict(judge="openai:m", judge_base_url="http://127.0.0.1:1/v1")
    cases = {
        "--base-url .* need --on-policy and --judge openai:MODEL": dict(judge_base_url="http://127.0.0.1:1/v1"),
        "--api-key-env .* without --reward": dict(**openai, judge_api_key_env="K",
                                                  reward="test_online_dpo:record_and_prefer_short"),
        "environment variable LEARNDYN_NO_SUCH_KEY": dict(**openai, judge_api_key_env="LEARNDYN_NO_SUCH_KEY"),
        "give the NAME of the environment variable": dict(**openai, judge_api_key_env="sk-pasted-0123456789secret"),
    }
    for message, change in cases.items():
        with pytest.raises(LearndynError, match=message) as caught:
            TrainSettings(**{**settings, **change})
        assert "\n" not in str(caught.value) and "sk-pasted" not in str(caught.value)
    assert not Path(settings["out"]).exists()


def test_configs_without_the_on_policy_settings_still_load(settings):
    old = {k: v for k, v in settings.items() if k not in ("on_policy", "max_new_tokens")}
    loaded = TrainSettings.from_dict(old)
    assert loaded.on_policy is False and loaded.reward is None and loaded.judge == "local"
    saved = TrainSettings(**settings, reward="test_online_dpo:record_and_prefer_short").to_dict()
    assert TrainSettings.from_dict(saved).to_dict() == saved


def test_a_run_made_before_on_policy_existed_still_resumes(settings):
    old = {k: v for k, v in settings.items() if k not in ("on_policy", "max_new_tokens")}
    off_policy = TrainSettings(**{**old, "limit": 2})
    run = Path(off_policy.out)
    run.mkdir()
    new = ("on_policy", "judge", "reward", "max_new_tokens", "temperature")
    write_config(run, {k: v for k, v in off_policy.to_dict().items() if k not in new})  # an older config.yaml
    train(off_policy, resume=True)  # not refused as "made with other settings"
    assert sorted(set(read_metrics(run)["step"])) == [0, 1]


REWARD_MODULE = textwrap.dedent("""
    import json, os

    def shorter(prompts, completions, **kwargs):
        with open(os.environ["REWARD_LOG"], "a") as log:
            log.write(json.dumps(len(completions)) + "\\n")
        return [-len(c[0]["content"]) for c in completions]
""")


def test_cli_on_policy_with_a_reward_module_from_the_current_folder(settings, tmp_path):
    from test_cli import assert_one_error_line, learndyn

    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    log = tmp_path / "calls.jsonl"
    common = ["--data", "example", "--probes", settings["probes"], "--model", settings["model"], "--limit", "2",
              "--batch-size", "2", "--epochs", "1", "--max-length", "128", "--on-policy", "--max-new-tokens", "4"]
    bad = learndyn("train", "dpo", *common, "--out", str(tmp_path / "bad"), "--reward", "my_rewards", cwd=tmp_path)
    assert_one_error_line(bad, "--reward my_rewards: expected arithmetic, reward:MODEL or MODULE:FUNCTION")
    result = learndyn("train", "dpo", *common, "--out", str(tmp_path / "run"), "--reward", "my_rewards:shorter",
                      "--temperature", "0.7", cwd=tmp_path, REWARD_LOG=str(log))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trl.experimental" not in result.stderr  # TRL's experimental notice is silenced
    assert [json.loads(line) for line in log.read_text().splitlines()] == [4]  # 1 step, 2 prompts x 2 samples
    config = read_config(tmp_path / "run")
    assert config["on_policy"] is True and config["temperature"] == 0.7 and config["reward"] == "my_rewards:shorter"


def test_an_openai_judge_uses_the_given_endpoint_and_the_run_keeps_only_the_key_name(settings, monkeypatch):
    key = "sk-on-policy-judge-0123456789secret"
    monkeypatch.setenv("LD_JUDGE_KEY", key)
    seen: list[str | None] = []
    server = ChatServer(lambda request: (seen.append(request["headers"].get("Authorization")) or 200,
                                         completion("A")))
    try:
        run = train(TrainSettings(**{**settings, "limit": 2}, judge="openai:judge-model", judge_base_url=server.url,
                                  judge_api_key_env="LD_JUDGE_KEY"))
    finally:
        server.close()
    assert seen == [f"Bearer {key}"] * 4  # 1 step: 2 prompts, each pair in both orders
    config = read_config(run)
    assert config["judge_base_url"] == server.url and config["judge_api_key_env"] == "LD_JUDGE_KEY"
    for path in run.rglob("*"):
        assert not path.is_file() or key.encode() not in path.read_bytes(), path


def test_cli_train_dpo_passes_the_judge_endpoint_options(settings, tmp_path, monkeypatch):
    from test_cli import assert_one_error_line, learndyn

    monkeypatch.delenv("LEARNDYN_NO_SUCH_KEY", raising=False)
    common = ["train", "dpo", "--data", "example", "--probes", settings["probes"], "--out", str(tmp_path / "run"),
              "--on-policy"]
    assert_one_error_line(learndyn(*common, "--base-url", "http://127.0.0.1:1/v1"), "--base-url", "--judge openai:MODEL")
    missing = learndyn(*common, "--judge", "openai:m", "--base-url", "http://127.0.0.1:1/v1",
                       "--api-key-env", "LEARNDYN_NO_SUCH_KEY")
    assert_one_error_line(missing, "environment variable LEARNDYN_NO_SUCH_KEY")
    assert not (tmp_path / "run").exists()
