"""One-step explanations on tiny random models (float64, so first-order agreement is clean)."""

import pytest
import torch
from conftest import make_tiny_tokenizer

from learndyn.data import Preference
from learndyn.dynamics.step import explain_mode, explain_step, predict_naive
from learndyn.dynamics.sequences import (
    ResponseLogits,
    SharedPromptLogits,
    full_inputs,
    probe_batch,
    probe_batches,
    probe_sequences,
)
from learndyn.dynamics.updates import OptimizerRule
from learndyn.errors import LearndynError
from learndyn.probes.files import Probe
from learndyn.lm import can_pad_prompts, split_model

UPDATE = [
    Preference("u0", "Human: How do I make tea? Assistant:", " Boil the water, then steep.", " I cannot help."),
    Preference("u1", [{"role": "user", "content": "What is a horseshoe?"}], " A U-shaped metal plate.", " No idea."),
]
PROBES = [
    Probe("u0", "Human: How do I make tea? Assistant:",
          {"chosen": " Boil the water, then steep.", "rejected": " I cannot help.", "fluent_random": " The dog sleeps."}),
    Probe("p1", [{"role": "user", "content": "Name a language."}],
          {"chosen": " Python is a language.", "shuffled_chosen": "language. a Python is"}),
    Probe("p2", "Human: Is the fox quick? Assistant:", {"chosen": " Yes, it jumps over the lazy dog."}),
]


@pytest.fixture
def model64(tiny_llama):
    model, tokenizer = tiny_llama
    return model.double(), tokenizer


@pytest.mark.parametrize("loss", ["sft", "dpo", "ipo", "hinge"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_prediction_equals_per_probe_backward_route(tiny_gpt2, loss, optimizer):
    """Exact to float64 rounding on GPT-2. (Llama's eager attention takes its softmax in float32
    even in a float64 model, which leaves ~1e-4 relative between two exact routes.)"""
    model, tok = tiny_gpt2
    model.double()
    rule = OptimizerRule(optimizer, lr=1e-3, weight_decay=0.01)
    got = explain_step(model, tok, UPDATE, PROBES, loss=loss, rule=rule, keep_delta=True)
    naive = predict_naive(model, tok, PROBES, got.delta)
    merged = got.changes.merge(naive, on=["example_id", "response_type"], suffixes=("", "_naive"))
    assert len(merged) == len(got.changes) == 6
    torch.testing.assert_close(torch.tensor(merged["predicted"].values), torch.tensor(merged["predicted_naive"].values),
                               rtol=1e-7, atol=1e-10)


def test_parts_add_up_and_sft_has_no_rejected_part(model64):
    model, tok = model64
    for loss in ("sft", "dpo"):
        ch = explain_step(model, tok, UPDATE, PROBES, loss=loss, rule=OptimizerRule("adamw", 1e-3, weight_decay=0.1)).changes
        parts = ch["predicted_from_chosen"] + ch["predicted_from_rejected"] + ch["predicted_from_state"]
        torch.testing.assert_close(torch.tensor(parts.values), torch.tensor(ch["predicted"].values))
        assert (ch["predicted_from_state"].abs() > 0).all()  # decoupled weight decay moves everything
        assert (ch["predicted_from_rejected"] == 0).all() == (loss == "sft")


@pytest.mark.parametrize("optimizer,lr", [("sgd", 1e-2), ("adam", 3e-4)])
def test_relative_error_falls_linearly_with_learning_rate(model64, optimizer, lr):
    """The error of a first-order prediction is O(η) relative. (Below ~η/10 here Llama's eager
    attention, which takes its softmax in float32 even for a float64 model, sets a noise floor.)"""
    model, tok = model64
    errors = [explain_step(model, tok, UPDATE, PROBES, loss="dpo", rule=OptimizerRule(optimizer, lr / k))
              .summary["relative_error"] for k in (1, 3, 10)]
    assert errors[0] < 0.05
    assert errors[0] > errors[1] > errors[2] and 5 < errors[0] / errors[2] < 20


def test_distribution_changes_match_first_order_at_small_steps(model64):
    model, tok = model64
    pos = explain_step(model, tok, UPDATE, PROBES, loss="dpo", rule=OptimizerRule("sgd", 1e-3)).positions
    for name in ("argmax_prob", "entropy"):
        pred, act = pos[f"{name}_predicted"], pos[f"{name}_actual"]
        assert ((pred - act) ** 2).sum() ** 0.5 < 0.05 * (act**2).sum() ** 0.5
    assert (pos["top_gain_predicted"].str[0] == pos["top_gain_actual"].str[0]).mean() > 0.9
    assert pos.groupby(["example_id", "response_type"]).size().tolist() == \
        pos.groupby(["example_id", "response_type"])["position"].max().add(1).tolist()


def test_kernel_is_the_same_for_every_optimizer(model64):
    """kernel = ⟨∇ log π(y_o), −∇L⟩ depends on the update and the observation, not on the optimizer."""
    model, tok = model64
    sgd = explain_step(model, tok, UPDATE, PROBES, loss="dpo", rule=OptimizerRule("sgd", 1e-3)).changes
    adam = explain_step(model, tok, UPDATE, PROBES, loss="dpo", rule=OptimizerRule("adam", 1e-3)).changes
    # (Llama's eager attention takes its softmax in float32: two exact routes differ by up to ~1e-6 relative)
    torch.testing.assert_close(torch.tensor(adam["kernel"].values), torch.tensor(sgd["kernel"].values), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(torch.tensor((sgd["kernel"] * 1e-3).values), torch.tensor(sgd["predicted"].values))


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_chunking_does_not_change_results(request, fixture):
    """One batch for all probes vs one response per batch. Exact to float64 rounding on GPT-2; on
    Llama only to its float32 attention softmax, whose sums round differently when the cached
    prompt's padding moves the response keys (the `actual` column shows ~1e-8 absolute)."""
    model, tok = request.getfixturevalue(fixture)
    model.double()
    big = explain_step(model, tok, UPDATE, PROBES, loss="dpo", chunk_tokens=4096)
    small = explain_step(model, tok, UPDATE, PROBES, loss="dpo", chunk_tokens=8)
    tol = dict(rtol=1e-9, atol=1e-12) if fixture == "tiny_gpt2" else dict(rtol=1e-6, atol=1e-7)
    for col in ("predicted", "actual", "kernel", "argmax_mass_actual"):
        torch.testing.assert_close(torch.tensor(small.changes[col].values), torch.tensor(big.changes[col].values),
                                   **tol)
    assert list(big.changes["example_id"]) == ["u0"] * 3 + ["p1"] * 2 + ["p2"]  # probe-file order kept
    assert big.positions[["example_id", "response_type", "position"]].equals(
        small.positions[["example_id", "response_type", "position"]])  # positions too, response by response


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("budget", [1, 4096])
@pytest.mark.parametrize("fused", [True, False])
def test_prompt_sharing_equals_full_sequences(request, fixture, budget, fused):
    """Logits and their jvp at every response position: each prompt once with its responses on its
    KV cache (dual tensors inside jvp) vs every (prompt + response) in full. Budget 1 puts one response
    in each batch, 4096 all of them in one; `fused` False is the route of models whose logits are
    post-processed (the whole model's forward, no separate LM head)."""
    model, tok = request.getfixturevalue(fixture)
    model.double()
    probes = [*PROBES, Probe("short", "H", {"chosen": " Hi there.", "rejected": ""})]  # 1-token prompt, EOS-only reply
    obs = probe_sequences(probes, tok, None, None)
    assert obs.starts[-1] == 1 and len(obs.ids[-1]) == 2
    split = split_model(model)
    was, split.fused = split.fused, fused
    params = {f"lm.{n}": p.detach() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    tangent = {n: torch.randn_like(p) for n, p in params.items()}
    full, shared = ResponseLogits(model), SharedPromptLogits(model)
    tol = 1e-12 if fixture == "tiny_gpt2" else 1e-6  # relative, in norm (Llama: float32 softmax, see above)
    try:
        with explain_mode(model), torch.no_grad():
            pad = can_pad_prompts(model)  # float64 eager: no (tests/test_attention_variants.py mixes lengths in float32)
            batches = list(probe_batches(obs, budget, pad=pad))
            if budget == 1:
                assert len(batches) == len(obs.ids)
            else:  # each prompt's responses together, and prompts together where they may be padded
                assert sorted(len(part) for groups in batches for part in groups) == [1, 2, 2, 3]
                assert max(map(len, batches)) > 1 if pad else all(len({obs.starts[p[0]] for p in b}) == 1 for b in batches)
            for groups in batches:
                batch = probe_batch(obs, groups, budget, model.device)
                z, dz = torch.func.jvp(lambda p: torch.func.functional_call(shared, p, (batch,)), (params,), (tangent,))
                ids, mask, rows, cols, labels, _ = full_inputs(obs, batch.index, model.device)
                z_ref, dz_ref = torch.func.jvp(lambda p: torch.func.functional_call(full, p, (ids, mask, rows, cols)),
                                               (params,), (tangent,))
                assert torch.equal(batch.labels, labels)
                assert (z - z_ref).norm() < tol * z_ref.norm() and (dz - dz_ref).norm() < tol * dz_ref.norm()
    finally:
        split.fused = was


def test_model_is_left_as_it_was(model64):
    model, tok = model64
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    attn = model.config._attn_implementation
    explain_step(model, tok, UPDATE, PROBES, loss="dpo", rule=OptimizerRule("adam", 1e-2))
    assert model.training and model.config._attn_implementation == attn
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_reference_model_sets_the_margin(model64):
    model, tok = model64
    same = explain_step(model, tok, UPDATE, PROBES[:1], loss="dpo").summary["update"]["loss"]
    assert same == pytest.approx(torch.log(torch.tensor(2.0)).item())
    other = type(model)(model.config).double().eval()
    shifted = explain_step(model, tok, UPDATE, PROBES[:1], loss="dpo", ref_model=other).summary["update"]["loss"]
    assert abs(shifted - same) > 1e-3


def test_works_on_gpt2(tiny_gpt2):
    model, tok = tiny_gpt2
    got = explain_step(model.double(), tok, UPDATE, PROBES, loss="sft", rule=OptimizerRule("sgd", 1e-3))
    assert got.summary["relative_error"] < 0.05 and got.summary["rank_correlation"] > 0.9


def test_bad_inputs_give_one_line_errors(model64):
    model, tok = model64
    no_rejected = [Preference("x", "Hi", "Hello", None)]
    with pytest.raises(LearndynError, match="'x' has no rejected response"):
        explain_step(model, tok, no_rejected, PROBES, loss="dpo")
    too_long = [Preference("long", "Hi", "x q " * 400, "no")]
    with pytest.raises(LearndynError, match="'long' .* longer than the model's context of 512"):
        explain_step(model, tok, too_long, PROBES, loss="sft")
    with pytest.raises(LearndynError, match="no probe responses"):
        explain_step(model, tok, UPDATE, PROBES, types=["greedy"])
    bigger = make_tiny_tokenizer()
    bigger.add_tokens([f"<extra{i}>" for i in range(20)])
    with pytest.raises(LearndynError, match="tokenizer has 340 tokens but the model embeds only 320"):
        explain_step(model, bigger, UPDATE, PROBES)


def _sorted(frame):
    return frame.sort_values(["example_id", "response_type", "position"], kind="stable").reset_index(drop=True)


def test_parquet_sink_file_equals_the_in_memory_table(model64, tmp_path):
    """Streamed to disk or kept in memory: the same rows, columns and types, and the same totals."""
    import pandas as pd
    import pyarrow.parquet as pq

    model, tok = model64
    rule = OptimizerRule("adamw", 1e-3, weight_decay=0.01)
    memory = explain_step(model, tok, UPDATE, PROBES, loss="dpo", rule=rule, chunk_tokens=8)
    path = tmp_path / "positions.parquet"
    streamed = explain_step(model, tok, UPDATE, PROBES, loss="dpo", rule=rule, chunk_tokens=8, positions_out=path)
    assert streamed.positions == path
    memory.positions.to_parquet(tmp_path / "memory.parquet", index=False)
    on_disk, reference = pd.read_parquet(path), pd.read_parquet(tmp_path / "memory.parquet")
    assert len(on_disk) == len(reference) == memory.summary["positions"] == streamed.summary["positions"]
    pd.testing.assert_frame_equal(_sorted(on_disk), _sorted(reference), check_exact=True)
    assert pq.read_schema(path).equals(pq.read_schema(tmp_path / "memory.parquet"), check_metadata=False)
    pd.testing.assert_frame_equal(streamed.changes, memory.changes, check_exact=True)
    without_timings = lambda s: {k: v for k, v in s.items() if k != "timings"}  # noqa: E731
    assert without_timings(streamed.summary) == without_timings(memory.summary)


def test_parquet_sink_writes_a_row_group_per_chunk(model64, tmp_path):
    """Bounded memory: chunks reach the file as they finish, one row group each, never all at once."""
    import pyarrow.parquet as pq

    from learndyn.dynamics.positions import ParquetPositions

    model, tok = model64
    sink = ParquetPositions(tmp_path / "positions.parquet")
    seen = []
    add = sink.add
    sink.add = lambda rows: (seen.append(len(rows)), add(rows))[-1]
    got = explain_step(model, tok, UPDATE, PROBES, loss="sft", chunk_tokens=8, positions_out=sink)
    meta = pq.ParquetFile(got.positions).metadata
    assert meta.num_row_groups == len(seen) == sink.row_groups > 1
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == seen
    assert max(seen) < got.summary["positions"] == meta.num_rows
    # each response whole in one row group, in position order
    frame = pq.read_table(got.positions).to_pandas()
    for _, rows in frame.groupby(["example_id", "response_type"], sort=False):
        assert rows.index.tolist() == list(range(rows.index[0], rows.index[0] + len(rows)))
        assert rows["position"].tolist() == list(range(len(rows)))


def test_failure_mid_run_leaves_no_partial_file(model64, tmp_path, monkeypatch):
    """An error after some chunks were written removes the temporary file and keeps an old result intact."""
    import learndyn.dynamics.step as explain_module

    model, tok = model64
    path = tmp_path / "positions.parquet"
    path.write_bytes(b"old result")
    real, calls = explain_module._explain_batch, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(explain_module, "_explain_batch", failing)
    with pytest.raises(RuntimeError, match="boom"):
        explain_step(model, tok, UPDATE, PROBES, loss="sft", chunk_tokens=8, positions_out=path)
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["positions.parquet"]
    assert path.read_bytes() == b"old result"


def test_duplicate_probe_ids_are_refused(model64):
    model, tok = model64
    twice = [*PROBES, Probe("p1", "Human: Hi. Assistant:", {"chosen": " Hello."})]
    with pytest.raises(LearndynError, match="probe id 'p1' appears more than once"):
        explain_step(model, tok, UPDATE, twice)


def test_bf16_model_agrees_with_float32(tiny_llama):
    """A bf16 model's explanation tracks the float32 one: Δz per cause, their sum and the softmax
    statistics are taken in float32, so only the bf16 forward passes (and the bf16 Δθ) differ."""
    model, tok = tiny_llama
    rule = OptimizerRule("sgd", 1e-2)
    ref = explain_step(model, tok, UPDATE, PROBES, loss="dpo", rule=rule).changes
    half = explain_step(model.to(torch.bfloat16), tok, UPDATE, PROBES, loss="dpo", rule=rule).changes
    for col in ("logp_sum", "predicted", "kernel"):
        got, want = torch.tensor(half[col].values), torch.tensor(ref[col].values)
        assert got.dtype == torch.float64
        assert (got - want).norm() < 0.05 * want.norm(), col
    assert (half["predicted"] - half["predicted_from_chosen"] - half["predicted_from_rejected"]).abs().max() < \
        1e-5 * half["predicted"].abs().max()
