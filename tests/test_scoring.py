"""The fast scorer must equal the plain per-sequence computation, whatever the batching."""

from __future__ import annotations

import random
import warnings

import pandas as pd
import pytest
import torch

from learndyn.errors import LearndynError
from learndyn.probes.files import Probe
from learndyn.lm import pack_runs
from learndyn.scoring import (
    METRICS,
    EncodedPrompt,
    token_stats,
    encode_probes,
    score_encoded,
    score_plain,
    score_probes,
    summarize,
    write_scores,
)

FLOAT_METRICS = [m for m in METRICS if m != "n_tokens"]


def random_encoded(vocab: int, n_prompts: int, seed: int = 0) -> list[EncodedPrompt]:
    """Prompts of 1..12 tokens with 1..3 responses of 1..9 tokens (1 = EOS only)."""
    rng = random.Random(seed)
    out = []
    for i in range(n_prompts):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
        types = ["chosen", "rejected", "greedy"][: rng.randint(1, 3)]
        responses = [(t, [rng.randrange(vocab) for _ in range(rng.randint(1, 9))], False) for t in types]
        out.append(EncodedPrompt(str(i), prompt, responses))
    return out


def assert_same_scores(fast: pd.DataFrame, plain: pd.DataFrame, rtol: float = 1e-4) -> None:
    assert list(fast["example_id"]) == list(plain["example_id"])
    assert list(fast["response_type"]) == list(plain["response_type"])
    assert (fast["n_tokens"] == plain["n_tokens"]).all()
    for metric in FLOAT_METRICS:
        rel = ((fast[metric] - plain[metric]).abs() / plain[metric].abs().clip(lower=1e-6)).max()
        assert rel < rtol, f"{metric}: relative difference {rel:.2e}"


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def tiny_model(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("batch_tokens", [1, 24, 4096])
def test_scores_equal_plain_loop(tiny_model, batch_tokens):
    model, tokenizer = tiny_model
    encoded = random_encoded(len(tokenizer), 14)
    fast = score_encoded(model, encoded, batch_tokens=batch_tokens, progress=None)
    assert_same_scores(fast, score_plain(model, encoded))


def test_scores_equal_plain_loop_on_peaked_distributions(tiny_llama):
    """Near-one-hot predictions stress the precision of entropy and ||pi - e_y||."""
    model, tokenizer = tiny_llama
    with torch.no_grad():
        model.lm_head.weight.mul_(200)
    encoded = random_encoded(len(tokenizer), 10, seed=3)
    fast = score_encoded(model, encoded, batch_tokens=32, progress=None)
    plain = score_plain(model, encoded)
    assert fast["argmax_prob"].max() > 0.99  # the test really is in the peaked regime
    assert_same_scores(fast, plain)


def test_batch_size_invariance(tiny_llama):
    model, tokenizer = tiny_llama
    encoded = random_encoded(len(tokenizer), 12, seed=1)
    small = score_encoded(model, encoded, batch_tokens=8, progress=None)
    large = score_encoded(model, encoded, batch_tokens=10_000, progress=None)
    assert_same_scores(small, large, rtol=1e-5)


def testtoken_stats_match_float64_definitions():
    torch.manual_seed(0)
    logits = torch.randn(300, 5000) * 4
    logits[:100, 7] += 12  # peaked rows, some with the target on the peak
    targets = torch.randint(0, 5000, (300,))
    targets[:50] = 7
    stats = token_stats(logits, targets)
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    expected = {
        "logp": logp[torch.arange(300), targets],
        "argmax_logp": logp.max(-1).values,
        "entropy": -(p * logp).sum(-1),
        "residual_norm": (p - torch.nn.functional.one_hot(targets, 5000).double()).norm(dim=-1),
    }
    for name, value in expected.items():
        torch.testing.assert_close(stats[name].double(), value, rtol=1e-4, atol=1e-7, msg=name)


def test_one_row_per_probe_and_type_in_probe_order(tiny_llama):
    model, tokenizer = tiny_llama
    probes = [
        Probe("a", "Question one?", {"chosen": "Yes.", "rejected": "No.", "greedy": "Maybe"}),
        Probe("b", [{"role": "user", "content": "Hello"}], {"chosen": "Hi there", "other_train": "Bye"}),
    ]
    scores = score_probes(model, tokenizer, probes, progress=None)
    assert list(zip(scores["example_id"], scores["response_type"])) == [
        ("a", "chosen"), ("a", "rejected"), ("a", "greedy"), ("b", "chosen"), ("b", "other_train")]
    assert list(scores.columns) == ["example_id", "response_type", *METRICS, "truncated"]
    only = score_probes(model, tokenizer, probes, types=["rejected"], progress=None)
    assert list(only["example_id"]) == ["a"]


def test_eos_is_appended_and_prompt_masked(tiny_llama):
    model, tokenizer = tiny_llama
    probe = Probe("a", "Some prompt text", {"chosen": "an answer"})
    [enc] = encode_probes([probe], tokenizer)
    response_ids = tokenizer("an answer", add_special_tokens=False)["input_ids"]
    assert enc.responses[0][1] == response_ids + [tokenizer.eos_token_id]
    assert enc.prompt_ids == tokenizer("Some prompt text")["input_ids"]
    scores = score_probes(model, tokenizer, [probe], progress=None)
    assert scores["n_tokens"].item() == len(response_ids) + 1


def test_chat_prompts_use_the_template_without_extra_special_tokens(tiny_llama):
    model, tokenizer = tiny_llama
    messages = [{"role": "user", "content": "Hello"}]
    [enc] = encode_probes([Probe("a", messages, {"chosen": "Hi"})], tokenizer)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert enc.prompt_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_truncation_keeps_recent_prompt_and_response_start(tiny_llama):
    model, tokenizer = tiny_llama
    prompt = " ".join(f"word{i}" for i in range(60))
    long_response = " ".join(f"reply{i}" for i in range(60))
    probe = Probe("a", prompt, {"chosen": long_response, "rejected": "short"})
    [full] = encode_probes([probe], tokenizer)
    limit = 64
    [cut] = encode_probes([probe], tokenizer, max_length=limit)
    assert cut.prompt_ids == full.prompt_ids[-len(cut.prompt_ids):]  # the most recent prompt tokens
    assert len(cut.prompt_ids) >= limit // 2
    (_, chosen, chosen_cut), (_, rejected, rejected_cut) = cut.responses
    assert chosen_cut and not rejected_cut
    assert chosen == full.responses[0][1][: len(chosen)]  # the response keeps its first tokens
    assert len(cut.prompt_ids) + len(chosen) == limit
    scores = score_encoded(model, [cut], progress=None)
    assert list(scores["truncated"]) == [True, False]
    assert_same_scores(scores, score_plain(model, [cut]))


def test_short_prompt_is_not_cut_below_what_fits(tiny_llama):
    _, tokenizer = tiny_llama
    probe = Probe("a", "Short prompt", {"chosen": " ".join(["word"] * 80)})
    [full] = encode_probes([probe], tokenizer)
    [cut] = encode_probes([probe], tokenizer, max_length=40)
    assert cut.prompt_ids == full.prompt_ids


def test_empty_prompt_after_tokenization_is_an_error(tiny_llama):
    _, tokenizer = tiny_llama
    with pytest.raises(LearndynError, match="probe 'x'"):
        encode_probes([Probe("x", "", {"chosen": "hi"})], tokenizer)


def test_pack_respects_budget_and_waste():
    lengths = [1, 2, 2, 3, 10, 10, 11, 40]
    runs = pack_runs(lengths, budget=30, max_waste=0.1)
    assert runs[0][0] == 0 and runs[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))  # contiguous cover
    for start, stop in runs:
        padded = (stop - start) * lengths[stop - 1]
        assert stop - start == 1 or padded <= 30
        assert stop - start == 1 or sum(lengths[start:stop]) >= 0.9 * padded


def test_summary_is_in_vocabulary_order_with_counts(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    probes = [Probe(str(i), f"prompt {i}", {"shuffled_chosen": "b a", "chosen": "a b"}) for i in range(3)]
    scores = score_probes(model, tokenizer, probes, progress=None)
    table = summarize(scores)
    assert list(table.index) == ["chosen", "shuffled_chosen"]
    assert list(table["n"]) == [3, 3]
    write_scores(scores, tmp_path / "s.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "s.parquet"), scores)
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]  # no temporary left behind


def test_plain_head_models_use_the_fused_head(tiny_llama, tiny_gpt2):
    from learndyn.lm import split_model

    assert split_model(tiny_llama[0]).fused and split_model(tiny_gpt2[0]).fused


def test_models_that_post_process_logits_keep_their_own_forward(tiny_tokenizer, one_thread):
    """Gemma-2 soft-caps its logits: the fused head would be wrong, so the scorer must notice."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from learndyn.lm import split_model

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                          pad_token_id=0)
    model = Gemma2ForCausalLM(config).eval()
    assert not split_model(model).fused
    encoded = random_encoded(len(tiny_tokenizer), 8, seed=2)
    assert_same_scores(score_encoded(model, encoded, batch_tokens=16, progress=None), score_plain(model, encoded))


def test_written_files_follow_the_umask_not_mkstemps_0600(tiny_llama, tmp_path):
    import os

    model, tokenizer = tiny_llama
    scores = score_probes(model, tokenizer, [Probe("a", "p", {"chosen": "x"})], progress=None)
    old = os.umask(0o022)
    try:
        write_scores(scores, tmp_path / "s.parquet")
    finally:
        os.umask(old)
    assert (tmp_path / "s.parquet").stat().st_mode & 0o777 == 0o644


def test_a_model_in_training_mode_is_scored_in_eval_mode_and_left_training(tiny_llama):
    model, tokenizer = tiny_llama
    attention = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert attention
    for module in attention:
        module.attention_dropout = 0.5  # what Llama reads in training mode: scoring there would be random
    probes = [Probe("a", "prompt", {"chosen": "an answer", "rejected": "no"})]
    expected = score_probes(model, tokenizer, probes, progress=None)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is live in training mode
    model.eval()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # as TRL trainers do: in training mode it turns the KV cache off
    model.train()
    scores = score_probes(model, tokenizer, probes, progress=None)
    assert model.training
    pd.testing.assert_frame_equal(scores, expected)


def test_scoring_passes_the_cache_under_the_name_the_model_takes(tiny_model):
    """A deprecated cache argument works today and breaks when transformers drops it (5.40)."""

    model, tokenizer = tiny_model
    encoded = random_encoded(len(tokenizer), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        fast = score_encoded(model, encoded, batch_tokens=24, progress=None)
    assert_same_scores(fast, score_plain(model, encoded))


@pytest.mark.parametrize("batch_tokens", [1, 24, 4096])
@pytest.mark.parametrize("shares_cache", [True, False])
def test_body_call_plan_equals_the_calls_made(tiny_llama, batch_tokens, shares_cache):
    """Sharded ranks pad to the busiest rank's planned count: a plan that is off by one hangs them."""
    from learndyn.lm import split_model
    from learndyn.scoring import body_calls

    model, _ = tiny_llama
    encoded = random_encoded(model.config.vocab_size, 11, seed=batch_tokens)
    split = split_model(model)
    split._shares_cache = shares_cache  # the one-sequence-at-a-time route of recurrent models
    try:
        before = split.calls
        score_encoded(model, encoded, batch_tokens=batch_tokens, progress=None)
        assert split.calls - before == body_calls(encoded, batch_tokens, shares_cache=shares_cache)
    finally:
        split._shares_cache = None


def test_ranks_get_balanced_tokens_even_from_a_file_sorted_by_length():
    """Dealing by size, not contiguous halves: halves of a sorted file would give one rank ~2x the work."""
    from learndyn.scoring import dealt

    def tokens(e: EncodedPrompt) -> int:
        return len(e.prompt_ids) + sum(len(ids) for _, ids, _ in e.responses)

    encoded = sorted(random_encoded(100, 40, seed=3), key=tokens)
    parts = [dealt(encoded, rank, 2) for rank in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(40))
    work = [sum(tokens(encoded[i]) for i in part) for part in parts]
    assert max(work) / min(work) < 1.15, work
