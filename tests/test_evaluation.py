"""Response files, the `generate` command and the intrinsic measures (learndyn.evaluation)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from learndyn.data import load_preferences
from learndyn.errors import LearndynError
from learndyn.evaluation.intrinsic import (
    distinct_n, held_out_measures, intrinsic_measures, repetition_rate, text_measures,
)
from learndyn.evaluation.responses import DecodingSettings, generate_responses, resolve_model
from learndyn.generation import generate
from learndyn.probes.files import Probe
from learndyn.responses import RESPONSE_FIELDS, read_responses, write_responses
from learndyn.scoring import score_probes
from test_cli import assert_one_error_line, learndyn, read_rows

# ---- text measures, by hand ------------------------------------------------------------------


def test_distinct_n_of_one_repeated_word():
    assert distinct_n(["a a a a"], 1) == 0.25  # 1 unique of 4 words
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)  # (a, a) three times


def test_distinct_n_counts_over_the_set_and_never_across_responses():
    assert distinct_n(["a b", "b a"], 1) == 0.5  # {a, b} of 4 words
    assert distinct_n(["a b", "b a"], 2) == 1.0  # (a, b), (b, a): joining would add (b, b)
    assert distinct_n(["", "one"], 2) is None  # no bigram at all


def test_repetition_rate_is_the_share_of_repeated_ngrams_within_a_response():
    assert repetition_rate("a a a a", 3) == 0.5  # (a,a,a) twice: 1 unique of 2
    assert repetition_rate("a b c a b c", 3) == 0.25  # abc, bca, cab, abc: 3 unique of 4
    assert repetition_rate("the cat sat on the mat", 3) == 0.0
    assert repetition_rate("a b", 3) is None  # fewer than 3 words: nothing to repeat


def test_text_measures_of_a_hand_made_set():
    m = text_measures(["a a a a", "a b c a b c", "", "hi"])
    assert m["n_responses"] == 4 and m["empty_responses"] == 1
    assert m["mean_words"] == (4 + 6 + 0 + 1) / 4
    assert m["distinct_1"] == pytest.approx(4 / 11)  # {a, b, c, hi} of 11 words
    assert m["distinct_2"] == pytest.approx(4 / 8)  # {aa, ab, bc, ca} of 3 + 5 bigrams
    assert m["repetition_3"] == pytest.approx((0.5 + 0.25) / 2)  # "" and "hi" have no 3-gram
    assert "mean_tokens" not in m  # no tokenizer given


def test_text_measures_of_empty_responses_are_none_not_nan():
    m = text_measures(["", "  "])
    assert m["distinct_1"] is None and m["distinct_2"] is None and m["repetition_3"] is None
    assert m["empty_responses"] == 2 and m["mean_words"] == 0


def test_text_measures_take_response_rows_and_count_tokens(tiny_tokenizer):
    texts = ["Boil the water.", "a a a a"]
    from_rows = text_measures([{"response": t, "prompt": "x"} for t in texts], tiny_tokenizer)
    expected = sum(len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / 2
    assert from_rows["mean_tokens"] == expected
    assert {k: v for k, v in from_rows.items() if k != "mean_tokens"} == text_measures(texts)


def test_text_measures_bad_input():
    with pytest.raises(LearndynError, match="no responses"):
        text_measures([])
    with pytest.raises(LearndynError, match="response 1"):
        text_measures(["fine", {"prompt": "no response"}])


# ---- model measures on the tiny model --------------------------------------------------------


def test_held_out_measures_equal_a_direct_score_probes_call(tiny_llama):
    model, tokenizer = tiny_llama
    held_out = load_preferences("example:test", limit=3, need_rejected=False)
    measured = held_out_measures(model, tokenizer, held_out)
    direct = score_probes(model, tokenizer, [Probe(p.example_id, p.prompt, {"chosen": p.chosen}) for p in held_out],
                          types=["chosen"], progress=None)
    assert measured["held_out_n"] == 3 and measured["held_out_truncated"] == 0
    for key, column in (("chosen_logp_sum", "logp_sum"), ("chosen_logp_mean", "logp_mean"),
                        ("chosen_argmax_logp", "argmax_logp")):
        assert math.isfinite(measured[key])
        assert measured[key] == pytest.approx(direct[column].mean(), rel=1e-6)
    assert measured["chosen_argmax_logp"] >= measured["chosen_logp_sum"]  # the argmax path is the most likely


def test_intrinsic_measures_join_text_and_model_parts(tiny_llama):
    model, tokenizer = tiny_llama
    held_out = load_preferences("example:test", limit=2, need_rejected=False)
    both = intrinsic_measures(["a a a a", "b c d"], tokenizer, model, held_out)
    assert both == {**text_measures(["a a a a", "b c d"], tokenizer), **held_out_measures(model, tokenizer, held_out)}
    with pytest.raises(LearndynError, match="both a model and held-out data"):
        intrinsic_measures(["x"], tokenizer, model)
    with pytest.raises(LearndynError, match="tokenizer"):
        intrinsic_measures(["x"], None, model, held_out)


# ---- response files --------------------------------------------------------------------------


def test_generated_rows_hold_the_prompt_as_in_the_data_and_the_settings(tiny_llama):
    model, tokenizer = tiny_llama
    prompts = load_preferences("example:test", limit=3, need_rejected=False)
    settings = DecodingSettings(max_new_tokens=6, batch_size=2)
    rows = generate_responses(model, tokenizer, prompts, settings, model_name="tiny", progress=None)
    assert [list(r) for r in rows] == [list(RESPONSE_FIELDS)] * 3
    assert [r["example_id"] for r in rows] == [p.example_id for p in prompts]
    assert [r["prompt"] for r in rows] == [p.prompt for p in prompts]
    assert [r["response"] for r in rows] == generate(model, tokenizer, [p.prompt for p in prompts],
                                                     max_new_tokens=6, progress=None)
    assert rows[0]["decoding"] == "greedy" and rows[0]["temperature"] is None and rows[0]["seed"] is None
    sampled = generate_responses(model, tokenizer, prompts[:1], DecodingSettings(sample=True, max_new_tokens=4, seed=7),
                                 progress=None)
    assert (sampled[0]["decoding"], sampled[0]["temperature"], sampled[0]["seed"]) == ("sample", 1.0, 7)


def test_response_file_round_trip_keeps_chat_prompts(tmp_path):
    rows = [{"example_id": "a", "prompt": [{"role": "user", "content": "Hi ümlaut"}], "response": "Hello"},
            {"example_id": "b", "prompt": "Plain", "response": ""}]
    path = tmp_path / "r.jsonl"
    write_responses(rows, path)
    assert read_responses(path) == rows
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left beside it


def test_read_responses_names_the_line_of_a_bad_row(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(LearndynError, match=r"r.jsonl:2: missing field 'response'"):
        read_responses(path)


def test_decoding_settings_are_checked_on_creation():
    for bad in (dict(max_new_tokens=0), dict(batch_size=0), dict(sample=True, temperature=0.0)):
        with pytest.raises(LearndynError):
            DecodingSettings(**bad)


def test_resolve_model_tells_run_folders_from_model_specs(tmp_path, tiny_folder):
    assert resolve_model("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert resolve_model(str(tiny_folder)) == str(tiny_folder)  # holds config.json: a model folder
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(LearndynError, match="has no final checkpoint"):
        resolve_model(run)
    shutil.copytree(tiny_folder, run / "checkpoints" / "final")
    assert resolve_model(run) == str(run / "checkpoints" / "final")


# ---- the command -----------------------------------------------------------------------------


def test_generate_writes_one_row_per_prompt_with_every_field(tmp_path, tiny_folder):
    out = tmp_path / "responses.jsonl"
    result = learndyn("generate", str(tiny_folder), "--data", "example:test", "--n", "3", "--out", str(out),
                      "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    rows = read_rows(out)
    assert len(rows) == 3 and all(list(r) == list(RESPONSE_FIELDS) for r in rows)
    prompts = load_preferences("example:test", limit=3, need_rejected=False)
    assert [(r["example_id"], r["prompt"]) for r in rows] == [(p.example_id, p.prompt) for p in prompts]
    assert rows[0]["model"] == str(tiny_folder) and rows[0]["decoding"] == "greedy" and rows[0]["max_new_tokens"] == 5
    assert "wrote 3 responses" in result.stdout and "distinct-1" in result.stdout
    again = learndyn("generate", str(tiny_folder), "--data", "example:test", "--n", "3", "--out", str(out))
    assert_one_error_line(again, "exists", "--overwrite")


def test_generate_from_a_run_folder_uses_its_final_checkpoint(tmp_path, tiny_folder):
    run = tmp_path / "run"
    (run / "metrics").mkdir(parents=True)
    (run / "config.yaml").write_text("phase: sft\n")
    out = tmp_path / "responses.jsonl"
    args = ("generate", str(run), "--data", "example:test", "--n", "1", "--out", str(out), "--max-new-tokens", "3")
    assert_one_error_line(learndyn(*args), str(run), "no final checkpoint")
    assert not out.exists()
    shutil.copytree(tiny_folder, run / "checkpoints" / "final")
    result = learndyn(*args)
    assert result.returncode == 0, result.stderr
    assert [r["model"] for r in read_rows(out)] == [str(run)]


@pytest.mark.parametrize("n", ["0", "-2"])
def test_generate_bad_n_is_one_line(tmp_path, tiny_folder, n):
    result = learndyn("generate", str(tiny_folder), "--data", "example:test", "--n", n,
                      "--out", str(tmp_path / "r.jsonl"))
    assert_one_error_line(result, "--n must be at least 1")
