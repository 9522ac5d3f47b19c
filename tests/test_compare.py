"""`learndyn compare` end to end on a tiny random model: both arms trained alike, every checkpoint's
answers judged pairwise, summary.json agreeing with the verdict files, and resume reusing exactly
the parts whose inputs did not change."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import learndyn.evaluation.responses as responses_module
import learndyn.training.recipes as recipes
from learndyn.errors import LearndynError
from learndyn.responses import read_responses
from learndyn.experiments.compare import PAIRS, CompareSettings, compare_settings, run_compare
from learndyn.data import load_preferences
from learndyn.judging import read_verdicts
from learndyn.models import load_model
from learndyn.probes.files import Probe
from learndyn.scoring import encode_probes, score_plain
from learndyn.training.runs import read_metrics

CHECKPOINTS = ("baseline/sft", "baseline/dpo", "extended/sft", "extended/dpo")


def tiny_settings(folder: Path, out: Path, **changes) -> CompareSettings:
    return CompareSettings(data="example", eval_data="example:test", out=str(out), model=str(folder),
                           judge=f"local:{folder}", examples=4, eval_n=3, probes=2, sft_epochs=1, dpo_epochs=1,
                           batch_size=4, every=1, greedy_tokens=6, max_new_tokens=6, **changes)


def count_calls(monkeypatch, module, name: str) -> list:
    """Record the calls of module.name (still calling it) and return the list of first arguments."""
    calls, real = [], getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_compare_trains_both_arms_alike_and_reports_the_judged_win_rates(tiny_folder, tmp_path):
    out = tmp_path / "cmp"
    summary = run_compare(tiny_settings(tiny_folder, out))
    steps = {name: sorted(set(read_metrics(out / name)["step"])) for name in CHECKPOINTS}
    assert steps["baseline/sft"] == [0, 1] and steps["extended/sft"] == [0, 1, 2]  # 4 pairs vs 8 rows, batch 4
    assert steps["baseline/dpo"] == steps["extended/dpo"] == [0, 1]
    assert {n: r["steps"] for n, r in summary["runs"].items()} == {n: s[-1] for n, s in steps.items()}
    answers = {name: read_responses(out / "responses" / f"{name.replace('/', '-')}.jsonl") for name in CHECKPOINTS}
    prompts = [[row["prompt"] for row in rows] for rows in answers.values()]
    assert len(prompts[0]) == 3 and all(p == prompts[0] for p in prompts)  # the same held-out prompts, in order
    assert [(r["a"], r["b"]) for r in summary["win_rates"]] == list(PAIRS)
    for rate in summary["win_rates"]:
        verdicts = read_verdicts(rate["verdicts"])
        assert len(verdicts) == 3 and {v["judge"] for v in verdicts} == {f"local:{tiny_folder}"}
        by_hand = sum({"A": 1.0, "tie": 0.5, "B": 0.0}[v["verdict"]] for v in verdicts) / 3  # no unparsed here
        assert rate["win_rate"] == pytest.approx(by_hand) and rate["pairs"] == 3
        a_texts = [row["response"] for row in answers[rate["a"]]]
        assert [v["response_a"] for v in verdicts] == a_texts
    for name in CHECKPOINTS:
        measures = summary["intrinsic"][name]
        assert measures["n_responses"] == 3 and measures["held_out_n"] == 3
        assert measures["chosen_logp_sum"] < 0
    # each checkpoint's held-out numbers come from its own model, on the first eval_n held-out prompts
    model, tokenizer = load_model(str(out / "extended" / "dpo" / "checkpoints" / "final"))
    held_out = load_preferences("example:test")[:3]
    expected = score_plain(model, encode_probes([Probe(p.example_id, p.prompt, {"chosen": p.chosen}) for p in held_out],
                                                tokenizer, max_length=256))  # compare's max_length
    assert summary["intrinsic"]["extended/dpo"]["chosen_logp_sum"] == pytest.approx(expected["logp_sum"].mean(), rel=1e-4)
    assert len({summary["intrinsic"][name]["chosen_logp_sum"] for name in CHECKPOINTS}) == 4
    on_disk = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert on_disk["win_rates"] == summary["win_rates"] and on_disk["settings"]["eval_n"] == 3
    page = Path(summary["report"]).read_text(encoding="utf-8")
    assert "<h2>Win rates</h2>" in page and "<h2>Intrinsic measures of the answers</h2>" in page
    assert "extended/dpo" in page and (out / "figures" / "win_rates.png").stat().st_size > 1000
    assert {"baseline", "extended"} <= {s["arm"] for s in summary["signatures"]}


def test_resume_reuses_finished_parts_and_redoes_what_a_changed_setting_touches(tiny_folder, tmp_path, monkeypatch):
    settings = tiny_settings(tiny_folder, tmp_path / "cmp")
    first = run_compare(settings)
    with pytest.raises(LearndynError, match="holds an earlier comparison; pass --resume"):
        run_compare(settings)
    with pytest.raises(LearndynError, match="--resume or --overwrite, not both"):
        run_compare(settings, resume=True, overwrite=True)

    trained = count_calls(monkeypatch, recipes, "train")
    generated = count_calls(monkeypatch, responses_module, "generate_responses")
    again = run_compare(settings, resume=True)
    assert trained == [] and generated == []
    assert again["win_rates"] == first["win_rates"] and again["intrinsic"] == first["intrinsic"]

    changed = run_compare(replace(settings, dpo_lr=1e-2), resume=True)  # only the DPO runs depend on it
    assert sorted(Path(s.out).relative_to(tmp_path / "cmp").as_posix() for s in trained) == \
        ["baseline/dpo", "extended/dpo"]
    assert len(generated) == 2
    by_pair = {(r["a"], r["b"]): r for r in changed["win_rates"]}
    sft_pair = first["win_rates"][1]
    assert (sft_pair["a"], sft_pair["b"]) == ("extended/sft", "baseline/sft")
    assert by_pair["extended/sft", "baseline/sft"] == sft_pair  # untouched: reused as it was
    dpo_rows = read_verdicts(by_pair["extended/dpo", "baseline/dpo"]["verdicts"])
    dpo_texts = [row["response"] for row in read_responses(tmp_path / "cmp" / "responses" / "extended-dpo.jsonl")]
    assert [v["response_a"] for v in dpo_rows] == dpo_texts  # judged again on the new answers

    generated.clear()
    fewer = run_compare(replace(settings, dpo_lr=1e-2, eval_n=2), resume=True)  # other held-out prompts
    assert len(generated) == 4 and fewer["held_out_prompts"] == 2  # no answer to the old prompts is reused
    assert all(len(read_verdicts(r["verdicts"])) == 2 for r in fewer["win_rates"])


def test_resume_retrains_a_finished_run_whose_data_file_changed(tiny_folder, tmp_path, caplog):
    """A run that keeps no model (save_model off) is reused too: its finished.yaml says it ended."""
    import learndyn.data
    from learndyn.experiments.compare import train_once
    from learndyn.probes.build import build_probes
    from learndyn.probes.files import write_probes
    from learndyn.training.recipes import TrainSettings

    data = tmp_path / "d.jsonl"
    data.write_bytes((Path(learndyn.data.__file__).parent / "resources" / "example_train.jsonl").read_bytes())
    write_probes(build_probes(learndyn.data.load_preferences("example", limit=2)), tmp_path / "p.jsonl")
    settings = TrainSettings(phase="sft", data=str(data), probes=str(tmp_path / "p.jsonl"), model=str(tiny_folder),
                             out=str(tmp_path / "cmp" / "baseline" / "sft"), limit=4, batch_size=4, epochs=1, every=1,
                             max_length=128, save_model=False)
    run, trained = train_once(settings, resume=False)
    assert trained and not (run / "checkpoints" / "final").exists()
    assert train_once(settings, resume=True) == (run, False)
    data.write_bytes(data.read_bytes().replace(b"four quarts", b"five quarts", 1))  # an edited training pair
    assert train_once(settings, resume=True) == (run, True)
    assert f"{run}: training it again (data: content of {str(data)!r} differs (same path" in caplog.text


def test_bad_held_out_data_fails_before_any_training(tiny_folder, tmp_path):
    with pytest.raises(LearndynError, match="missing.jsonl: file not found"):
        run_compare(replace(tiny_settings(tiny_folder, tmp_path / "cmp"), eval_data=str(tmp_path / "missing.jsonl")))
    assert not (tmp_path / "cmp").exists()


def test_quick_sizes_and_explicit_values():
    quick = compare_settings(True, data="d", eval_data="e", examples=None, dpo_lr=1e-4)
    assert (quick.examples, quick.dpo_epochs, quick.max_new_tokens, quick.dpo_lr) == (16, 1.0, 64, 1e-4)
    full = compare_settings(False, data="d", eval_data="e", examples=100)
    assert (full.examples, full.dpo_epochs, full.max_new_tokens) == (100, 2.0, 96)


def test_on_policy_arm_continues_the_baseline_sft_model_and_is_judged_against_off_policy(tiny_folder, tmp_path):
    from learndyn.experiments.compare import ON_POLICY_PAIRS
    from learndyn.training.runs import read_config

    out = tmp_path / "cmp"
    summary = run_compare(tiny_settings(tiny_folder, out, on_policy=True))
    config = read_config(out / "baseline" / "dpo-on-policy")
    assert config["on_policy"] is True and config["from"] == str(out / "baseline" / "sft")
    assert config["judge"] == f"local:{tiny_folder}"
    assert [(r["a"], r["b"]) for r in summary["win_rates"]][-2:] == list(ON_POLICY_PAIRS)
    assert summary["intrinsic"]["baseline/dpo-on-policy"]["n_responses"] == 3
    on_policy = [s for s in summary["signatures"] if s["name"] == "on_policy_squeezes_less"]
    assert len(on_policy) == 1 and on_policy[0]["verdict"] != "not applicable"  # it found both arms' DPO changes
    assert [e["quantity"] for e in on_policy[0]["estimates"]] == ["chosen argmax_logp change, on - off",
                                                                  "chosen change, on - off"]
    assert "baseline, on-policy DPO" in Path(summary["report"]).read_text(encoding="utf-8")


def test_on_policy_arm_sends_an_openai_judge_to_the_endpoint_the_user_named(tmp_path, monkeypatch):
    """`compare --on-policy --judge openai:M --base-url U --api-key-env V`: the on-policy arm's judge
    must use U and V too, never the default host with OPENAI_API_KEY."""
    import learndyn.experiments.compare as compare

    monkeypatch.setenv("MY_KEY", "sk-test-0123456789")
    seen = []
    monkeypatch.setattr(compare, "_build_probes", lambda settings, path: None)
    monkeypatch.setattr(compare, "train_once", lambda s, resume: (seen.append(s) or Path(s.out), True))
    settings = replace(tiny_settings(tmp_path / "model", tmp_path / "out"), judge="openai:judge-model", on_policy=True)
    compare.train_arms(settings, judge_options={"base_url": "http://127.0.0.1:9/v1", "api_key_env": "MY_KEY"})
    (on,) = [s for s in seen if s.on_policy]
    assert (on.judge, on.judge_base_url, on.judge_api_key_env) == ("openai:judge-model", "http://127.0.0.1:9/v1", "MY_KEY")


def test_filtered_arm_drops_the_forecast_pairs_and_takes_as_many_dpo_steps(tiny_folder, tmp_path):
    """compare --filter-top 25%: the forecast runs on the baseline SFT model, its dropped pairs are not
    trained on, and the filtered arm's DPO takes the baseline arm's step count on fewer pairs."""
    import json

    from learndyn.experiments.compare import FILTERED_PAIRS
    from learndyn.training.runs import read_config, read_metrics

    out = tmp_path / "cmp"
    summary = run_compare(replace(tiny_settings(tiny_folder, out), examples=8, batch_size=2, filter_top=25.0))
    forecast = json.loads((out / "filtered" / "forecast" / "summary.json").read_text())
    assert forecast["settings"]["model"] == str(out / "baseline" / "sft") and len(forecast["dropped"]) == 2
    config = read_config(out / "filtered" / "dpo")
    assert config["from"] == str(out / "baseline" / "sft") and config["data"].endswith("filtered.jsonl")
    kept = [json.loads(line)["example_id"] for line in (out / "filtered" / "forecast" / "filtered.jsonl").open()]
    assert len(kept) == 6 and not set(kept) & set(forecast["dropped"])
    last = {arm: int(read_metrics(out / arm / "dpo")["step"].max()) for arm in ("baseline", "filtered")}
    assert last["filtered"] == last["baseline"] == 4  # 8 pairs / 2 per step, 1 epoch; 6 pairs for 4/3 epochs
    assert [(r["a"], r["b"]) for r in summary["win_rates"]][-1:] == list(FILTERED_PAIRS)
