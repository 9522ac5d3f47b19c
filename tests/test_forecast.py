"""forecast: CHES from hidden states, the self term against a real SGD step, the cross term against the
explicit sum of per-pair kernels, the CountSketch against exact inner products. Tiny float64 models."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from learndyn.data import Preference
from learndyn.dynamics.forecast import CountSketch, forecast_pairs
from learndyn.dynamics.sequences import encode_update
from learndyn.dynamics.step import rank_correlation

PAIRS = [
    Preference("p0", "Human: How do I make tea? Assistant:", " Boil the water, then steep.", " I cannot help."),
    Preference("p1", "Human: What is a horseshoe? Assistant:", " A U-shaped metal plate.", " No idea at all, sorry."),
    Preference("p2", "Human: Name a colour. Assistant:", " Blue.", " Blue, I think."),
    Preference("p3", "Human: Is tea hot? Assistant:", " Usually it is served hot.", " Usually it is served cold."),
    Preference("p4", "Human: Count to three. Assistant:", " One, two, three.", " One, two, four."),
]


@pytest.fixture(params=["gpt2", "llama"])
def tiny64(request, tiny_gpt2, tiny_llama):
    model, tokenizer = {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]
    return model.double(), tokenizer


def chosen_logp(model, tokenizer, pref: Preference, side: int = 0) -> torch.Tensor:
    """log π of one side, one plain forward of the whole sequence."""
    seqs = encode_update([pref], tokenizer, pairwise=True, max_length=None)
    ids, start = seqs.ids[side], seqs.starts[side]
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
    return logp[torch.arange(start - 1, len(ids) - 1), x[0, start:]].sum()


def test_ches_is_computed_from_the_last_hidden_states(tiny64):
    model, tokenizer = tiny64
    got = forecast_pairs(model, tokenizer, PAIRS[:2]).pairs.set_index("example_id")
    for pref in PAIRS[:2]:
        sums, lengths = [], []
        seqs = encode_update([pref], tokenizer, pairwise=True, max_length=None)
        for ids, start in zip(seqs.ids, seqs.starts):
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            sums.append(hidden[start - 1: len(ids) - 1].sum(0))  # last prompt token .. second-to-last token
            lengths.append(len(ids) - start)
        plus, minus = sums
        expected = float(plus @ minus - plus @ plus)
        normalized = float(plus @ minus / (lengths[0] * lengths[1]) - plus @ plus / lengths[0] ** 2)
        assert got.loc[pref.example_id, "ches"] == pytest.approx(expected, rel=1e-9)
        assert got.loc[pref.example_id, "ches_normalized"] == pytest.approx(normalized, rel=1e-9)
        assert got.loc[pref.example_id, "n_chosen"] == lengths[0]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_self_predicted_is_the_first_order_change_of_one_sgd_step(tiny64, loss):
    """An SGD step on the pair's own loss (ref = the starting model), taken by torch.optim.SGD on the
    loss written out by hand: the change of log π(y⁺) matches self_predicted to first order."""
    model, tokenizer = tiny64
    lr, beta = 1e-4, 0.1
    predicted = forecast_pairs(model, tokenizer, PAIRS[:3], loss=loss, beta=beta, lr=lr).pairs
    for pref, row in zip(PAIRS[:3], predicted.itertuples()):
        moved = copy.deepcopy(model)
        ref = [chosen_logp(model, tokenizer, pref, side).detach() for side in (0, 1)]
        plus, minus = (chosen_logp(moved, tokenizer, pref, side) for side in (0, 1))
        seqs = encode_update([pref], tokenizer, pairwise=True, max_length=None)
        n_plus, n_minus = (len(ids) - start for ids, start in zip(seqs.ids, seqs.starts))
        if loss == "sigmoid":
            value = -torch.nn.functional.logsigmoid(beta * ((plus - ref[0]) - (minus - ref[1])))
        else:  # TRL's ipo: each log-ratio per completion token
            value = ((plus - ref[0]) / n_plus - (minus - ref[1]) / n_minus - 1 / (2 * beta)) ** 2
        optimizer = torch.optim.SGD(moved.parameters(), lr=lr)
        value.backward()
        optimizer.step()
        actual = float(chosen_logp(moved, tokenizer, pref) - ref[0])
        assert row.logp_chosen == pytest.approx(float(ref[0]), rel=1e-9)
        assert row.self_predicted == pytest.approx(actual, rel=2e-2), (pref.example_id, row.self_predicted, actual)
        assert abs(row.self_predicted) > 1e-6  # not trivially zero


def test_over_a_fresh_lora_adapter_self_predicted_is_one_sgd_step_of_the_adapter(tiny64):
    """What `train dpo --lora` moves: a fresh adapter (B = 0), the base weights frozen. The forecast
    over the peft model must match an SGD step of the adapter alone; over all weights it would not."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny64
    torch.manual_seed(3)
    adapted = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float64 for p in trainable)
    lr, beta, pref = 1e-3, 0.1, PAIRS[0]
    row = forecast_pairs(adapted, tokenizer, [pref], beta=beta, lr=lr).pairs.iloc[0]
    full = forecast_pairs(model, tokenizer, [pref], beta=beta, lr=lr).pairs.iloc[0]

    ref = [chosen_logp(adapted, tokenizer, pref, side).detach() for side in (0, 1)]
    plus, minus = (chosen_logp(adapted, tokenizer, pref, side) for side in (0, 1))
    value = -torch.nn.functional.logsigmoid(beta * ((plus - ref[0]) - (minus - ref[1])))
    value.backward()
    torch.optim.SGD(trainable, lr=lr).step()
    actual = float(chosen_logp(adapted, tokenizer, pref).detach() - ref[0])
    assert row.logp_chosen == pytest.approx(full.logp_chosen, rel=1e-9)  # B = 0: the adapter changes nothing yet
    assert row.self_predicted == pytest.approx(actual, rel=2e-2), (row.self_predicted, actual)
    assert abs(row.self_predicted - full.self_predicted) > 0.1 * abs(full.self_predicted)  # another step


def test_cross_predicted_is_the_sum_of_the_exact_per_pair_kernels(tiny64):
    """Two routes: the second pass dots u_i with the summed gradient G; the exact map stores every u_i
    and g_j. Row sums of the map must equal cross_predicted, its diagonal self_predicted."""
    model, tokenizer = tiny64
    result = forecast_pairs(model, tokenizer, PAIRS, lr=1e-4, cross=True, projection_dim=None)
    frame, kernel = result.pairs, result.kernel
    np.testing.assert_allclose(kernel.sum(axis=1), frame["cross_predicted"], rtol=1e-5)
    np.testing.assert_allclose(np.diag(kernel), frame["self_predicted"], rtol=1e-9)
    most = frame.loc[0, "top_displacers"]
    assert list(most) == [PAIRS[j].example_id for j in np.argsort(kernel[0]) if kernel[0, j] < 0][:3]


def test_others_projected_is_what_one_sgd_step_on_a_pair_does_to_the_other_chosen(tiny64):
    """The map's column sums without the diagonal, read against reality: a real SGD step on pair j
    alone (DPO loss written out, ref = the starting model) changes the other pairs' log π(y⁺) by a
    total that others_projected[j] (exact map) matches to first order; the diagonal is left out."""
    model, tokenizer = tiny64
    lr, beta = 1e-4, 0.1
    frame = forecast_pairs(model, tokenizer, PAIRS, lr=lr, beta=beta, cross=True, projection_dim=None).pairs
    before = [float(chosen_logp(model, tokenizer, pref).detach()) for pref in PAIRS]
    for j in (1, 3):
        moved = copy.deepcopy(model)
        ref = [chosen_logp(model, tokenizer, PAIRS[j], side).detach() for side in (0, 1)]
        plus, minus = (chosen_logp(moved, tokenizer, PAIRS[j], side) for side in (0, 1))
        (-torch.nn.functional.logsigmoid(beta * ((plus - ref[0]) - (minus - ref[1])))).backward()
        torch.optim.SGD(moved.parameters(), lr=lr).step()
        after = [float(chosen_logp(moved, tokenizer, pref).detach()) for pref in PAIRS]
        actual = sum(after[i] - before[i] for i in range(len(PAIRS)) if i != j)
        assert frame.loc[j, "others_projected"] == pytest.approx(actual, rel=2e-2), (j, actual)
        assert abs(actual) > 1e-6


def test_the_sketch_agrees_with_exact_inner_products(tiny64):
    model, tokenizer = tiny64
    exact = forecast_pairs(model, tokenizer, PAIRS, lr=1e-4, cross=True, projection_dim=None).kernel
    sketched = forecast_pairs(model, tokenizer, PAIRS, lr=1e-4, cross=True, projection_dim=16384)
    rho = rank_correlation(pd.Series(sketched.kernel.ravel()), pd.Series(exact.ravel()))
    assert rho > 0.95, rho
    assert sketched.summary["projection_rank_agreement"] > 0.9


def test_the_map_is_the_same_in_tiles_with_unscored_pairs_left_nan():
    from learndyn.dynamics.forecast import _kernel

    gen = torch.Generator().manual_seed(0)
    chosen = [torch.randn(64, generator=gen) for _ in range(7)]
    steps = [torch.randn(64, generator=gen) for _ in range(7)]
    chosen[3] = steps[3] = None  # a pair that was not scored
    tiled = _kernel(chosen, steps, lr=0.5, exact=False, block=2)
    live = [i for i in range(7) if i != 3]
    expected = -0.5 * torch.stack([chosen[i] for i in live]).double() @ torch.stack([steps[j] for j in live]).double().T
    np.testing.assert_allclose(tiled[np.ix_(live, live)], expected.numpy(), rtol=1e-12)
    assert np.isnan(tiled[3]).all() and np.isnan(tiled[:, 3]).all()
    np.testing.assert_allclose(tiled, _kernel(chosen, steps, lr=0.5, exact=False), rtol=1e-12)  # NaN == NaN


def test_count_sketch_is_unbiased_and_seeded():
    shapes = [torch.Size([300, 20]), torch.Size([50])]
    gen = torch.Generator().manual_seed(1)
    x = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    y = [a + 0.5 * torch.randn(a.shape, generator=gen, dtype=torch.float64) for a in x]
    exact = float(sum((a * b).sum() for a, b in zip(x, y)))
    estimates = []
    for seed in range(200):
        sketch = CountSketch(shapes, 256, seed=seed)
        estimates.append(float(sketch(x) @ sketch(y)))
    assert np.mean(estimates) == pytest.approx(exact, rel=0.02)
    again = CountSketch(shapes, 256, seed=3)
    assert torch.equal(again(x), CountSketch(shapes, 256, seed=3, cache_bytes=0)(x))  # cached or drawn again


def test_a_pair_that_cannot_be_scored_is_kept_with_a_note(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    long = Preference("long", "Human: Talk. Assistant:", " tea" * 600, " No.")  # past the 512-token context
    same = Preference("same", "Human: Hi. Assistant:", " Hello.", " Hello.")
    result = forecast_pairs(model, tokenizer, [PAIRS[0], long, same], cross=True)
    frame = result.pairs.set_index("example_id")
    assert frame.loc["long", "note"].startswith("not scored:") and "context of 512" in frame.loc["long", "note"]
    assert np.isnan(frame.loc["long", "self_predicted"]) and np.isnan(result.kernel[1]).all()
    assert "same tokens" in frame.loc["same", "note"] and abs(frame.loc["same", "self_predicted"]) < 1e-9
    assert result.summary["scored"] == 2 and set(result.summary["notes"]) == {"long", "same"}
    blank = Preference("blank", "Human: Hi. Assistant:", "", " Hello.")
    cut = forecast_pairs(model, tokenizer, [PAIRS[0], blank], max_length=64).pairs.set_index("example_id")
    assert cut.loc["blank", "note"] == "not scored: the chosen response is empty"
    assert np.isnan(cut.loc["blank", "ches"]) and np.isfinite(cut.loc["p0", "self_predicted"])


def test_a_file_with_empty_responses_is_forecast_with_them_noted_and_left_out_of_filtered(tmp_path, tiny_folder):
    """Real HH data has blank final turns: the forecast notes them per row (the strict loader would stop
    the whole file) and filtered.jsonl, which `train dpo` reads, leaves them out beside the dropped."""
    import json

    from learndyn.data import load_preferences
    from learndyn.errors import LearndynError
    from learndyn.experiments.forecast import ForecastSettings, run_forecast

    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in PAIRS[:4]]
    rows.insert(2, {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: "})
    rows.append({"prompt": "Human: Say. Assistant:", "chosen": [{"role": "assistant", "content": " "}],
                 "rejected": "No."})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(LearndynError, match=f"{data}:3: field 'rejected' has an empty final assistant turn"):
        load_preferences(str(data))
    summary = run_forecast(ForecastSettings(data=str(data), model=str(tiny_folder), drop_top=25, lr=1e-5),
                           tmp_path / "fc", progress=False)
    frame = pd.read_parquet(tmp_path / "fc" / "forecast.parquet").set_index("example_id")
    assert len(frame) == 6 and summary["scored"] == 4
    assert frame.loc["2", "note"] == "not scored: the rejected response is empty"
    assert frame.loc["5", "note"] == "not scored: the chosen response is empty"
    assert summary["left_out_empty"] == ["2", "5"] and len(summary["dropped"]) == 1
    kept = [p.example_id for p in load_preferences(str(tmp_path / "fc" / "filtered.jsonl"))]  # the strict loader
    assert kept == [e for e in ["0", "1", "3", "4"] if e not in summary["dropped"]]


def test_forecast_command_writes_the_folder_and_drops_the_most_displacing_pairs(tmp_path, tiny_folder):
    import json

    from test_cli import assert_one_error_line, learndyn, read_rows

    from learndyn.data import load_preferences

    out = tmp_path / "fc"
    result = learndyn("forecast", "--data", "example", "--limit", "6", "--model", str(tiny_folder), "--cross",
                      "--projection-dim", "4096", "--drop-top", "34%", "--drop-by", "others_projected", "--lr", "1e-5",
                      "--out", str(out))
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(out / "forecast.parquet")
    assert list(frame["example_id"]) == [p.example_id for p in load_preferences("example", limit=6)]
    assert {"ches", "ches_normalized", "self_predicted", "cross_predicted", "top_displacers"} <= set(frame.columns)
    kernel = np.load(out / "displacement.npy")
    assert kernel.shape == (6, 6)
    np.testing.assert_allclose(frame["others_projected"], kernel.sum(axis=0) - np.diag(kernel))
    summary = json.loads((out / "summary.json").read_text())
    worst = list(frame.sort_values("others_projected")["example_id"][:2])  # 34% of 6 pairs: 2
    assert sorted(summary["dropped"]) == sorted(worst) and summary["dropped_by"] == "others_projected"
    assert "by others_projected" in result.stdout
    kept = [row["example_id"] for row in read_rows(out / "filtered.jsonl")]
    assert kept == [e for e in frame["example_id"] if e not in worst]
    assert [p.example_id for p in load_preferences(str(out / "filtered.jsonl"))] == kept  # train dpo reads it
    page = (out / "forecast.html").read_text()
    assert "Most displacing pairs" in page and "Displacement map" in page and worst[0] in page
    assert "forecast to lower their own chosen" in result.stdout
    assert not (out / "forecast-state.pt").exists()  # a finished forecast leaves no checkpoint
    assert_one_error_line(learndyn("forecast", "--data", "example", "--limit", "6", "--model", str(tiny_folder),
                                   "--out", str(out)), "holds a forecast", "--resume", "--overwrite")
    assert_one_error_line(learndyn("forecast", "--data", "example", "--drop-top", "half", "--out", str(out)),
                          "--drop-top takes a percentage")
    assert_one_error_line(learndyn("forecast", "--data", "example", "--drop-top", "5", "--drop-by", "loss",
                                   "--out", str(out)), "drop_by is one of", "others_projected")
    assert_one_error_line(learndyn("forecast", "--data", "example", "--loss", "sft", "--out", str(out)),
                          "pairwise loss")


def test_drop_top_names_the_most_displacing_end_of_each_score():
    """Predicted changes displace most where lowest, CHES where highest; unscored pairs are never named."""
    from learndyn.experiments.forecast import drop_top

    frame = pd.DataFrame({"example_id": list("abcde"), "ches": [5.0, -1.0, 9.0, np.nan, 0.0],
                          "self_predicted": [0.3, -2.0, 1.0, np.nan, -0.5],
                          "cross_predicted": [-4.0, 2.0, 0.0, np.nan, 1.0]})
    assert drop_top(frame, 40) == ["a", "c"]  # the ranking score: cross_predicted, lowest first
    assert drop_top(frame, 40, "self_predicted") == ["b", "e"]
    assert drop_top(frame, 40, "ches") == ["c", "a"]
    assert drop_top(frame.assign(others_projected=[0.0, -1.0, 2.0, np.nan, -3.0]), 40, "others_projected") == ["e", "b"]
    assert drop_top(frame.drop(columns="cross_predicted"), 10) == ["b"]  # at least one, by self_predicted


def test_drop_by_is_checked_before_the_model_loads():
    from learndyn.errors import LearndynError
    from learndyn.experiments.forecast import ForecastSettings

    assert ForecastSettings(data="d", cross=True, drop_top=10, drop_by="others_projected").drop_by == "others_projected"
    for bad, message in ((dict(drop_top=10, drop_by="others"), "drop_by is one of"),
                         (dict(drop_top=10, drop_by="others_projected"), "pass --cross"),
                         (dict(drop_by="ches"), "pass --drop-top too")):
        with pytest.raises(LearndynError, match=message):
            ForecastSettings(data="d", **bad)


def test_forecast_lora_takes_gradients_over_a_fresh_adapter(tmp_path, tiny_folder):
    import json

    from test_cli import learndyn

    out = tmp_path / "fc"
    result = learndyn("forecast", "--data", "example", "--limit", "3", "--model", str(tiny_folder), "--lora",
                      "--lora-r", "2", "--lora-targets", "q_proj,v_proj", "--lr", "1e-4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    hidden, layers = 32, 2  # the tiny Llama: q and v are 32 -> 32; each adapter holds r·(in + out)
    assert summary["parameters"] == layers * 2 * 2 * (hidden + hidden)
    assert summary["settings"]["lora"] is True and summary["settings"]["lora_r"] == 2
    assert f"over the {summary['parameters']:,} parameters of a fresh LoRA adapter" in result.stdout
    assert pd.read_parquet(out / "forecast.parquet")["self_predicted"].abs().min() > 0
    bad = learndyn("forecast", "--data", "example", "--limit", "3", "--model", str(tiny_folder), "--lora",
                   "--lora-targets", "nope", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr  # after transformers' weight-loading bar:
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --lora-targets nope:") and "linear modules here" in last, last


@pytest.mark.parametrize("where", ["pass_1", "pass_2"])
def test_an_interrupted_forecast_resumes_to_the_same_result(tiny_gpt2, tmp_path, monkeypatch, where):
    import learndyn.dynamics.forecast as forecast

    model, tokenizer = tiny_gpt2
    options = dict(lr=1e-4, cross=True, projection_dim=512)
    clean = forecast_pairs(model, tokenizer, PAIRS, **options)
    checkpoint = tmp_path / "state.pt"
    name = "pair_gradients" if where == "pass_1" else "_chosen_gradient"
    real, calls, real_pairs = getattr(forecast, name), [], forecast.pair_gradients

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(forecast, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        forecast_pairs(model, tokenizer, PAIRS, checkpoint=checkpoint, every=100, **options)
    monkeypatch.setattr(forecast, name, real)
    assert checkpoint.is_file()  # saved on the interruption, not only every 100 pairs
    redone = []
    monkeypatch.setattr(forecast, "pair_gradients", lambda *a, **k: redone.append(1) or real_pairs(*a, **k))
    resumed = forecast_pairs(model, tokenizer, PAIRS, checkpoint=checkpoint, **options)
    assert len(redone) == (len(PAIRS) - 2 if where == "pass_1" else 0)  # finished pairs are not redone
    pd.testing.assert_frame_equal(resumed.pairs, clean.pairs, check_exact=False, rtol=1e-6)
    np.testing.assert_allclose(resumed.kernel, clean.kernel, rtol=1e-6)
    with pytest.raises(Exception, match="other settings or pairs"):
        forecast_pairs(model, tokenizer, PAIRS[:4], checkpoint=checkpoint, **options)
