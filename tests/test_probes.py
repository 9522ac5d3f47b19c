"""Probe sets: which response types a build makes, that "another example's" text is never the
example's own, that rows depend only on data and seed (so an interrupted build resumes to the same
file), and that probe files (ours and the paper authors') read back as written."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from learndyn.data import Preference
from learndyn.errors import LearndynError
from learndyn.probes.build import ProbeBuildError, build_probe_file, build_probes, derangement, shuffle_words
from learndyn.probes.files import Probe, read_probes, write_probes
from learndyn.vocab import REPHRASE_TYPES, TYPE_NAMES

CHEAP_TYPES = {"chosen", "rejected", "other_train", "fluent_random", "shuffled_chosen", "shuffled_other"}
N = 6


def make_prefs(n: int = N, *, conversation: bool = False, tag: str = "") -> list[Preference]:
    """Examples whose words all carry the example's own marker (`w3x` belongs to example 3), so any
    probe text can be traced back to the example it came from."""
    prefs = []
    for i in range(n):
        m = f"{i}{tag}"
        chosen = f"Alpha{m} likes{m} apples{m} lots{m}. Beta{m} walks{m} daily{m}! Gamma{m} sings{m} very{m} well{m}?"
        rejected = f"Delta{m} hates{m} pears{m}. Epsilon{m} never{m} runs{m} anywhere{m}."
        text = f"Tell me about topic {m}."
        prompt = [{"role": "user", "content": text}] if conversation else text
        prefs.append(Preference(f"id{m}", prompt, chosen, rejected))
    return prefs


def owner(text: str, prefs: list[Preference]) -> set[int]:
    """Indices of the examples whose chosen/rejected words make up `text`."""
    found = set()
    for word in text.split():
        hits = {i for i, p in enumerate(prefs) if word in (p.chosen + " " + (p.rejected or "")).split()}
        assert len(hits) == 1, f"word {word!r} is not from exactly one example"
        found |= hits
    return found


def rows(probes: list[Probe]) -> list[dict]:
    return [p.to_row() for p in probes]


def echo_rephraser(calls: list | None = None, fail_on: int | None = None):
    """A fake backend: `style:text`; with `fail_on`, its fail_on-th call raises like a dead endpoint."""
    count = [0]

    def rephrase(texts: list[str], style: str) -> list[str]:
        count[0] += 1
        if calls is not None:
            calls.append((style, list(texts)))
        if fail_on is not None and count[0] == fail_on:
            raise LearndynError("http://fake/v1/chat/completions: HTTP 503 (after 4 attempts)")
        return [f"{style}:{t}" for t in texts]

    return rephrase


# ---------------------------------------------------------------- cheap types


def test_one_row_per_example_in_order_with_every_cheap_type():
    prefs = make_prefs()
    probes = build_probes(prefs)
    assert [p.example_id for p in probes] == [p.example_id for p in prefs]
    assert [p.prompt for p in probes] == [p.prompt for p in prefs]
    for probe, pref in zip(probes, prefs):
        assert set(probe.responses) == CHEAP_TYPES
        assert probe.responses["chosen"] == pref.chosen
        assert probe.responses["rejected"] == pref.rejected


def test_held_out_adds_other_test_from_held_out_chosen_only():
    prefs, held = make_prefs(), make_prefs(8, tag="t")
    probes = build_probes(prefs, held_out=held)
    held_chosen = {h.chosen for h in held}
    others = [p.responses["other_test"] for p in probes]
    assert all(set(p.responses) == CHEAP_TYPES | {"other_test"} for p in probes)
    assert set(others) <= held_chosen
    assert len(set(others)) == len(others)  # enough held-out answers: no two rows share one


def test_rephrase_extras_in_the_data_become_probe_types():
    prefs = [Preference(p.example_id, p.prompt, p.chosen, p.rejected,
                        {name: f"{name} of {p.example_id}" for name in REPHRASE_TYPES}) for p in make_prefs()]
    probes = build_probes(prefs, held_out=make_prefs(3, tag="t"))
    for probe in probes:
        assert set(probe.responses) == CHEAP_TYPES | {"other_test"} | set(REPHRASE_TYPES)
        assert probe.responses["chosen_semantic"] == f"chosen_semantic of {probe.example_id}"


def test_extras_from_data_win_over_made_types():
    prefs = make_prefs()
    prefs[2] = Preference(prefs[2].example_id, prefs[2].prompt, prefs[2].chosen, prefs[2].rejected,
                          {"other_train": "given by the authors", "shuffled_chosen": "given too"})
    probe = build_probes(prefs)[2]
    assert probe.responses["other_train"] == "given by the authors"
    assert probe.responses["shuffled_chosen"] == "given too"


def test_building_leaves_the_preferences_untouched():
    prefs = make_prefs()
    before = [(p.chosen, p.rejected, dict(p.extras)) for p in prefs]
    build_probes(prefs, rephraser=echo_rephraser())
    assert [(p.chosen, p.rejected, dict(p.extras)) for p in prefs] == before


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("n", [2, 3, 6])
def test_borrowed_types_never_come_from_the_example_itself(seed, n):
    prefs = make_prefs(n)
    for i, probe in enumerate(build_probes(prefs, seed=seed)):
        lender = owner(probe.responses["other_train"], prefs)
        assert lender != {i} and len(lender) == 1
        assert probe.responses["other_train"] == prefs[lender.pop()].chosen
        shuffled_from = owner(probe.responses["shuffled_other"], prefs)
        assert len(shuffled_from) == 1 and i not in shuffled_from
        j = shuffled_from.pop()
        assert Counter(probe.responses["shuffled_other"].split()) == Counter(prefs[j].chosen.split())
        fluent_from = owner(probe.responses["fluent_random"], prefs)
        assert len(fluent_from) == 1 and i not in fluent_from


def test_fluent_random_is_whole_sentences_of_the_lender():
    prefs = make_prefs()
    for probe in build_probes(prefs, seed=3):
        (j,) = owner(probe.responses["fluent_random"], prefs)
        text = prefs[j].chosen + " " + prefs[j].rejected
        sentences = probe.responses["fluent_random"].replace("! ", "!|").replace("? ", "?|").replace(". ", ".|")
        assert all(s in text for s in sentences.split("|"))
        assert probe.responses["fluent_random"][-1] in ".!?"


@pytest.mark.parametrize("seed", range(5))
def test_shuffled_chosen_has_chosen_words_in_another_order(seed):
    for probe in build_probes(make_prefs(), seed=seed):
        chosen, shuffled = probe.responses["chosen"], probe.responses["shuffled_chosen"]
        assert Counter(shuffled.split()) == Counter(chosen.split())
        assert shuffled.split() != chosen.split()


def test_shuffle_words_keeps_leading_space_of_hh_responses():
    text = " The cat sat on the mat."
    out = shuffle_words(text, random.Random(0))
    assert out.startswith(" ") and not out.startswith("  ")
    assert Counter(out.split()) == Counter(text.split()) and out != text


def test_shuffle_words_of_a_single_word_is_that_word():
    assert shuffle_words("Hello", random.Random(0)) == "Hello"


def test_one_word_answers_get_no_shuffled_probe_that_would_repeat_them():
    prefs = [Preference(f"q{i}", f"What is {i} + 1?", str(i + 1), str(i + 3)) for i in range(4)]
    probes = build_probes(prefs + make_prefs(2))
    for probe in probes[:4]:
        assert "shuffled_chosen" not in probe.responses  # "5" shuffled is "5"
    assert all("shuffled_chosen" in p.responses for p in probes[4:])
    assert all(p.responses.get("shuffled_other") != p.responses["other_train"] for p in probes)


def test_same_seed_gives_identical_rows_and_other_seed_other_rows():
    prefs, held = make_prefs(), make_prefs(4, tag="t")
    first = rows(build_probes(prefs, held_out=held, seed=7))
    assert rows(build_probes(prefs, held_out=held, seed=7)) == first
    assert rows(build_probes(prefs, held_out=held, seed=8)) != first


def test_rows_do_not_depend_on_the_python_hash_seed(tmp_path):
    """Resuming happens in a new process: string-seeded randomness must not vary with PYTHONHASHSEED."""
    script = (
        "import json, sys\n"
        "from learndyn.data import load_preferences\n"
        "from learndyn.probes.build import build_probes\n"
        "p = build_probes(load_preferences('example', limit=6), held_out=load_preferences('example:test'), seed=3)\n"
        "json.dump([x.to_row() for x in p], sys.stdout)\n"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1]


def test_a_row_depends_on_its_example_not_on_batch_size():
    prefs = make_prefs()
    assert rows(build_probes(prefs, rephraser=echo_rephraser(), batch_size=1)) == \
        rows(build_probes(prefs, rephraser=echo_rephraser(), batch_size=8))


@pytest.mark.parametrize("n", list(range(2, 40)) + [100, 257])
def test_derangement_is_a_permutation_without_fixed_points(n):
    for seed in range(25):
        perm = derangement(n, random.Random(seed))
        assert sorted(perm) == list(range(n))
        assert all(perm[i] != i for i in range(n))


def test_derangement_is_seeded():
    assert derangement(20, random.Random("s")) == derangement(20, random.Random("s"))
    assert derangement(0, random.Random(0)) == []


def test_single_example_builds_without_borrowed_types():
    (probe,) = build_probes(make_prefs(1), held_out=make_prefs(2, tag="t"))
    assert set(probe.responses) == {"chosen", "rejected", "shuffled_chosen", "other_test"}


def test_example_without_rejected_gets_no_rejected_types():
    prefs = [Preference(p.example_id, p.prompt, p.chosen, None) for p in make_prefs(3)]
    probes = build_probes(prefs, rephraser=echo_rephraser())
    for probe in probes:
        assert "rejected" not in probe.responses
        assert not any(name.startswith("rejected_") for name in probe.responses)
        assert {"chosen_semantic", "chosen_format"} <= set(probe.responses)


# ---------------------------------------------------------------- greedy


def test_greedy_is_the_models_own_decode_of_each_prompt(tiny_llama):
    from learndyn.generation import generate

    model, tokenizer = tiny_llama
    prefs = make_prefs(3, conversation=True) + make_prefs(2, tag="p")  # chat and plain-text prompts
    probes = build_probes(prefs, model=model, tokenizer=tokenizer, greedy_max_tokens=6, batch_size=2)
    expected = generate(model, tokenizer, [p.prompt for p in prefs], max_new_tokens=6, progress=None)
    assert any(expected), "the tiny model decoded nothing at all: the test proves nothing"
    for probe, text in zip(probes, expected):
        assert probe.responses.get("greedy") == (text or None)
        assert CHEAP_TYPES <= set(probe.responses)


def test_no_model_means_no_greedy():
    assert not any("greedy" in p.responses for p in build_probes(make_prefs()))


# ---------------------------------------------------------------- rephrases


def test_rephraser_fills_every_missing_rephrase_type_from_its_source():
    prefs = make_prefs()
    probes = build_probes(prefs, rephraser=echo_rephraser())
    for probe, pref in zip(probes, prefs):
        assert probe.responses["chosen_semantic"] == f"semantic:{pref.chosen}"
        assert probe.responses["chosen_format"] == f"format:{pref.chosen}"
        assert probe.responses["rejected_semantic"] == f"semantic:{pref.rejected}"
        assert probe.responses["rejected_format"] == f"format:{pref.rejected}"


def test_rephraser_is_asked_only_for_types_the_data_lacks():
    prefs = make_prefs(3)
    prefs[1] = Preference(prefs[1].example_id, prefs[1].prompt, prefs[1].chosen, prefs[1].rejected,
                          {"chosen_semantic": "given", "rejected_format": "given too"})
    calls: list = []
    probes = build_probes(prefs, rephraser=echo_rephraser(calls))
    asked = Counter((style, text) for style, texts in calls for text in texts)
    assert all(count == 1 for count in asked.values())
    assert ("semantic", prefs[1].chosen) not in asked and ("format", prefs[1].rejected) not in asked
    assert sum(asked.values()) == 3 * 4 - 2
    assert probes[1].responses["chosen_semantic"] == "given"
    assert probes[1].responses["rejected_format"] == "given too"
    assert {style for style, _ in calls} == {"semantic", "format"}


def test_empty_rewrite_leaves_the_type_out():
    probes = build_probes(make_prefs(2), rephraser=lambda texts, style: ["" if style == "format" else "x"] * len(texts))
    for probe in probes:
        assert probe.responses["chosen_semantic"] == "x"
        assert "chosen_format" not in probe.responses and "rejected_format" not in probe.responses


def _half_given() -> list[Preference]:
    """Six examples; 0 and 3 already carry every rephrase, so they need no rephraser call."""
    prefs = make_prefs()
    for i in (0, 3):
        p = prefs[i]
        prefs[i] = Preference(p.example_id, p.prompt, p.chosen, p.rejected,
                              {name: f"{name} given" for name in REPHRASE_TYPES})
    return prefs


@pytest.mark.parametrize("fail_on", [1, 2, 3, 4])
def test_failed_rephrasing_keeps_only_complete_rows_and_resumes_to_a_clean_build(fail_on):
    prefs = _half_given()
    clean = rows(build_probes(prefs, held_out=make_prefs(3, tag="t"), seed=5, rephraser=echo_rephraser()))
    with pytest.raises(ProbeBuildError) as info:
        build_probes(prefs, held_out=make_prefs(3, tag="t"), seed=5,
                     rephraser=echo_rephraser(fail_on=fail_on), batch_size=8)
    assert "HTTP 503" in str(info.value)
    finished = info.value.finished
    # 4 jobs per example still to rephrase, 8 per chunk: chunk 1 = examples 1, 2; chunk 2 = 4, 5.
    expected_ids = ["id0", "id3"] if fail_on <= 2 else ["id0", "id1", "id2", "id3"]
    assert [p.example_id for p in finished] == expected_ids
    for probe in finished:
        assert set(REPHRASE_TYPES) <= set(probe.responses)
        assert probe.to_row() == clean[int(probe.example_id[2:])]

    calls: list = []
    resumed = build_probes(prefs, held_out=make_prefs(3, tag="t"), seed=5, rephraser=echo_rephraser(calls),
                           done=finished)
    assert rows(resumed) == clean
    asked = {text for _, texts in calls for text in texts}
    assert not asked & {prefs[int(p.example_id[2:])].chosen for p in finished}  # done rows are not redone


def test_resume_through_the_probe_file_gives_a_clean_build(tmp_path):
    """build_probe_file writes the finished rows when a backend fails, refuses to replace them unasked,
    and a resume finishes them to the clean build's file."""
    prefs = _half_given()
    clean = rows(build_probes(prefs, seed=2, rephraser=echo_rephraser()))
    path = tmp_path / "probes.jsonl"
    with pytest.raises(LearndynError, match=r"HTTP 503 .*; kept 4 of 6 finished rows in .*probes.jsonl; rerun with --resume"):
        build_probe_file(prefs, path, seed=2, rephraser=echo_rephraser(fail_on=3))
    assert [p.example_id for p in read_probes(path)] == ["id0", "id1", "id2", "id3"]
    with pytest.raises(LearndynError, match="exists; pass --resume"):
        build_probe_file(prefs, path, seed=2, rephraser=echo_rephraser())
    build_probe_file(prefs, path, resume=True, seed=2, rephraser=echo_rephraser())
    assert [p.to_row() for p in read_probes(path)] == clean


def test_probe_build_error_is_a_learndyn_error():
    with pytest.raises(LearndynError):
        build_probes(make_prefs(2), rephraser=echo_rephraser(fail_on=1))


# ---------------------------------------------------------------- probe files


def test_probe_file_round_trip_text_and_conversation_prompts(tmp_path):
    probes = build_probes(make_prefs(3) + make_prefs(3, conversation=True, tag="c"), held_out=make_prefs(2, tag="t"),
                          rephraser=echo_rephraser())
    probes[0].responses["greedy"] = "ünïcødé — “quoted” \n newline"
    path = tmp_path / "p.jsonl"
    write_probes(probes, path)
    back = read_probes(path)
    assert back == probes
    assert isinstance(back[0].prompt, str) and isinstance(back[3].prompt, list)


def test_probe_file_columns_follow_vocabulary_order(tmp_path):
    probe = Probe("x", "p", {"shuffled_chosen": "b a", "chosen": "a b", "greedy": "g", "rejected": "r"})
    path = tmp_path / "p.jsonl"
    write_probes([probe], path)
    assert list(json.loads(path.read_text(encoding="utf-8"))) == ["example_id", "prompt", "chosen", "rejected",
                                                                  "shuffled_chosen", "greedy"]


def test_write_probes_replaces_the_file_whole(tmp_path):
    path = tmp_path / "p.jsonl"
    write_probes([Probe(str(i), "p", {"chosen": "c"}) for i in range(5)], path)
    write_probes([Probe("only", "p", {"chosen": "c"})], path)
    assert [p.example_id for p in read_probes(path)] == ["only"]
    assert [f.name for f in tmp_path.iterdir()] == ["p.jsonl"]  # no temporary files left behind


def test_authors_column_names_map_to_the_vocabulary(tmp_path):
    authors = {"chosen_gptsemantic": "chosen_semantic", "chosen_gptformat": "chosen_format",
               "reject_gptsemantic": "rejected_semantic", "reject_gptformat": "rejected_format",
               "irr_train": "other_train", "irr_test": "other_test", "irr_hum": "fluent_random",
               "random_permute": "shuffled_chosen", "random_nonhum": "shuffled_other", "chosen_initial": "base_sample"}
    row = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " c", "rejected": " r", "chosen_selfr": "noise"}
    row.update({column: f"text of {column}" for column in authors})
    path = tmp_path / "authors.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "chosen_initial": "", "irr_hum": None}) + "\n",
                    encoding="utf-8")
    first, second = read_probes(path)
    assert first.example_id == "0" and second.example_id == "1"
    assert first.responses == {"chosen": " c", "rejected": " r",
                               **{ours: f"text of {column}" for column, ours in authors.items()}}
    assert set(first.responses) - set(second.responses) == {"base_sample", "fluent_random"}  # empty cells skipped


def test_unknown_column_names_file_line_and_valid_types(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n" +
                    json.dumps({"prompt": "p", "chosen": "c", "chosen_rephrased": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(LearndynError) as info:
        read_probes(path)
    message = str(info.value)
    assert f"{path}:2" in message and "chosen_rephrased" in message
    assert ", ".join(TYPE_NAMES) in message


def test_empty_probe_file_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(LearndynError, match=f"{path}: empty probe file"):
        read_probes(path)


@pytest.mark.parametrize("row,fragment", [
    ({"example_id": "x", "prompt": "p"}, "no responses"),
    ({"prompt": "p", "chosen": "", "rejected": None}, "no responses"),
    ({"chosen": "c"}, "missing field 'prompt'"),
    ({"prompt": "", "chosen": "c"}, "'prompt' is empty"),
    ({"prompt": "p", "chosen": 3}, "'chosen' must be text"),
])
def test_bad_probe_row_names_file_and_line(tmp_path, row, fragment):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "fine"}) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(LearndynError) as info:
        read_probes(path)
    assert f"{path}:2" in str(info.value) and fragment in str(info.value)


def test_duplicate_probe_id_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text((json.dumps({"example_id": "a", "prompt": "p", "chosen": "c"}) + "\n") * 2, encoding="utf-8")
    with pytest.raises(LearndynError, match=f"{path}:2: duplicate example_id 'a'"):
        read_probes(path)


def test_read_probes_limit_stops_early(tmp_path):
    path = tmp_path / "p.jsonl"
    good = "".join(json.dumps({"prompt": "p", "chosen": f"c{i}"}) + "\n" for i in range(3))
    path.write_text(good + "not json\n", encoding="utf-8")
    assert [p.responses["chosen"] for p in read_probes(path, limit=3)] == ["c0", "c1", "c2"]


HH_PROBES = Path(__file__).parents[2] / "shared/data/hh_helpful_probes/train.jsonl"
AUTHOR_TYPES = {"chosen", "rejected", "chosen_semantic", "chosen_format", "rejected_semantic", "rejected_format",
                "other_train", "other_test", "fluent_random", "shuffled_chosen", "shuffled_other", "base_sample"}


@pytest.mark.skipif(not HH_PROBES.is_file(), reason="shared HH probe file not present")
def test_authors_hh_probe_file_reads_as_is():
    probes = read_probes(HH_PROBES, limit=20)
    assert len(probes) == 20
    with open(HH_PROBES, encoding="utf-8") as fh:
        raw = [json.loads(next(fh)) for _ in range(20)]
    for probe, row in zip(probes, raw):
        expected = AUTHOR_TYPES - ({"base_sample"} if not row["chosen_initial"] else set())
        assert set(probe.responses) == expected
        assert probe.prompt == row["prompt"] and probe.prompt.endswith("\n\nAssistant:")
        assert probe.responses["chosen"] == row["chosen"]
        assert probe.responses["shuffled_chosen"] == row["random_permute"]
    assert any("base_sample" not in p.responses for p in probes)  # row 6 has no base sample
