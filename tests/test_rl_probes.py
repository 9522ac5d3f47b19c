"""RL probes: the model's own samples split by a reward into `sample_rewarded` and `sample_unrewarded`,
only where the rewards differ; reproducible from the seed, never resampled on resume, and a failing
reward keeps the finished rows. The rewards below are found by `load_reward` as MODULE:FUNCTION."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from learndyn.data import Preference, load_preferences
from learndyn.errors import LearndynError
from learndyn.probes.build import ProbeBuildError, build_probe_file, build_probes
from learndyn.probes.files import read_probes
from learndyn.probes.samples import SampleSettings, sample_seed
from learndyn.rewards import load_reward
from learndyn.vocab import REPHRASE_TYPES, TYPE_NAMES

SAMPLE_TYPES = ("sample_rewarded", "sample_unrewarded")
LETTER = "e"
CALLS: list[int] = []  # prompts each reward call saw (its length is the number of calls)
FAIL_AT = [0]  # the call (counting from 1) on which `flaky` raises; 0: never


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def has_letter(prompts, completions, **kwargs) -> list[float]:
    """1.0 for a completion containing LETTER, else 0.0: random tiny models produce both."""
    CALLS.append(len(prompts))
    return [float(LETTER in _text(c)) for c in completions]


def constant(prompts, completions, **kwargs) -> list[float]:
    return [0.5] * len(completions)


def flaky(prompts, completions, **kwargs) -> list[float]:
    if len(CALLS) + 1 == FAIL_AT[0]:
        raise RuntimeError("the reward server went away")
    return has_letter(prompts, completions)


def seen_columns(prompts, completions, example_id, answer, **kwargs) -> list[float]:
    """Checks that the data's columns arrive as TRL passes them: one value per completion."""
    assert len(example_id) == len(answer) == len(completions) and len(set(example_id)) == 1
    assert all(c[0]["role"] == "assistant" for c in completions)  # chat prompts: chat completions
    return [float(i) for i in range(len(completions))]


@pytest.fixture(autouse=True)
def fresh_counters():
    CALLS.clear()
    FAIL_AT[0] = 0


def make_prefs(n: int = 6) -> list[Preference]:
    """Text and chat prompts alike; rows 0 and 3 carry every rephrase, so they need no rephraser."""
    prefs = []
    for i in range(n):
        prompt = f"Tell me about topic {i}." if i % 2 else [{"role": "user", "content": f"Topic {i}, please."}]
        given = {name: f"{name} given" for name in REPHRASE_TYPES} if i % 3 == 0 else {}
        prefs.append(Preference(f"id{i}", prompt, f"Answer {i} is good.", f"Answer {i} is bad.", given))
    return prefs


def samples_of(model, tokenizer, pref: Preference, seed: int, k: int = 4, tokens: int = 8) -> list[str]:
    """What the build must have drawn for `pref`: K samples from its own seed."""
    from learndyn.generation import generate

    return generate(model, tokenizer, [pref.prompt] * k, max_new_tokens=tokens, batch_size=k, do_sample=True,
                    temperature=1.0, seed=sample_seed(seed, pref.example_id), progress=None)


def build(prefs, model, tokenizer, reward="test_rl_probes:has_letter", **options):
    return build_probes(prefs, model=model, tokenizer=tokenizer, reward=reward, greedy_max_tokens=8, **options)


def test_sample_types_follow_greedy_in_the_vocabulary():
    assert TYPE_NAMES[TYPE_NAMES.index("greedy") + 1:][:2] == SAMPLE_TYPES


def test_samples_are_split_by_reward_into_highest_and_lowest(tiny_llama):
    model, tokenizer = tiny_llama
    prefs = make_prefs()
    probes = build(prefs, model, tokenizer, seed=1)
    split = 0
    for probe, pref in zip(probes, prefs):
        drawn = [t for t in samples_of(model, tokenizer, pref, seed=1) if t.strip()]
        rewards = {LETTER in t for t in drawn}
        if len(rewards) == 2:
            split += 1
            assert probe.responses["sample_rewarded"] in drawn and LETTER in probe.responses["sample_rewarded"]
            assert probe.responses["sample_unrewarded"] in drawn
            assert LETTER not in probe.responses["sample_unrewarded"]
        else:  # every sample scored the same: no probe of either type
            assert not set(SAMPLE_TYPES) & set(probe.responses)
    assert 0 < split < len(prefs), "the letter splits every prompt's samples or none: the test proves little"
    assert CALLS == [4] * len(prefs)  # one call per prompt, with its 4 samples


def test_a_constant_reward_gives_neither_type_and_says_so(tiny_llama, caplog):
    model, tokenizer = tiny_llama
    with caplog.at_level(logging.WARNING, logger="learndyn.probes.samples"):
        probes = build(make_prefs(), model, tokenizer, reward="test_rl_probes:constant")
    assert not any(set(SAMPLE_TYPES) & set(p.responses) for p in probes)
    assert "6 of 6 prompts had no reward variance among their 4 samples" in caplog.text


def test_samples_are_reproducible_and_each_row_depends_only_on_its_prompt(tiny_llama):
    model, tokenizer = tiny_llama
    prefs = make_prefs()
    first = [p.to_row() for p in build(prefs, model, tokenizer, seed=3)]
    assert [p.to_row() for p in build(prefs, model, tokenizer, seed=3)] == first
    assert [p.responses.get("sample_rewarded") for p in build(prefs[2:4], model, tokenizer, seed=3)] == \
        [row.get("sample_rewarded") for row in first[2:4]]  # other prompts in the build change nothing
    assert samples_of(model, tokenizer, prefs[0], seed=3) != samples_of(model, tokenizer, prefs[0], seed=4)


def test_the_data_columns_reach_the_reward_as_trl_passes_them(tiny_llama):
    model, tokenizer = tiny_llama
    prefs = load_preferences("arithmetic[0:2]")
    probes = build(prefs, model, tokenizer, reward="test_rl_probes:seen_columns")  # it asserts inside
    assert any(set(SAMPLE_TYPES) <= set(p.responses) for p in probes)


def test_failing_reward_keeps_finished_rows_and_resume_samples_only_the_rest(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    prefs = make_prefs()
    clean = [p.to_row() for p in build(prefs, model, tokenizer, seed=2)]
    path = tmp_path / "rl.jsonl"
    CALLS.clear()
    FAIL_AT[0] = 4
    with pytest.raises(LearndynError, match=r"^--reward test_rl_probes:flaky raised RuntimeError: the reward server "
                                            r"went away; kept 3 of 6 finished rows in .*rl.jsonl; rerun with --resume"):
        build_probe_file(prefs, path, model=model, tokenizer=tokenizer, reward="test_rl_probes:flaky",
                         greedy_max_tokens=8, seed=2)
    assert [p.to_row() for p in read_probes(path)] == clean[:3]

    CALLS.clear()
    build_probe_file(prefs, path, resume=True, model=model, tokenizer=tokenizer, reward="test_rl_probes:has_letter",
                     greedy_max_tokens=8, seed=2)
    assert CALLS == [4] * 3  # the three unfinished prompts only: finished rows are not resampled
    assert [p.to_row() for p in read_probes(path)] == clean


def test_rows_still_waiting_for_a_rephrase_are_not_kept_when_the_reward_fails(tiny_llama):
    """Sampling comes before rephrasing: a row sampled but not yet rephrased is unfinished."""
    model, tokenizer = tiny_llama
    FAIL_AT[0] = 5
    with pytest.raises(ProbeBuildError, match="test_rl_probes:flaky") as info:
        build(make_prefs(), model, tokenizer, reward="test_rl_probes:flaky",
              rephraser=lambda texts, style: [f"{style}:{t}" for t in texts])
    assert [p.example_id for p in info.value.finished] == ["id0", "id3"]  # rephrases given, sampled


def test_bad_sampling_settings_and_a_reward_without_a_model_are_refused():
    with pytest.raises(LearndynError, match="samples must be at least 2"):
        SampleSettings(samples=1)
    with pytest.raises(LearndynError, match="temperature must be positive"):
        build_probes(make_prefs(2), reward="arithmetic", temperature=0.0)
    with pytest.raises(LearndynError, match="needs a model"):
        build_probes(make_prefs(2), reward="arithmetic")


def test_arithmetic_probes_carry_a_reworded_answer_the_reward_accepts():
    prefs = load_preferences("arithmetic[0:16]")
    probes = build_probes(prefs)
    reward = load_reward("arithmetic")
    for kind, expected in (("chosen", 1.0), ("chosen_semantic", 1.0), ("rejected", 0.0)):
        texts = [[{"role": "assistant", "content": p.responses[kind]}] for p in probes]
        got = reward(prompts=[p.prompt for p in probes], completions=texts, answer=[q.columns["answer"] for q in prefs])
        assert got == [expected] * 16, kind


# ---------------------------------------------------------------- the command


def _learndyn(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "learndyn"
    if not script.is_file():
        pytest.skip("the learndyn console script is not installed (pip install -e .)")
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300, env=env)


def test_cli_builds_rl_probes_from_the_arithmetic_task(tmp_path, tiny_folder):
    out = tmp_path / "rl.jsonl"
    result = _learndyn("probes", "build", "--data", "arithmetic[0:4]", "--model", str(tiny_folder),
                       "--reward", "arithmetic", "--samples", "2", "--greedy-tokens", "6", "--out", str(out))
    assert result.returncode == 0, result.stderr
    probes = read_probes(out)
    assert [p.example_id for p in probes] == [q.example_id for q in load_preferences("arithmetic[0:4]")]
    for probe in probes:
        assert {"chosen", "rejected", "chosen_semantic", "other_train"} <= set(probe.responses)
        assert "shuffled_chosen" not in probe.responses  # a one-number answer has no other order
        assert len(set(SAMPLE_TYPES) & set(probe.responses)) in (0, 2)  # both or neither
    split = sum("sample_rewarded" in p.responses for p in probes)
    assert f"sample_rewarded and sample_unrewarded on {split} of 4 prompts (2 samples per prompt from " \
           f"{tiny_folder} at temperature 1, split by --reward arithmetic)" in result.stdout
    assert split == 4 or f"{4 - split} of 4 prompts had no reward variance among their 2 samples" in result.stderr


@pytest.mark.parametrize("args, message", [
    (("--samples", "3"), "--samples and --temperature need --reward"),
    (("--reward", "arithmetic", "--samples", "1"), "samples must be at least 2"),
    (("--reward", "no_such_module_learndyn:f"), "cannot import no_such_module_learndyn"),
])
def test_cli_refuses_bad_sampling_options_in_one_line(tmp_path, args, message):
    result = _learndyn("probes", "build", "--data", "arithmetic[0:2]", "--out", str(tmp_path / "x.jsonl"), *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "x.jsonl").exists()
