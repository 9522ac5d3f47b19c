"""The `learndyn` command as users run it: a real process, so the `main()` wrapper that turns a
`LearndynError` into one "error: ..." line and exit code 1 is exercised too (CliRunner on `app`
would bypass it). `python -m learndyn.cli` runs nothing (cli.py has no `__main__` block), so the
tests run the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ChatServer, completion

from learndyn.vocab import TYPE_NAMES


def _console_script() -> str:
    beside_python = Path(sys.executable).parent / "learndyn"
    found = str(beside_python) if beside_python.is_file() else shutil.which("learndyn")
    if not found:
        pytest.skip("the learndyn console script is not installed (pip install -e .)", allow_module_level=True)
    return found


LEARNDYN = _console_script()
EXPECTED_COLUMNS = ["example_id", "prompt", "chosen", "rejected", "chosen_semantic", "chosen_format",
                    "rejected_semantic", "rejected_format", "other_train", "other_test", "fluent_random",
                    "shuffled_chosen", "shuffled_other"]


def learndyn(*args: str, cwd: Path | None = None, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in {"FORCE_COLOR", "PY_COLORS", "CLICOLOR_FORCE", "OPENAI_API_KEY"}}  # never a real key
    env.update(COLUMNS="80", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # narrow: a long error must not wrap
    env.update(env_vars)
    return subprocess.run([LEARNDYN, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def build(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return learndyn("probes", "build", "--data", "example", "--out", str(out), "--held-out", "example:test",
                    "--limit", "8", *extra)


def test_help_is_instant_and_lists_commands():
    start = time.monotonic()
    result = learndyn("--help")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 10
    for command in ("probes", "score", "demo"):
        assert command in result.stdout


def test_help_does_not_import_torch():
    script = "import sys; sys.argv = ['learndyn', '--help']\nfrom learndyn.cli import main\ntry:\n    main()\n" \
             "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "False False"


def test_probes_build_writes_one_row_per_example_with_every_cheap_type(tmp_path):
    out = tmp_path / "probes.jsonl"
    result = build(out)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out)
    assert len(rows) == 8
    for row in rows:
        assert list(row) == [c for c in EXPECTED_COLUMNS if c in row]  # vocabulary order
        assert set(row) == set(EXPECTED_COLUMNS)  # no model: no greedy; no base model: no base_sample
    assert "wrote 8 probe rows" in result.stdout


def test_probes_build_refuses_to_overwrite_without_a_flag(tmp_path):
    out = tmp_path / "probes.jsonl"
    assert build(out).returncode == 0
    before = out.read_bytes()
    assert_one_error_line(build(out), str(out), "--overwrite")
    assert out.read_bytes() == before  # the refused run left the file alone
    assert build(out, "--overwrite").returncode == 0
    assert out.read_bytes() == before  # same data and seed: same rows


def test_probes_build_resume_finishes_a_partial_file_to_the_clean_rows(tmp_path):
    clean = tmp_path / "clean.jsonl"
    assert build(clean).returncode == 0
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(clean.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    result = build(partial, "--resume")
    assert result.returncode == 0, result.stderr
    assert read_rows(partial) == read_rows(clean)


def test_malformed_data_file_is_one_error_line_naming_file_and_line(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": \n', encoding="utf-8")
    out = tmp_path / "probes.jsonl"
    result = learndyn("probes", "build", "--data", str(data), "--out", str(out))
    assert_one_error_line(result, f"{data}:2", "malformed JSON")
    assert not out.exists()


def test_missing_data_file_is_one_error_line(tmp_path):
    data = tmp_path / "nope.jsonl"
    assert_one_error_line(learndyn("probes", "build", "--data", str(data), "--out", str(tmp_path / "o.jsonl")),
                          str(data), "not found")


def test_score_unknown_type_lists_valid_names(tmp_path):
    result = learndyn("score", "--probes", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "s.parquet"),
                      "--types", "chosen,chosen_rephrased")
    assert_one_error_line(result, "chosen_rephrased", ", ".join(TYPE_NAMES))


def test_unknown_rephraser_lists_valid_backends(tmp_path):
    out = tmp_path / "probes.jsonl"
    result = learndyn("probes", "build", "--data", "example", "--out", str(out), "--rephraser", "bogus")
    assert_one_error_line(result, "bogus", "none, local, openai")
    assert not out.exists()


@pytest.mark.parametrize("bracketed", ["data[v2].jsonl", "data[/v2]"], ids=["style-tag", "closing-tag"])
def test_error_line_shows_user_text_with_brackets_verbatim(tmp_path, bracketed):
    folder = tmp_path / "in"
    folder.mkdir()
    data = folder / (bracketed if bracketed.endswith(".jsonl") else "d.jsonl")
    data.write_text('{"prompt": "p", "chosen": "c"}\n', encoding="utf-8")
    if bracketed.endswith(".jsonl"):
        result = learndyn("probes", "build", "--data", str(data), "--out", str(tmp_path / "o.jsonl"))
        assert_one_error_line(result, f"{data}:1", "missing field 'rejected'")
    else:
        result = learndyn("score", "--probes", str(data), "--out", str(tmp_path / "s.parquet"), "--types", bracketed)
        assert_one_error_line(result, f"'{bracketed}'")


# ---------------------------------------------------------------- an interrupted rephrase, resumed


class FakeEndpoint(ChatServer):
    """A local OpenAI-compatible endpoint: rewrites any text as "R: text", or answers HTTP 400
    (not retried, so a failure is instant) while `fail` is set."""

    def __init__(self):
        self.fail = False
        super().__init__(self._respond)

    def _respond(self, request: dict) -> tuple[int, object]:
        if self.fail:
            return 400, {"error": {"message": "quota exceeded"}}
        text = request["body"]["messages"][-1]["content"].split("\n\nText: ", 1)[1]
        return 200, {"choices": [{"message": {"role": "assistant", "content": f"R: {text}"}}]}


@pytest.fixture
def endpoint():
    server = FakeEndpoint()
    yield server
    server.close()


def _rephrase_data(path: Path, given: set[int]) -> Path:
    rows = []
    for i in range(4):
        row = {"example_id": f"q{i}", "prompt": f"Question {i}?", "chosen": f"Answer {i} is good. It helps.",
               "rejected": f"Answer {i} is bad."}
        if i in given:
            row.update({name: f"{name} {i}" for name in ("chosen_semantic", "chosen_format",
                                                         "rejected_semantic", "rejected_format")})
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _build_openai(data: Path, out: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return learndyn("probes", "build", "--data", str(data), "--out", str(out), "--rephraser", "openai",
                    "--base-url", url, "--api-model", "fake", *extra, OPENAI_API_KEY="sk-test")


def test_rephraser_failure_keeps_finished_rows_and_resume_matches_a_clean_build(tmp_path, endpoint):
    data = _rephrase_data(tmp_path / "d.jsonl", given={0, 1})  # rows 0, 1 need no rephraser
    clean = tmp_path / "clean.jsonl"
    assert _build_openai(data, clean, endpoint.url).returncode == 0
    out = tmp_path / "out.jsonl"
    endpoint.fail = True
    line = assert_one_error_line(_build_openai(data, out, endpoint.url), "HTTP 400", "kept 2 of 4", "--resume")
    assert "sk-test" not in line
    assert [r["example_id"] for r in read_rows(out)] == ["q0", "q1"]
    endpoint.fail = False
    result = _build_openai(data, out, endpoint.url, "--resume")
    assert result.returncode == 0, result.stderr
    assert read_rows(out) == read_rows(clean)
    assert read_rows(out)[2]["chosen_semantic"] == "R: Answer 2 is good. It helps."


def test_resume_works_after_a_failure_before_any_row_finished(tmp_path, endpoint):
    data = _rephrase_data(tmp_path / "d.jsonl", given=set())
    out = tmp_path / "out.jsonl"
    endpoint.fail = True
    assert_one_error_line(_build_openai(data, out, endpoint.url), "quota exceeded", "nothing written")
    assert not out.exists()
    endpoint.fail = False
    result = _build_openai(data, out, endpoint.url, "--resume")
    assert result.returncode == 0, result.stderr
    assert len(read_rows(out)) == 4


LONG_KEY = "sk-cli-test-0123456789secret"


def test_probes_build_writes_no_echoed_key_and_refuses_a_redirect(tmp_path, key_trap):
    """A server that echoes the Authorization header into every rewrite: the probe file holds ***;
    an endpoint that redirects elsewhere: one line naming the status and the other host, and the
    other host sees nothing."""
    echo = ChatServer(lambda request: (200, completion(f"R ({request['headers'].get('Authorization')})")))
    data = _rephrase_data(tmp_path / "d.jsonl", given=set())
    try:
        out = tmp_path / "echo.jsonl"
        result = learndyn("probes", "build", "--data", str(data), "--out", str(out), "--rephraser", "openai",
                          "--base-url", echo.url, "--api-model", "fake", "--api-key-env", "LD_KEY", LD_KEY=LONG_KEY)
        assert result.returncode == 0, result.stderr
        text = out.read_text(encoding="utf-8")
        assert LONG_KEY not in text and text.count("R (Bearer ***)") == 16  # 4 rows x 4 rephrase types
    finally:
        echo.close()
    redirect, trap = key_trap
    origin = redirect(302)
    out = tmp_path / "redirected.jsonl"
    result = learndyn("probes", "build", "--data", str(data), "--out", str(out), "--rephraser", "openai",
                      "--base-url", origin.url, "--api-model", "fake", "--api-key-env", "LD_KEY", LD_KEY=LONG_KEY)
    line = assert_one_error_line(result, "HTTP 302 redirect to " + trap.url.removesuffix("/v1") + ",",
                                 "nothing written")
    assert trap.requests == [] and not out.exists() and LONG_KEY not in result.stdout + line


def test_score_writes_parquet_and_prints_per_type_means(tmp_path, tiny_folder):
    import pandas as pd

    probes = tmp_path / "probes.jsonl"
    assert learndyn("probes", "build", "--data", "example", "--out", str(probes), "--limit", "3").returncode == 0
    out = tmp_path / "scores.parquet"
    result = learndyn("score", "--probes", str(probes), "--out", str(out), "--model", str(tiny_folder),
                      "--types", "chosen,random_permute", "--max-length", "24")
    assert result.returncode == 0, result.stderr
    scores = pd.read_parquet(out)
    assert sorted(set(scores["response_type"])) == ["chosen", "shuffled_chosen"]  # the authors' alias works
    assert len(scores) == 6 and scores["truncated"].all()  # every example prompt+answer exceeds 24 tokens
    assert "Per-type means" in result.stdout and "6 responses truncated" in result.stdout


def test_train_sft_takes_settings_from_yaml_with_flags_overriding(tmp_path, tiny_folder):
    import yaml

    probes = tmp_path / "probes.jsonl"
    assert learndyn("probes", "build", "--data", "example", "--out", str(probes), "--limit", "2").returncode == 0
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"data": "example", "probes": str(probes), "model": str(tiny_folder),
                                      "limit": 4, "batch_size": 4, "epochs": 1, "every": 1, "learning_rate": 0.5,
                                      "max_length": 128}))
    run = tmp_path / "run"
    result = learndyn("train", "sft", "--config", str(config), "--out", str(run), "--lr", "0.001", "--extend")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["learning_rate"] == 0.001 and saved["extend"] is True and saved["limit"] == 4  # flag beats YAML
    assert len(list((run / "metrics").glob("*.parquet"))) == 3  # steps 0, 1, 2 (8 extended rows / 4)
    again = learndyn("train", "sft", "--config", str(config), "--out", str(run))
    assert_one_error_line(again, "already holds metrics", "--resume", "--overwrite")
    report = learndyn("report", str(run))
    assert report.returncode == 0, report.stderr[-2000:]
    assert (run / "report.html").is_file() and "sft_raises_chosen" in report.stdout
    finished = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    typo = learndyn("train", "sft", "--config", str(config), "--out", str(run), "--overwrite",
                    "--model", str(tmp_path / "tiny-typo"))
    assert_one_error_line(typo, "tiny-typo")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == finished  # a typo never wipes a run


def test_train_config_with_unknown_key_is_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("data: example\nprobes: p.jsonl\nlearning_rte: 0.1\n")
    result = learndyn("train", "sft", "--config", str(config), "--out", str(tmp_path / "r"))
    assert_one_error_line(result, "unknown setting(s) learning_rte")


def test_explain_writes_tables_summary_and_figures(tmp_path, tiny_folder):
    import pandas as pd

    probes = tmp_path / "probes.jsonl"
    assert learndyn("probes", "build", "--data", "example", "--out", str(probes), "--limit", "2").returncode == 0
    out = tmp_path / "explained"
    result = learndyn("explain", "--update", "example", "--rows", "0,1", "--probes", str(probes), "--model",
                      str(tiny_folder), "--loss", "dpo", "--optimizer", "adam", "--lr", "1e-4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    changes, positions = pd.read_parquet(out / "changes.parquet"), pd.read_parquet(out / "positions.parquet")
    expected = [(row["example_id"], t) for row in read_rows(probes) for t in TYPE_NAMES if row.get(t)]
    assert list(zip(changes["example_id"], changes["response_type"])) == expected
    assert {"predicted", "actual", "predicted_from_chosen", "predicted_from_rejected"} <= set(changes.columns)
    assert changes["n_tokens"].sum() == len(positions)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["rows"] == [0, 1] and summary["optimizer"] == "adam"
    assert summary["max_grad_norm"] == 1.0 and 0 < summary["update"]["clip_coefficient"] <= 1  # the Trainer's default
    assert [r["example_id"] for r in summary["update_rows"]] == ["ex-001", "ex-002"]
    assert summary["relative_error"] < 0.1
    assert (out / "changes.png").stat().st_size > 0 and (out / "squeeze.png").stat().st_size > 0
    assert "after one sigmoid step" in result.stdout  # the loss by TRL's name

    # the report puts the step's mass moved onto argmax tokens beside the squeezing signature
    from test_report import paper_like

    sft, dpo = paper_like(tmp_path / "runs")
    shown = learndyn("report", str(sft), str(dpo), "--explain", str(out))
    assert shown.returncode == 0, shown.stderr
    mass = summary["argmax_mass"]
    text = (f"explained step explained (sigmoid, adam lr 0.0001): mass onto argmax tokens {mass['actual_sum']:+.4g} "
            f"actual, {mass['predicted_sum']:+.4g} predicted, over {summary['positions']} positions")
    assert text in (dpo / "report.html").read_text()
    assert "explained step" in shown.stdout and f"{mass['actual_sum']:+.4g}" in shown.stdout  # the table wraps it
    squeezing = [s for s in json.loads((dpo / "signatures.json").read_text()) if s["name"].startswith("dpo_squeezing")]
    assert squeezing and all(s["explained_steps"][0]["argmax_mass_actual"] == mass["actual_sum"] for s in squeezing)
    assert_one_error_line(learndyn("report", str(sft), str(dpo), "--explain", str(tmp_path)),
                          f"{tmp_path}: not an explain folder (no summary.json)")


def test_explain_bad_input_is_one_line(tmp_path, tiny_folder):
    probes = tmp_path / "probes.jsonl"
    assert learndyn("probes", "build", "--data", "example", "--out", str(probes), "--limit", "1").returncode == 0
    common = ("--probes", str(probes), "--model", str(tiny_folder), "--out", str(tmp_path / "x"))
    assert_one_error_line(learndyn("explain", "--update", "example", "--rows", "99", *common),
                          "row 99 does not exist", "64 rows")
    assert_one_error_line(learndyn("explain", "--update", "example", "--rows", "a", *common), "--rows")
    sft_only = tmp_path / "sft.jsonl"
    sft_only.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello"}) + "\n")
    assert_one_error_line(learndyn("explain", "--update", str(sft_only), "--loss", "dpo", *common), "sft.jsonl", "rejected")
    assert_one_error_line(learndyn("explain", "--update", "example", "--loss", "kto", *common), "valid: sft, sigmoid, ipo, hinge")
    assert not (tmp_path / "x").exists()


def test_explain_refuses_an_update_row_named_twice(tmp_path, tiny_folder):
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello"}) + "\n", encoding="utf-8")
    out = tmp_path / "x"
    result = learndyn("explain", "--update", "example", "--rows", "0,3,0", "--probes", str(probes),
                      "--model", str(tiny_folder), "--out", str(out))
    assert_one_error_line(result, "0,3,0", "row 0 is named twice")
    assert not out.exists()


@pytest.mark.parametrize("args, flag", [
    (("probes", "build", "--data", "example", "--limit", "0"), "--limit"),
    (("score", "--limit", "0"), "--limit"),
    (("train", "sft", "--data", "example", "--limit", "0"), "--limit"),
    (("train", "dpo", "--data", "example", "--probe-limit", "-1"), "--probe-limit"),
    (("explain", "--update", "example", "--probe-limit", "0"), "--probe-limit"),
    (("score", "--batch-tokens", "0"), "--batch-tokens"),
    (("explain", "--update", "example", "--chunk-tokens", "0"), "--chunk-tokens"),
], ids=["probes-build", "score", "train-sft", "train-dpo", "explain", "score-batch", "explain-chunk"])
def test_count_options_below_one_are_refused_naming_the_option(tmp_path, args, flag):
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello"}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    given = ("--probes", str(probes)) if args[0] != "probes" else ()
    result = learndyn(*args, *given, "--out", str(out))
    assert_one_error_line(result, f"{flag} must be a positive integer, got {args[-1]}")
    assert not out.exists()


def test_explain_on_policy_takes_the_models_own_response_as_rejected(tmp_path, tiny_folder):
    probes = tmp_path / "probes.jsonl"
    assert learndyn("probes", "build", "--data", "example", "--out", str(probes), "--limit", "1").returncode == 0
    out = tmp_path / "on"
    result = learndyn("explain", "--update", "example", "--probes", str(probes), "--model", str(tiny_folder),
                      "--loss", "dpo", "--on-policy", "--types", "chosen", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rejected = json.loads((out / "summary.json").read_text())["update_rows"][0]["rejected"]
    assert rejected and rejected != read_rows(probes)[0]["rejected"]


def test_squeeze_and_digits_write_figures_and_numbers(tmp_path):
    result = learndyn("squeeze", "--case", "large-negative", "--out", str(tmp_path / "sq"))
    assert result.returncode == 0, result.stderr
    case = json.loads((tmp_path / "sq" / "summary.json").read_text())["cases"]["large-negative"]
    assert case["argmax_before"]["prob_after"] > case["argmax_before"]["prob_before"]  # squeezed into the argmax
    assert case["entropy_after"] < case["entropy_before"]
    assert (tmp_path / "sq" / "large-negative.png").exists() and "large-negative" in result.stdout
    assert_one_error_line(learndyn("squeeze", "--case", "nope", "--out", str(tmp_path / "sq")), "valid: uniform-positive")
    result = learndyn("digits", "--steps", "300", "--out", str(tmp_path / "dg"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "dg" / "summary.json").read_text())
    assert 0 < summary["relative_error"] < 0.2 and len(summary["influence"]["M"]) == 10
    assert (tmp_path / "dg" / "digits_influence.png").exists()


def test_compare_bad_input_is_one_line_before_any_work(tmp_path):
    missing = tmp_path / "missing.jsonl"
    result = learndyn("compare", "--data", "example", "--eval-data", str(missing), "--out", str(tmp_path / "a"))
    assert_one_error_line(result, "missing.jsonl: file not found")
    result = learndyn("compare", "--data", "example", "--eval-data", "example:test", "--judge", "gpt4",
                      "--out", str(tmp_path / "b"))
    assert_one_error_line(result, "unknown judge 'gpt4'")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    earlier = tmp_path / "c"
    earlier.mkdir()
    (earlier / "probes.jsonl").write_text("", encoding="utf-8")
    result = learndyn("compare", "--data", "example", "--eval-data", "example:test", "--out", str(earlier))
    assert_one_error_line(result, "holds an earlier comparison", "--resume", "--overwrite")


def test_compare_table_counts_the_pairs_whose_two_orders_disagreed(capsys, monkeypatch):
    from learndyn import cli
    from learndyn.cli import print_comparison

    monkeypatch.setattr(cli.out, "width", 200)  # one line per table row

    rate = {"a": "extended/dpo", "b": "baseline/dpo", "win_rate": 0.75, "ci_low": 0.5, "ci_high": 1.0, "wins": 1,
            "losses": 0, "ties": 1, "unparsed": 0, "inconsistent": 7}
    print_comparison({"judge": "local", "held_out_prompts": 2, "win_rates": [rate], "intrinsic": {}, "signatures": []})
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "win rate of A" in line).replace("┃", "│")
    row = next(line for line in lines if "extended/dpo" in line)
    assert header.split("│")[-2].strip() == "orders disagreed" and row.split("│")[-2].strip() == "7"


def _run_folder(path: Path) -> Path:
    from test_report import make_run

    return make_run(path, "sft", {"chosen": [-50.0, -40.0]})


@pytest.mark.parametrize("command", ["probes build", "score", "train sft", "report"])
def test_an_unwritable_output_is_one_line_naming_it_before_any_work(tmp_path, command):
    """A path under a regular file cannot be created, even by root (chmod does not stop root). The model
    does not exist: the output is checked before it is looked for, not after the work."""
    (tmp_path / "a-file").write_text("")
    target = tmp_path / "a-file" / "out"
    missing_model = str(tmp_path / "no-such-model")
    args = {
        "probes build": ["probes", "build", "--data", "example", "--limit", "2", "--out", str(target / "p.jsonl")],
        "score": ["score", "--probes", str(tmp_path / "p.jsonl"), "--model", missing_model,
                  "--out", str(target / "s.parquet")],
        "train sft": ["train", "sft", "--data", "example", "--probes", str(tmp_path / "p.jsonl"),
                      "--model", missing_model, "--out", str(target)],
        "report": ["report", str(_run_folder(tmp_path / "run")), "--out", str(target)],
    }[command]
    if command in ("score", "train sft"):
        assert build(tmp_path / "p.jsonl").returncode == 0
    assert_one_error_line(learndyn(*args), "cannot write to", str(target), "Not a directory")


def test_score_max_length_below_two_is_one_line_before_loading(tmp_path):
    assert build(tmp_path / "p.jsonl").returncode == 0
    for value in ("0", "1"):
        result = learndyn("score", "--probes", str(tmp_path / "p.jsonl"), "--model", str(tmp_path / "no-such-model"),
                          "--out", str(tmp_path / "s.parquet"), "--max-length", value)
        assert_one_error_line(result, "max_length must be at least 2", f"got {value}")


def test_disk_full_while_training_is_one_line_and_keeps_the_finished_shards(tmp_path, tiny_folder, monkeypatch,
                                                                            capsys):
    """ENOSPC on the second metrics shard: one line saying so and how many evaluations are kept."""
    import errno

    import pandas as pd

    from learndyn import cli

    probes = tmp_path / "p.jsonl"
    assert build(probes).returncode == 0
    real_to_parquet = pd.DataFrame.to_parquet
    calls = []

    def fill_the_disk(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            Path(path).write_bytes(b"PAR1")  # half a file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_to_parquet(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fill_the_disk)
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["learndyn", "train", "sft", "--data", "example", "--probes", str(probes),
                                      "--model", str(tiny_folder), "--out", str(run), "--limit", "4",
                                      "--batch-size", "2", "--epochs", "1", "--every", "1", "--max-length", "128"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert error == [f"error: No space left on device; 1 evaluations kept in {run / 'metrics'}"]
    assert [p.name for p in (run / "metrics").iterdir()] == ["sft-step00000000.parquet"]  # no half-written shard
    pd.read_parquet(run / "metrics" / "sft-step00000000.parquet")


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    """typer turns Ctrl-C into a silent exit 130; main() says so."""
    from learndyn import cli
    from learndyn.experiments import squeeze

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(squeeze, "run_squeeze", interrupted)
    monkeypatch.setattr(sys, "argv", ["learndyn", "squeeze", "--out", str(tmp_path / "sq")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_ctrl_c_during_training_says_how_many_evaluations_are_kept(tmp_path, tiny_folder):
    import signal

    probes = tmp_path / "p.jsonl"
    assert build(probes).returncode == 0
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in {"FORCE_COLOR", "PY_COLORS", "CLICOLOR_FORCE"}}
    proc = subprocess.Popen(
        [LEARNDYN, "train", "sft", "--data", "example", "--probes", str(probes), "--model", str(tiny_folder),
         "--out", str(run), "--limit", "4", "--batch-size", "1", "--every", "1", "--epochs", "1000",
         "--max-length", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "HF_HUB_OFFLINE": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell ignores SIGINT
    try:
        deadline = time.monotonic() + 120
        while not list((run / "metrics").glob("*.parquet")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    kept = len(list((run / "metrics").glob("*.parquet")))
    assert proc.returncode == 130, err[-2000:]
    assert kept >= 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"interrupted; {kept} evaluations kept in {run / 'metrics'}"


@pytest.mark.parametrize("dpo_chosen, says_so", [([-30, -25, -20], True), ([-30, -20, -35], False)])
def test_demo_says_where_rise_then_fall_is_shown_when_its_run_does_not_show_it(tmp_path, monkeypatch, dpo_chosen,
                                                                                 says_so):
    """The demo's training is replaced by two stored runs: chosen only rising during DPO (the demo's
    budget on a CPU) makes the demo point to the longer run; a rise then fall does not."""
    from typer.testing import CliRunner
    from test_report import make_run

    import learndyn.experiments.demo as demo
    from learndyn.cli import app

    def fake_runs(settings, console=None):
        sft = make_run(tmp_path / "out" / "sft", "sft", {"chosen": [-50, -40, -30], "rejected": [-60, -58, -55]})
        dpo = make_run(tmp_path / "out" / "dpo", "dpo", {"chosen": dpo_chosen, "rejected": [-55, -70, -90]},
                       **{"from": str(sft)})
        return [sft, dpo]

    monkeypatch.setattr(demo, "run_demo", fake_runs)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "out")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert ("takes a longer DPO run than the demo's budget" in result.output) == says_so
