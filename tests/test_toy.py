"""The squeezing toy: the closed-form gradient, the lemma's three claims on random models, the three
initialisations, and the `learndyn squeeze` recipe's files and numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from learndyn.dynamics import toy
from learndyn.errors import LearndynError
from learndyn.experiments.squeeze import CASES, get_case, run_case, run_squeeze, table_rows
from learndyn.report.squeeze_figures import LINEAR_RANKS, draw_case

DRAWS = 200


def random_model(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x (d,) and W (d, V) of random size, with logit scales from nearly flat to very peaked."""
    dim = int(torch.randint(2, 9, (), generator=g))
    n_classes = int(torch.randint(3, 80, (), generator=g))
    scale = float(10 ** torch.empty(()).uniform_(-1.5, 0.7, generator=g))
    x = torch.randn(dim, generator=g, dtype=torch.float64)
    W = scale * torch.randn(dim, n_classes, generator=g, dtype=torch.float64)
    return x, W


def log_uniform(g: torch.Generator, low: float, high: float) -> float:
    return float(10 ** torch.empty(()).uniform_(math.log10(low), math.log10(high), generator=g))


@pytest.mark.parametrize("positive, negative", [(3, None), (None, 5), (3, 5), (4, 4)])
def test_closed_form_gradient_equals_autograd(positive, negative):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, generator=g, dtype=torch.float64)
    W = torch.randn(4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    logp = (x @ W).log_softmax(-1)  # (V,); with y⁺ = ȳ the two terms cancel and so must the step
    objective = (logp[positive] if positive is not None else 0) - (logp[negative] if negative is not None else 0)
    (grad,) = torch.autograd.grad(objective, W)
    W = W.detach()
    torch.testing.assert_close(toy.sgd_step(x, W, positive, negative, lr=0.3), W + 0.3 * grad, rtol=1e-12, atol=1e-12)


def test_closed_form_gradient_of_a_target_distribution_equals_autograd():
    """The peaky initialisation's step: ∇_W Σ t_v log π(v) for a multi-hot target t."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, generator=g, dtype=torch.float64)
    W = torch.randn(4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(12, dtype=torch.float64)
    target[[1, 5, 7]] = 1 / 3
    (grad,) = torch.autograd.grad(((x @ W).log_softmax(-1) * target).sum(), W)
    torch.testing.assert_close(toy.objective_grad(x, W.detach(), target), grad, rtol=1e-12, atol=1e-12)


def test_negative_step_lowers_the_pushed_class():
    g = torch.Generator().manual_seed(2)
    for draw in range(DRAWS):
        x, W = random_model(g)
        neg = int(torch.randint(W.shape[1], (), generator=g))
        p0 = toy.probs(x, W)
        p1 = toy.probs(x, toy.sgd_step(x, W, None, neg, log_uniform(g, 0.01, 5.0)))
        assert p1[neg] < p0[neg], f"draw {draw}"


def test_negative_step_raises_the_argmax_of_the_other_classes():
    """Holds for any ȳ, even the argmax itself (then the runner-up gains)."""
    g = torch.Generator().manual_seed(3)
    for draw in range(DRAWS):
        x, W = random_model(g)
        neg = int(torch.randint(W.shape[1], (), generator=g))
        p0 = toy.probs(x, W)
        p1 = toy.probs(x, toy.sgd_step(x, W, None, neg, log_uniform(g, 0.01, 5.0)))
        others = p0.clone()
        others[neg] = -1.0
        star = int(others.argmax())
        assert p1[star] > p0[star], f"draw {draw}: y* = {star}, ȳ = {neg}"


def test_negative_step_gain_grows_with_probability():
    """π'_v / π_v over v ≠ ȳ is non-decreasing in π_v: the rich get richer, the poor poorer."""
    g = torch.Generator().manual_seed(4)
    for draw in range(DRAWS):
        x, W = random_model(g)
        neg = int(torch.randint(W.shape[1], (), generator=g))
        p0 = toy.probs(x, W)
        p1 = toy.probs(x, toy.sgd_step(x, W, None, neg, log_uniform(g, 0.01, 5.0)))
        keep = torch.arange(len(p0)) != neg
        order = p0[keep].argsort()
        ratio = (p1[keep] / p0[keep])[order]
        assert (ratio.diff() >= -1e-9 * ratio[1:]).all(), f"draw {draw}"
        assert ratio[-1] > ratio[0], f"draw {draw}: no class gained more than another"


def test_positive_step_gain_shrinks_with_probability():
    """The mirror image, so the monotonicity test above can tell the two signs apart."""
    g = torch.Generator().manual_seed(5)
    x, W = random_model(g)
    p0 = toy.probs(x, W)
    pos = int(p0.argsort()[len(p0) // 2])
    p1 = toy.probs(x, toy.sgd_step(x, W, pos, None, 1.0))
    keep = torch.arange(len(p0)) != pos
    ratio = (p1[keep] / p0[keep])[p0[keep].argsort()]
    assert (ratio.diff() <= 1e-9 * ratio[1:]).all()
    assert p1[pos] > p0[pos]


def test_both_step_moves_only_the_two_pushed_logits():
    """Σc = 0 for the DPO-like step on one input, so the π terms of the two gradients cancel."""
    g = torch.Generator().manual_seed(6)
    x, W = random_model(g)
    dz = x @ toy.sgd_step(x, W, 0, 1, 0.7) - x @ W
    step = 0.7 * float(x @ x)
    torch.testing.assert_close(dz[:2], torch.tensor([step, -step], dtype=torch.float64))
    assert dz[2:].abs().max() < 1e-12


def test_peaky_init_is_peakier_than_uniform_and_flat_is_flatter():
    n_classes, seeds = 50, 200
    stats = {kind: [] for kind in toy.INITS}  # (entropy, max prob, top-5 mass) per seed
    for seed in range(seeds):
        for kind in toy.INITS:
            g = torch.Generator().manual_seed(seed)
            x = toy.draw_input(4, g)
            p = toy.probs(x, toy.init_weights(kind, x, n_classes, g))
            stats[kind].append((float(toy.entropy(p)), float(p.max()), float(p.topk(5).values.sum())))

    def mean(kind, i):
        return sum(s[i] for s in stats[kind]) / seeds

    assert all(top5 > 0.9 for _, _, top5 in stats["peaky"])  # a few classes hold nearly all the mass
    assert mean("peaky", 0) < mean("uniform", 0) - 0.5
    assert mean("peaky", 1) > mean("uniform", 1)
    assert sum(p[0] < u[0] for p, u in zip(stats["peaky"], stats["uniform"])) >= 0.9 * seeds
    assert all(h > math.log(n_classes) - 0.05 and top < 2 / n_classes for h, top, _ in stats["flat"])
    assert min(h for h, _, _ in stats["flat"]) > max(h for h, _, _ in stats["uniform"])


def test_unknown_init_is_a_user_error():
    with pytest.raises(LearndynError, match="unknown initialisation 'spiky'; valid: uniform, flat, peaky"):
        toy.init_weights("spiky", torch.ones(4, dtype=torch.float64), 10, torch.Generator())


def test_large_vocabulary_negative_step_squeezes_into_the_argmax():
    case = get_case("large-negative")
    assert (case.dim, case.n_classes) == (50, 1000)
    for seed in range(20):
        before, after, n = run_case(case, seed, lr=1.0)
        assert n["argmax_after"]["class"] == n["argmax_before"]["class"]
        assert n["argmax_before"]["prob_after"] > n["argmax_before"]["prob_before"]
        neg = n["pushed"]["negative"]
        assert neg["prob_before"] < 1e-3 and neg["prob_after"] < neg["prob_before"]
        assert n["rose"] < 0.1 * n["n_classes"]  # almost every class falls
        assert n["rose"] == sum(b < a for b, a in zip(before, after))


def test_cases_of_one_init_share_the_starting_model():
    """So the cases of one seed differ only in the update."""
    starts = {name: run_case(get_case(name), 7, 1.0)[0] for name in ("peaky-positive", "peaky-negative", "peaky-both")}
    assert starts["peaky-positive"] == starts["peaky-negative"] == starts["peaky-both"]
    both = run_case(get_case("peaky-both"), 7, 1.0)[2]["pushed"]
    assert both["positive"]["class"] == run_case(get_case("peaky-positive"), 7, 1.0)[2]["pushed"]["positive"]["class"]
    assert both["negative"]["class"] == run_case(get_case("peaky-negative"), 7, 1.0)[2]["pushed"]["negative"]["class"]


def test_run_squeeze_writes_figures_and_consistent_numbers(tmp_path):
    summary = run_squeeze(tmp_path, case="uniform-both", seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distributions.json", "summary.json", "uniform-both.png"]
    assert (tmp_path / "uniform-both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["seed"] == 3 and summary["learning_rate"] == 1.0 and list(summary["cases"]) == ["uniform-both"]

    n = summary["cases"]["uniform-both"]
    dist = json.loads((tmp_path / "distributions.json").read_text())["uniform-both"]
    before, after = dist["before"], dist["after"]
    assert len(before) == len(after) == n["n_classes"] == 50
    assert math.isclose(sum(before), 1.0) and math.isclose(sum(after), 1.0)
    assert n["argmax_before"]["class"] == max(range(50), key=before.__getitem__)
    assert n["argmax_after"]["class"] == max(range(50), key=after.__getitem__)
    for tracked in (n["argmax_before"], n["argmax_after"], *n["pushed"].values()):
        assert tracked["prob_before"] == before[tracked["class"]] and tracked["prob_after"] == after[tracked["class"]]
    pos, neg = n["pushed"]["positive"], n["pushed"]["negative"]
    assert pos["prob_after"] > pos["prob_before"] and neg["prob_after"] < neg["prob_before"]
    assert sorted(before, reverse=True).index(pos["prob_before"]) == 50 // 4  # the documented ranks
    assert sorted(before, reverse=True).index(neg["prob_before"]) == 9 * 50 // 10
    assert n["rose"] == sum(a > b for b, a in zip(before, after))


def test_unknown_case_is_a_user_error(tmp_path):
    with pytest.raises(LearndynError, match="unknown case 'x'; valid: uniform-positive, uniform-negative"):
        run_squeeze(tmp_path, case="x")
    assert not any(tmp_path.iterdir())


def test_table_rows_name_the_classes_and_the_counts():
    summary = {"cases": {name: run_case(get_case(name), 0, 1.0)[2] for name in ("flat-negative", "uniform-positive")}}
    rows = table_rows(summary)
    assert [r["case"] for r in rows] == ["flat-negative", "uniform-positive"]
    flat = summary["cases"]["flat-negative"]
    assert rows[0]["y⁺"] == "—" and rows[0]["ȳ"].startswith(f"{flat['pushed']['negative']['class']}: ")
    assert rows[0]["rose"] == f"{flat['rose']}/50"
    assert "now" in rows[1]["argmax"]  # one SFT step at this rate makes y⁺ the argmax
    assert set(CASES) >= {"uniform-positive", "flat-negative", "peaky-both", "large-negative"} and len(CASES) == 10


def test_figure_marks_a_tail_class_on_the_log_panel_only():
    """With many classes the linear panel shows the top ranks; ȳ in the tail is marked on the log one."""
    before = [0.5] + [0.5 / 299] * 299
    after = [0.6] + [0.4 / 299] * 299
    fig = draw_case(before, after, {"argmax_before": 0, "argmax_after": 0, "negative": 250}, "t")
    lin, log = fig.axes[:2]
    assert lin.get_xlim()[1] < LINEAR_RANKS < 250 < log.get_xlim()[1]
    labels = [t.get_text() for t in log.get_legend().texts]
    assert labels == ["before", "after", "argmax before and after: class 0", "ȳ (pushed down): class 250"]


def test_squeeze_figures_never_import_torch():
    code = ("import sys; from learndyn.report.squeeze_figures import render_case; "
            "png = render_case([0.7, 0.2, 0.1], [0.8, 0.15, 0.05], {'negative': 2}, 't'); "
            "assert png[:4] == b'\\x89PNG'; "
            "heavy = [m for m in ('torch', 'transformers', 'trl') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
