"""The report layer: arms and chaining, the paper's signatures, figures and the HTML page.

Runs are synthetic: each response type's mean logp_sum follows a given list of values per step
(two examples sit at value ± 0.5), so each signature can be made to hold or fail on purpose.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from learndyn.errors import LearndynError
from learndyn.report import build_report, evaluate_signatures, figures
from learndyn.report.arms import load_arms
from learndyn.training.runs import write_config, write_shard

METRIC_FILL = {"logp_mean": -1.0, "n_tokens": 10, "argmax_prob": 0.5, "entropy": 1.0, "residual_norm": 0.5,
               "truncated": False}


def make_run(path: Path, phase: str, curves: dict[str, list[float]], *, epochs: float = 1.0,
             argmax: list[float] | None = None, **config) -> Path:
    """A run folder whose per-type mean logp_sum at step s is curves[type][s]; argmax_logp of chosen
    follows `argmax` (else logp_sum + 1)."""
    steps = len(next(iter(curves.values())))
    write_config(path, {"phase": phase, "extend": False, "model": "tiny", "from": None, "learning_rate": 1e-5,
                        "epochs": epochs, **({"loss": "sigmoid", "beta": 0.1} if phase == "dpo" else {}),
                        **config})
    for step in range(steps):
        rows = []
        for rtype, values in curves.items():
            for ex, delta in (("ex0", -0.5), ("ex1", 0.5)):
                am = argmax[step] if argmax is not None and rtype == "chosen" else values[step] + 1
                rows.append({"phase": phase, "step": step * 5, "epoch": epochs * step / (steps - 1),
                             "example_id": ex, "response_type": rtype, "logp_sum": values[step] + delta,
                             "argmax_logp": am + delta, **METRIC_FILL})
        write_shard(path, pd.DataFrame(rows), phase, step * 5)
    return path


def paper_like(tmp_path: Path, name: str = "base", extend: bool = False,
               dpo: dict[str, list[float]] | None = None) -> tuple[Path, Path]:
    """An SFT run and a DPO run from it that show every behaviour the paper reports."""
    sft = make_run(tmp_path / f"{name}-sft", "sft", {
        "chosen": [-50, -40, -30], "rejected": [-60, -58, -55], "other_train": [-70, -65, -62],
        "shuffled_chosen": [-90, -95, -99], "shuffled_other": [-95, -97, -100], "greedy": [-10, -12, -14],
    }, epochs=2.0, extend=extend)
    curves = dpo or {"chosen": [-30, -28, -35], "rejected": [-55, -70, -90]}
    dpo_run = make_run(tmp_path / f"{name}-dpo", "dpo", curves, argmax=[-8, -6, -3], **{"from": str(sft)})
    return sft, dpo_run


def held(signatures: list[dict], name: str):
    found = [s["held"] for s in signatures if s["name"] == name]
    assert len(found) == 1, f"{name} not among {[s['name'] for s in signatures]}"
    return found[0]


# The statistics of the signatures are tested in test_signatures.py on in-memory arms; here they are
# read from run folders (two examples each, so every interval is a point and verdicts are sure).
def test_signatures_hold_on_paper_like_runs(tmp_path):
    sigs = evaluate_signatures(list(paper_like(tmp_path)))
    for name in ("sft_raises_chosen", "sft_raises_other_train", "sft_lowers_shuffled", "dpo_lowers_rejected",
                 "dpo_chosen_rises_then_falls", "dpo_squeezing"):
        assert held(sigs, f"{name} [baseline]") is True, name
    assert held(sigs, "extended_dpo_lowers_less") is None  # one arm only
    result = next(s for s in sigs if s["name"] == "sft_raises_chosen [baseline]")
    assert result["numbers"] == {"chosen change": 20.0}
    assert result["estimates"][0] | {"verdict": "held"} == {"quantity": "chosen change", "claim": "> 0", "effect": 20.0,
                                                           "low": 20.0, "high": 20.0, "level": 0.95, "verdict": "held"}


def test_signatures_fail_on_contrary_runs(tmp_path):
    sft = make_run(tmp_path / "sft", "sft", {
        "chosen": [-30, -40, -50], "other_train": [-60, -65, -70],
        "shuffled_chosen": [-90, -95, -99], "shuffled_other": [-95, -90, -80],  # one shuffled type rises
    })
    dpo = make_run(tmp_path / "dpo", "dpo", {"chosen": [-50, -45, -40], "rejected": [-60, -55, -50]},
                   argmax=[-3, -6, -8], **{"from": str(sft)})
    sigs = evaluate_signatures([sft, dpo])
    for name in ("sft_raises_chosen", "sft_raises_other_train", "sft_lowers_shuffled", "dpo_lowers_rejected",
                 "dpo_chosen_rises_then_falls", "dpo_squeezing"):
        assert held(sigs, f"{name} [baseline]") is False, name


def test_dpo_lowers_rejected_needs_a_bigger_fall_than_chosen(tmp_path):
    dpo = make_run(tmp_path / "dpo", "dpo", {"chosen": [-30, -40, -50], "rejected": [-60, -62, -65]})
    sigs = evaluate_signatures([dpo])
    assert held(sigs, "dpo_lowers_rejected [baseline]") is False  # rejected fell 5, chosen fell 20
    assert held(sigs, "dpo_chosen_rises_then_falls [baseline]") is False  # it only fell


def test_missing_phase_or_type_is_not_applicable(tmp_path):
    sft = make_run(tmp_path / "sft", "sft", {"chosen": [-50, -40], "shuffled_other": [-90, -95]})
    sigs = evaluate_signatures([sft])
    assert held(sigs, "sft_raises_chosen [baseline]") is True
    assert held(sigs, "sft_lowers_shuffled [baseline]") is True  # the one shuffled type present decides
    assert held(sigs, "sft_raises_other_train [baseline]") is None
    for name in ("dpo_lowers_rejected", "dpo_chosen_rises_then_falls", "dpo_squeezing", "dpo_lowers_most_others"):
        assert held(sigs, f"{name} [baseline]") is None
    assert all(s["numbers"] == {} and s["verdict"] == "not applicable" and "not applicable" in s["description"]
               for s in sigs if s["held"] is None)


GENTLE_DPO = {"chosen": [-30, -29, -31], "rejected": [-55, -60, -65]}  # falls less than paper_like's DPO


@pytest.mark.parametrize("dpo, expected", [(GENTLE_DPO, True), ({"chosen": [-30, -40, -50],
                                                                  "rejected": [-55, -80, -95]}, False)])
def test_extended_is_compared_on_its_dpo_changes(tmp_path, dpo, expected):
    base = paper_like(tmp_path, "base")
    ext = paper_like(tmp_path, "ext", extend=True, dpo=dpo)
    sigs = evaluate_signatures([*ext, *base])  # given order does not matter
    assert held(sigs, "extended_dpo_lowers_less") is expected
    assert held(sigs, "sft_raises_chosen [extended]") is True


def test_chained_dpo_continues_after_the_sft_epochs(tmp_path):
    sft, dpo = paper_like(tmp_path)
    [arm] = load_arms([sft, dpo])
    assert [s.phase for s in arm.segments] == ["sft", "dpo"]
    chosen = arm.series("chosen")
    sft_x, dpo_x = chosen[chosen.phase == "sft"]["x"], chosen[chosen.phase == "dpo"]["x"]
    assert sft_x.tolist() == [0.0, 1.0, 2.0]
    assert dpo_x.tolist() == [2.0, 2.5, 3.0]  # the DPO run's epochs 0..1, offset by the SFT's last epoch
    assert arm.boundaries() == [(2.0, "SFT | DPO")]
    # The divider is drawn in every panel, at the boundary.
    fig = figures.draw([arm])
    assert len(fig.axes) == 5  # chosen, rejected, other (other_train), shuffled, argmax / greedy
    for ax in fig.axes:
        assert any(list(line.get_xdata()) == [2.0, 2.0] for line in ax.lines)
        assert any(t.get_text() == "SFT | DPO" for t in ax.texts)


def test_dpo_run_chains_to_its_sft_run_found_on_disk(tmp_path):
    sft, dpo = paper_like(tmp_path)
    [arm] = load_arms([dpo])
    assert arm.runs == [sft, dpo]
    [arm] = load_arms([sft.resolve(), dpo])  # the same run given by another spelling of its path
    assert len(arm.segments) == 2


def test_dpo_run_chains_from_a_checkpoint_or_a_relative_path(tmp_path, monkeypatch):
    sft, _ = paper_like(tmp_path)
    ckpt = make_run(tmp_path / "from-ckpt", "dpo", {"chosen": [-30, -35]},
                    **{"from": str(sft / "checkpoints" / "final")})
    (sft / "checkpoints" / "final").mkdir(parents=True)
    assert load_arms([ckpt])[0].runs == [sft, ckpt]
    rel = make_run(tmp_path / "from-rel", "dpo", {"chosen": [-30, -35]}, **{"from": "runs/base-sft"})
    (tmp_path / "runs").mkdir()
    sft.rename(tmp_path / "runs" / "base-sft")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no runs/base-sft here: matched to a given run by its tail
    assert [s.phase for s in load_arms([tmp_path / "runs" / "base-sft", rel])[0].segments] == ["sft", "dpo"]
    assert [s.phase for s in load_arms([rel])[0].segments] == ["dpo"]  # a model id or a lost run: no chain


def test_baseline_and_extended_overlay(tmp_path):
    base, ext = paper_like(tmp_path, "base"), paper_like(tmp_path, "ext", extend=True)
    arms = load_arms([*ext, *base])
    assert [(a.label, a.kind) for a in arms] == [("baseline", "baseline"), ("extended", "extended")]
    fig = figures.draw(arms)
    chosen_panel = fig.axes[0]
    assert chosen_panel.get_title() == "chosen and its rephrases"
    styles = {line.get_linestyle() for line in chosen_panel.lines if line.get_color() == "C0"}
    assert styles == {"-", "--"}  # solid baseline, dashed extended
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"baseline", "extended"}


def test_two_arms_of_one_kind_are_named_by_folder(tmp_path):
    arms = load_arms([paper_like(tmp_path, "a")[1], paper_like(tmp_path, "b")[1]])
    assert [a.label for a in arms] == ["a-dpo", "b-dpo"]


def test_report_is_self_contained(tmp_path):
    runs = [*paper_like(tmp_path, "base"), *paper_like(tmp_path, "ext", extend=True, dpo=GENTLE_DPO)]
    path = build_report(runs)
    out = runs[-1]
    assert path == out / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2
    assert "✓ held" in page and "sft_raises_chosen [extended]" in page
    assert "chosen change = 20 [20, 20] (&gt; 0)" in page  # effect [interval] (claim)
    assert "learning_rate" in page and "sigmoid" in page  # the settings table
    for png in (out / "figures").glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["logp_change.png", "logp_sum.png"]
    stored = json.loads((out / "signatures.json").read_text(encoding="utf-8"))
    assert stored == evaluate_signatures(runs)
    assert held(stored, "extended_dpo_lowers_less") is True


def test_report_goes_to_out(tmp_path):
    sft = make_run(tmp_path / "sft", "sft", {"chosen": [-50, -40]})
    path = build_report([sft], out=tmp_path / "elsewhere")
    assert path == tmp_path / "elsewhere" / "report.html" and path.is_file()
    assert not (sft / "report.html").exists()


def test_run_without_metrics_is_named_in_the_error(tmp_path):
    empty = tmp_path / "empty-run"
    write_config(empty, {"phase": "sft"})
    with pytest.raises(LearndynError, match="empty-run"):
        build_report([empty])
    with pytest.raises(LearndynError, match="nowhere"):
        build_report([tmp_path / "nowhere"])


def test_report_never_imports_torch(tmp_path):
    sft = make_run(tmp_path / "sft", "sft", {"chosen": [-50, -40]})
    code = ("import sys, learndyn.report as r; r.build_report([sys.argv[1]]); "
            "heavy = [m for m in ('torch', 'transformers', 'trl') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code, str(sft)], check=True, timeout=120)


def on_policy_arm(tmp_path: Path, sft: Path, argmax: list[float], chosen: list[float]) -> Path:
    """A DPO run continuing `sft` on-policy, with the given chosen logp_sum and argmax_logp curves."""
    return make_run(tmp_path / "on-dpo", "dpo", {"chosen": chosen, "rejected": [-55, -60, -65]}, argmax=argmax,
                    on_policy=True, **{"from": str(sft)})


@pytest.mark.parametrize("argmax, chosen, expected", [
    ([-8, -7.5, -7], [-30, -29, -29], True),   # argmax rises by 1 (off: 5), chosen rises (off: falls 5)
    ([-8, -4, 0], [-30, -29, -29], False),     # argmax rises more than off-policy
    ([-8, -7.5, -7], [-30, -35, -40], False),  # chosen falls more than off-policy
])
def test_on_policy_arm_is_labelled_and_compared_with_the_off_policy_arm(tmp_path, argmax, chosen, expected):
    sft, off = paper_like(tmp_path, "base")
    on = on_policy_arm(tmp_path, sft, argmax, chosen)
    arms = load_arms([off, on])
    assert [(a.label, a.on_policy) for a in arms] == [("baseline", False), ("baseline, on-policy DPO", True)]
    signatures = evaluate_signatures([off, on])
    assert held(signatures, "on_policy_squeezes_less") is expected
    numbers = next(s["numbers"] for s in signatures if s["name"] == "on_policy_squeezes_less")
    assert numbers["chosen argmax_logp change, on - off"] == pytest.approx(argmax[-1] - argmax[0] - 5.0)
    assert numbers["chosen change, on - off"] == pytest.approx(chosen[-1] - chosen[0] + 5.0)


def test_on_policy_signature_only_with_an_on_policy_arm(tmp_path):
    names = [s["name"] for s in evaluate_signatures(list(paper_like(tmp_path)))]
    assert "on_policy_squeezes_less" not in names
    sft, _ = paper_like(tmp_path, "base")
    lone = evaluate_signatures([on_policy_arm(tmp_path, sft, [-8, -7, -6], [-30, -30, -30])])
    assert held(lone, "on_policy_squeezes_less") is None  # no off-policy arm to compare with


def test_extended_comparison_ignores_the_on_policy_arm(tmp_path):
    sft, off = paper_like(tmp_path, "base")
    on = on_policy_arm(tmp_path, sft, [-8, -7, -6], [100, 100, 100])  # far above anything: must not be picked
    ext = paper_like(tmp_path, "ext", extend=True, dpo=GENTLE_DPO)[1]  # falls less than `off`, more than `on`
    assert held(evaluate_signatures([on, off, ext]), "extended_dpo_lowers_less") is True


def test_extra_sections_go_into_the_page_before_the_signatures(tmp_path):
    page = build_report(list(paper_like(tmp_path)), tmp_path / "out",
                        sections=[("Win rates", "<p>a <b>table</b></p>")]).read_text(encoding="utf-8")
    assert "<h2>Win rates</h2>\n<p>a <b>table</b></p>" in page
    assert page.index("<h2>Arms</h2>") < page.index("<h2>Win rates</h2>") < page.index("<h2>Signatures</h2>")


def test_run_names_with_dollar_signs_are_drawn_as_written(tmp_path):
    """matplotlib reads `$...$` as mathtext: `$\\frac$` crashed the report, `$x$` turned italic."""
    runs = [make_run(tmp_path / name, "sft", {"chosen": [-50, -40]}) for name in ("a$\\frac$", "b$x$")]
    fig = figures.draw(load_arms(runs))
    fig.canvas.draw()  # where mathtext is parsed
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"a\\$\\frac\\$", "b\\$x\\$"}  # \\$ shows a $
    assert build_report(runs).is_file()
