"""The real built-in model on real data: loading, the example data, and the obvious orderings."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from learndyn import build_probes, load_model, load_preferences, read_probes, score_probes
from learndyn.scoring import encode_probes, score_encoded, score_plain, summarize

pytestmark = pytest.mark.integration
HH_PROBES = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_helpful_probes" / "train.jsonl"


@pytest.fixture(scope="module")
def builtin():
    return load_model("smollm2-135m-instruct", device="cpu")


def test_builtin_model_is_cached_and_trainable(builtin, tmp_path):
    model, tokenizer = builtin
    assert model.config.vocab_size == 49152 and tokenizer.eos_token == "<|im_end|>"
    assert getattr(model, "hf_quantizer", None) is None  # Trainer and save_pretrained refuse it otherwise
    start = time.perf_counter()
    load_model("smollm2-135m-instruct", device="cpu")
    assert time.perf_counter() - start < 10  # from the safetensors cache, not the 15 s GGUF conversion
    model.save_pretrained(tmp_path)


def test_example_data_scores_with_every_response_type(builtin):
    model, tokenizer = builtin
    train = load_preferences("example", limit=4)
    probes = build_probes(train, held_out=load_preferences("example:test"), model=model, tokenizer=tokenizer,
                          greedy_max_tokens=24)
    scores = score_probes(model, tokenizer, probes, progress=None)
    present = set(scores["response_type"])
    assert present >= {"chosen", "rejected", "chosen_semantic", "chosen_format", "rejected_semantic",
                       "rejected_format", "other_train", "other_test", "fluent_random", "shuffled_chosen",
                       "shuffled_other", "greedy"}
    assert all(math.isfinite(v) for v in scores["logp_sum"])
    means = summarize(scores)["logp_mean"]
    # The model's own greedy answer is its most likely text; shuffled words are its least likely.
    assert means["greedy"] > means["chosen"] > means["shuffled_chosen"]


@pytest.mark.skipif(not HH_PROBES.is_file(), reason="shared HH probe data absent")
def test_hh_probes_show_the_obvious_order(builtin):
    model, tokenizer = builtin
    scores = score_probes(model, tokenizer, read_probes(HH_PROBES, limit=6), progress=None)
    means = summarize(scores)["logp_sum"]
    assert means["chosen"] > means["shuffled_chosen"] + 100  # far above its own words shuffled
    assert means["fluent_random"] > means["shuffled_other"] + 100  # fluent text above shuffled text
    assert means["fluent_random"] > means["shuffled_chosen"]


@pytest.mark.skipif(not HH_PROBES.is_file(), reason="shared HH probe data absent")
def test_fast_scorer_equals_plain_loop_on_the_builtin_model(builtin):
    model, tokenizer = builtin
    encoded = encode_probes(read_probes(HH_PROBES, limit=2), tokenizer)
    fast = score_encoded(model, encoded, batch_tokens=256, progress=None)
    plain = score_plain(model, encoded)
    for metric in ("logp_sum", "argmax_logp", "argmax_prob", "entropy", "residual_norm"):
        rel = ((fast[metric] - plain[metric]).abs() / plain[metric].abs()).max()
        assert rel < 1e-4, (metric, rel)


def test_explained_dpo_step_matches_the_real_step_on_the_builtin_model(builtin):
    """First order on a real 135M model at a realistic step: the predicted changes of log π(y) agree
    with the actual ones, and the DPO step raises chosen and lowers rejected, each mainly through
    its own residual."""
    from learndyn import OptimizerRule, explain_step

    model, tokenizer = builtin
    prefs = load_preferences("example", limit=1)
    probes = build_probes(prefs)
    got = explain_step(model, tokenizer, prefs, probes, loss="dpo", rule=OptimizerRule("sgd", 1e-4),
                       types=["chosen", "rejected", "fluent_random"])
    ch = got.changes.set_index("response_type")
    assert got.summary["relative_error"] < 0.05
    assert ch.loc["chosen", "actual"] > 0 > ch.loc["rejected", "actual"]
    assert ch.loc["chosen", "predicted_from_chosen"] > abs(ch.loc["chosen", "predicted_from_rejected"])
    assert -ch.loc["rejected", "predicted_from_rejected"] > abs(ch.loc["rejected", "predicted_from_chosen"])
