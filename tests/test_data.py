"""Preference loading: every on-disk format ends as the same `Preference` records, and every bad
input ends as one `LearndynError` line naming the file and the line/row (never a traceback)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from learndyn.data import HH_MARKER, Preference, fit_prompts, load_preferences, render_prompt
from learndyn.errors import LearndynError
from learndyn.vocab import REPHRASE_TYPES

CONV = [{"role": "user", "content": "How do I boil an egg?"}]
ROWS = [
    {"example_id": "a", "prompt": "Say hi.", "chosen": "Hi there!", "rejected": "Go away."},
    {"example_id": "b", "prompt": "Count to three.", "chosen": "One, two, three.", "rejected": "Four."},
    {"example_id": "c", "prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def triples(prefs: list[Preference]) -> list[tuple]:
    return [(p.example_id, p.prompt, p.chosen, p.rejected) for p in prefs]


EXPECTED = [(r["example_id"], r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]


# ---------------------------------------------------------------- formats


def test_jsonl_rows_load_in_file_order(tmp_path):
    assert triples(load_preferences(str(write_jsonl(tmp_path / "d.jsonl", ROWS)))) == EXPECTED


def test_json_list_and_data_wrapper_load_the_same_rows(tmp_path):
    plain = tmp_path / "list.json"
    plain.write_text(json.dumps(ROWS), encoding="utf-8")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    assert triples(load_preferences(str(plain))) == EXPECTED
    assert triples(load_preferences(str(wrapped))) == EXPECTED


def test_parquet_rows_load_like_jsonl(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    assert triples(load_preferences(str(path))) == EXPECTED


def test_parquet_conversation_columns_load_as_messages(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "conv.parquet"
    rows = [{"prompt": CONV, "chosen": [{"role": "assistant", "content": "Simmer it 9 minutes."}],
             "rejected": [{"role": "assistant", "content": "Microwave it whole."}]}]
    pd.DataFrame(rows).to_parquet(path)
    (pref,) = load_preferences(str(path))
    assert pref.prompt == CONV
    assert (pref.chosen, pref.rejected) == ("Simmer it 9 minutes.", "Microwave it whole.")


def test_csv_rows_load_like_jsonl(tmp_path):
    assert triples(load_preferences(str(write_csv(tmp_path / "d.csv", ROWS)))) == EXPECTED


def test_csv_cell_holding_json_conversation_is_decoded(tmp_path):
    rows = [{"example_id": "x", "prompt": CONV, "chosen": "Simmer it 9 minutes.", "rejected": "Microwave it."}]
    (pref,) = load_preferences(str(write_csv(tmp_path / "conv.csv", rows)))
    assert pref.prompt == CONV
    assert pref.chosen == "Simmer it 9 minutes."


def test_plain_text_prompt_kept_verbatim(tmp_path):
    text = "  Line one.\nLine two: keep my spacing.  "
    (pref,) = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", [{"prompt": text, "chosen": "ok", "rejected": "no"}])))
    assert pref.prompt == text


@pytest.mark.parametrize("as_messages", [False, True], ids=["string-responses", "assistant-message-responses"])
def test_conversation_prompt_with_string_or_message_responses(tmp_path, as_messages):
    def resp(text):
        return [{"role": "assistant", "content": text}] if as_messages else text

    row = {"prompt": CONV, "chosen": resp("Simmer it 9 minutes."), "rejected": resp("Microwave it whole.")}
    (pref,) = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", [row])))
    assert pref.prompt == CONV
    assert (pref.chosen, pref.rejected) == ("Simmer it 9 minutes.", "Microwave it whole.")


def test_trl_implicit_prompt_is_the_conversation_before_the_last_assistant_turn(tmp_path):
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How do I boil an egg?"},
    ]
    row = {"chosen": history + [{"role": "assistant", "content": "Simmer it 9 minutes."}],
           "rejected": history + [{"role": "assistant", "content": "Microwave it whole."}]}
    (pref,) = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", [row])))
    assert pref.prompt == history
    assert (pref.chosen, pref.rejected) == ("Simmer it 9 minutes.", "Microwave it whole.")


def test_trl_implicit_conversation_not_ending_with_assistant_is_rejected(tmp_path):
    row = {"chosen": CONV, "rejected": CONV}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(LearndynError, match=rf"{path}:1: .*assistant"):
        load_preferences(str(path))


def test_hh_transcript_splits_at_last_assistant_marker(tmp_path):
    history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I boil an egg?"
    row = {"chosen": history + HH_MARKER + " Simmer it 9 minutes.",
           "rejected": history + HH_MARKER + " Microwave it whole."}
    (pref,) = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", [row])))
    assert pref.prompt == history + HH_MARKER
    assert pref.prompt.endswith("\n\nAssistant:")
    assert pref.prompt.count(HH_MARKER) == 2  # multi-turn: the earlier turn stays in the prompt
    assert (pref.chosen, pref.rejected) == (" Simmer it 9 minutes.", " Microwave it whole.")
    assert pref.prompt + pref.chosen == row["chosen"]  # nothing lost or added at the cut


def test_hh_rows_from_csv_split_too(tmp_path):
    rows = [{"chosen": "\n\nHuman: Q?" + HH_MARKER + " A.", "rejected": "\n\nHuman: Q?" + HH_MARKER + " B."}]
    (pref,) = load_preferences(str(write_csv(tmp_path / "hh.csv", rows)))
    assert (pref.prompt, pref.chosen, pref.rejected) == ("\n\nHuman: Q?" + HH_MARKER, " A.", " B.")


def test_limit_keeps_the_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert [p.example_id for p in load_preferences(str(path), limit=2)] == ["a", "b"]
    assert len(load_preferences(str(path), limit=100)) == len(ROWS)


def test_limit_stops_before_reading_rows_past_it(tmp_path):
    path = _bad_jsonl(tmp_path, "not json at all")
    assert [p.example_id for p in load_preferences(str(path), limit=2)] == ["a", "b"]


def test_default_ids_are_row_positions_and_id_column_is_used(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"id": 7, "prompt": "p", "chosen": "c", "rejected": "r"}]
    assert [p.example_id for p in load_preferences(str(write_jsonl(tmp_path / "d.jsonl", rows)))] == ["0", "7"]


@pytest.mark.parametrize("suffix, ids", [("[:2]", ["a", "b"]), ("[1:]", ["b", "c"]), ("[-1:]", ["c"]),
                                         ("[:-1]", ["a", "b"]), ("[ 1 : 2 ]", ["b"])])
def test_row_range_selects_rows_like_a_python_slice(tmp_path, suffix, ids):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert [p.example_id for p in load_preferences(f"{path}{suffix}")] == ids


def test_row_range_keeps_file_positions_as_default_ids(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, held_out = load_preferences(f"{path}[:3]"), load_preferences(f"{path}[3:]")
    assert [p.example_id for p in train] == ["0", "1", "2"] and [p.example_id for p in held_out] == ["3", "4"]
    assert [p.prompt for p in load_preferences(f"{path}[3:]", limit=1)] == ["p3"]


def test_row_range_applies_after_a_split():
    assert [p.example_id for p in load_preferences("example:test[2:4]")] == \
        [p.example_id for p in load_preferences("example:test")][2:4]


def test_row_range_stops_before_reading_rows_past_it(tmp_path):
    path = _bad_jsonl(tmp_path, "not json at all")
    assert len(load_preferences(f"{path}[:2]")) == 2


@pytest.mark.parametrize("suffix", ["[a:b]", "[1]", "[1:2:3]"])
def test_malformed_row_range_is_one_clear_error(tmp_path, suffix):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(LearndynError, match=r"row range is written \[START:STOP\]"):
        load_preferences(f"{path}{suffix}")


def test_empty_row_range_names_the_spec(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(LearndynError, match=r"d.jsonl\[5:\]: no examples"):
        load_preferences(f"{path}[5:]")


def test_author_column_names_become_probe_extras(tmp_path):
    row = {"prompt": "p", "chosen": "c", "rejected": "r", "irr_train": "other answer",
           "chosen_gptsemantic": "c reworded", "reject_gptformat": "r other topic", "random_permute": "",
           "chosen_semantic": "", "unrelated_column": "ignored"}
    (pref,) = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", [row])))
    assert pref.extras == {"other_train": "other answer", "chosen_semantic": "c reworded",
                           "rejected_format": "r other topic"}


def test_rows_without_rejected_load_when_not_needed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(LearndynError, match=rf"{path}:1: missing field 'rejected'"):
        load_preferences(str(path))
    (pref,) = load_preferences(str(path), need_rejected=False)
    assert pref.rejected is None and pref.chosen == "c"


# ---------------------------------------------------------------- built-in example data


def test_example_data_is_a_complete_conversational_set():
    train = load_preferences("example")
    test = load_preferences("example:test")
    assert len(train) >= 64
    assert len(test) > 0
    for prefs in (train, test):
        ids = [p.example_id for p in prefs]
        assert len(set(ids)) == len(ids)
        for p in prefs:
            assert set(REPHRASE_TYPES) <= set(p.extras), p.example_id
            assert isinstance(p.prompt, list) and len(p.prompt) == 1 and p.prompt[0]["role"] == "user"
            assert p.prompt[0]["content"].strip()
            assert p.rejected and p.rejected != p.chosen
            assert all(p.extras[name] not in (p.chosen, p.rejected) for name in REPHRASE_TYPES)


def test_example_test_split_is_disjoint_from_train():
    train, test = load_preferences("example"), load_preferences("example:test")
    assert not {p.example_id for p in train} & {p.example_id for p in test}
    assert not {p.prompt[0]["content"] for p in train} & {p.prompt[0]["content"] for p in test}
    assert not {p.chosen for p in train} & {p.chosen for p in test}


def test_example_train_split_is_the_default():
    assert triples(load_preferences("example:train", limit=5)) == triples(load_preferences("example", limit=5))


def test_unknown_example_split_lists_valid_splits():
    with pytest.raises(LearndynError, match=r"no split 'validation'.*train, test"):
        load_preferences("example:validation")


# ---------------------------------------------------------------- bad input: one line naming file and line


def _bad_jsonl(tmp_path: Path, third_line: str) -> Path:
    path = tmp_path / "bad.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in ROWS[:2])
    path.write_text(good + third_line + "\n", encoding="utf-8")
    return path


def assert_one_line_error(path: Path, where: str, fragment: str, **kwargs) -> str:
    with pytest.raises(LearndynError) as info:
        load_preferences(str(path), **kwargs)
    message = str(info.value)
    assert where in message and fragment in message, message
    assert "\n" not in message
    return message


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = _bad_jsonl(tmp_path, '{"prompt": "p", "chosen": ')
    assert_one_line_error(path, f"{path}:3", "malformed JSON")


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    assert_one_line_error(path, f"{path}:2", "UTF-8")


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_non_utf8_bytes_in_whole_file_formats_name_the_file(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes("prompt,chosen,rejected\ncaf\xe9,a,b\n".encode("latin-1"))
    assert_one_line_error(path, str(path), "UTF-8")


def test_missing_chosen_names_file_and_line(tmp_path):
    path = _bad_jsonl(tmp_path, json.dumps({"prompt": "p", "rejected": "r"}))
    assert_one_line_error(path, f"{path}:3", "missing field 'chosen'")


def test_missing_rejected_names_file_and_line(tmp_path):
    path = _bad_jsonl(tmp_path, json.dumps({"prompt": "p", "chosen": "c"}))
    assert_one_line_error(path, f"{path}:3", "missing field 'rejected'")
    assert load_preferences(str(path), need_rejected=False)[2].rejected is None


@pytest.mark.parametrize("field,value", [("chosen", ""), ("chosen", "   "), ("rejected", ""),
                                         ("chosen", [{"role": "assistant", "content": " "}])])
def test_empty_response_names_file_line_and_field(tmp_path, field, value):
    row = {"prompt": "p", "chosen": "c", "rejected": "r", field: value}
    path = _bad_jsonl(tmp_path, json.dumps(row))
    assert_one_line_error(path, f"{path}:3", f"'{field}' is empty")
    kept = load_preferences(str(path), keep_empty=True)  # forecast's route: the pair loads, that side ""
    assert getattr(kept[2], field) == "" and kept[2].prompt == "p" and len(kept) == 3


@pytest.mark.parametrize("prompt", ["", "  \n ", []], ids=["empty", "blank", "empty-conversation"])
def test_empty_prompt_names_file_and_line(tmp_path, prompt):
    path = _bad_jsonl(tmp_path, json.dumps({"prompt": prompt, "chosen": "c", "rejected": "r"}))
    assert_one_line_error(path, f"{path}:3", "'prompt'")


def test_prompt_that_is_neither_text_nor_messages_names_the_field(tmp_path):
    path = _bad_jsonl(tmp_path, json.dumps({"prompt": [{"text": "hi"}], "chosen": "c", "rejected": "r"}))
    assert_one_line_error(path, f"{path}:3", "'prompt' must be text or a list")


@pytest.mark.parametrize("line", ['["a", "b"]', '"just a string"', "42"])
def test_non_object_json_line_names_file_and_line(tmp_path, line):
    path = _bad_jsonl(tmp_path, line)
    assert_one_line_error(path, f"{path}:3", "expected a JSON object")


def test_non_object_item_in_json_list_names_the_item(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], "oops"]), encoding="utf-8")
    assert_one_line_error(path, str(path), "item 1")


def test_duplicate_example_id_names_file_and_line(tmp_path):
    path = _bad_jsonl(tmp_path, json.dumps(ROWS[0]))
    assert_one_line_error(path, f"{path}:3", "duplicate example_id 'a'")


def test_duplicate_example_id_in_csv_names_the_row_line(tmp_path):
    path = write_csv(tmp_path / "d.csv", [ROWS[0], ROWS[1], ROWS[0]])
    assert_one_line_error(path, f"{path}:4", "duplicate example_id 'a'")


def test_unsupported_suffix_lists_valid_types(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello", encoding="utf-8")
    assert_one_line_error(path, str(path), ".jsonl, .json, .parquet, .csv")


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert_one_line_error(path, str(path), "not found")


@pytest.mark.parametrize("suffix,content", [(".jsonl", ""), (".jsonl", "\n  \n"), (".json", ""),
                                            (".json", "[]"), (".csv", ""), (".csv", "prompt,chosen,rejected\n")])
def test_empty_file_is_an_error_naming_it(tmp_path, suffix, content):
    path = tmp_path / f"empty{suffix}"
    path.write_text(content, encoding="utf-8")
    assert_one_line_error(path, str(path), "")


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    assert_one_line_error(path, str(path), "Parquet")


def test_hh_row_without_marker_names_file_and_line(tmp_path):
    path = _bad_jsonl(tmp_path, json.dumps({"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi"}))
    assert_one_line_error(path, f"{path}:3", "Assistant:")


def test_hh_rejected_without_marker_names_file_and_line(tmp_path):
    row = {"chosen": "\n\nHuman: hi" + HH_MARKER + " hello", "rejected": "no marker here"}
    path = _bad_jsonl(tmp_path, json.dumps(row))
    assert_one_line_error(path, f"{path}:3", "'rejected' is not an HH transcript")


def test_hh_empty_final_assistant_turn_names_file_and_line(tmp_path):
    row = {"chosen": "\n\nHuman: hi" + HH_MARKER + "   ", "rejected": "\n\nHuman: hi" + HH_MARKER + " no"}
    path = _bad_jsonl(tmp_path, json.dumps(row))
    assert_one_line_error(path, f"{path}:3", "empty final assistant turn")


# ---------------------------------------------------------------- the two sides of a pair


def test_hh_rejected_with_another_prompt_names_file_and_line(tmp_path):
    row = {"chosen": "\n\nHuman: How do I boil an egg?" + HH_MARKER + " Simmer it.",
           "rejected": "\n\nHuman: How do I fry an egg?" + HH_MARKER + " Use oil."}
    path = _bad_jsonl(tmp_path, json.dumps(row))
    assert_one_line_error(path, f"{path}:3", "'rejected' has another prompt than 'chosen'")


def test_hh_rejected_with_an_extra_turn_names_file_and_line(tmp_path):
    base = "\n\nHuman: Hi" + HH_MARKER
    row = {"chosen": base + " Hello!", "rejected": base + " Yo.\n\nHuman: Bye" + HH_MARKER + " Bye."}
    path = _bad_jsonl(tmp_path, json.dumps(row))
    assert_one_line_error(path, f"{path}:3", "another prompt")


def _conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.mark.parametrize("suffix, line", [(".jsonl", 2), (".csv", 3)])  # the CSV's line 1 is its header
def test_message_list_rejected_with_another_prompt_names_file_and_line(tmp_path, suffix, line):
    bad = {"chosen": _conversation("Boil an egg?", "Simmer it."), "rejected": _conversation("Fry an egg?", "Oil.")}
    rows = [{"chosen": _conversation("Hi", "Hello"), "rejected": _conversation("Hi", "Go away")}, bad]
    path = (write_jsonl if suffix == ".jsonl" else write_csv)(tmp_path / f"d{suffix}", rows)
    assert_one_line_error(path, f"{path}:{line}:", "'rejected' has another prompt than 'chosen'")


def test_message_list_rejected_without_the_context_is_refused(tmp_path):
    row = {"chosen": _conversation("Boil an egg?", "Simmer it."), "rejected": [{"role": "assistant", "content": "No."}]}
    path = _bad_jsonl(tmp_path, json.dumps(row))
    assert_one_line_error(path, f"{path}:3", "another prompt")


def test_message_list_rejected_ending_with_a_user_turn_is_refused(tmp_path):
    chosen = _conversation("Boil an egg?", "Simmer it.")
    row = {"chosen": chosen, "rejected": chosen[:1] + [{"role": "user", "content": "Hello?"}]}
    path = _bad_jsonl(tmp_path, json.dumps(row))
    assert_one_line_error(path, f"{path}:3", "'rejected' ends with a 'user' turn")


def test_sides_with_different_conversations_are_refused_beside_a_prompt_column(tmp_path):
    row = {"prompt": "Boil an egg?", "chosen": _conversation("Boil an egg?", "Simmer it."),
           "rejected": _conversation("Fry an egg?", "Oil.")}
    path = _bad_jsonl(tmp_path, json.dumps(row))
    assert_one_line_error(path, f"{path}:3", "another prompt")


def test_sides_with_the_same_conversation_beside_a_prompt_column_load(tmp_path):
    row = {"prompt": "Boil an egg?", "chosen": _conversation("Boil an egg?", "Simmer it."),
           "rejected": _conversation("Boil an egg?", "Fry it.")}
    (pref,) = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", [row])))
    assert (pref.prompt, pref.chosen, pref.rejected) == ("Boil an egg?", "Simmer it.", "Fry it.")


def test_rejected_identical_to_chosen_is_counted_in_a_warning(tmp_path, caplog):
    rows = [ROWS[0], {**ROWS[1], "rejected": ROWS[1]["chosen"]}, ROWS[2], {**ROWS[2], "example_id": "d",
                                                                          "rejected": ROWS[2]["chosen"]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level("WARNING", logger="learndyn.data"):
        assert len(load_preferences(str(path))) == 4
    (record,) = caplog.records
    assert "2 of 4 pairs" in record.getMessage() and f"{path}:2" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="learndyn.data"):
        load_preferences(str(write_jsonl(tmp_path / "ok.jsonl", ROWS)))
    assert not caplog.records


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_is_refused_not_an_empty_file(tmp_path, limit):
    from learndyn.probes.files import read_probes

    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    for read in (load_preferences, read_probes):
        with pytest.raises(LearndynError, match=f"limit must be a positive integer, got {limit}"):
            read(str(path), limit=limit)


# ---------------------------------------------------------------- CSV quoting


@pytest.mark.parametrize("body, line", [
    ('Say hi.,Hi,Bye\n"Count,One,Two\nName,Blue,Seven\n', 3),  # open to the end of the file
    ('"Say hi.,Hi,Bye\n"Count",One,Two\nName,Blue,Seven\n', 2),  # closed by the next row's quote
    ('Say hi.,"Hi,Bye\nCount,One,"Two"\nName,Blue,Seven\n', 2),
])
def test_csv_quote_left_open_names_the_line_of_its_row(tmp_path, body, line):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\n" + body, encoding="utf-8")
    assert_one_line_error(path, f"{path}:{line}:", "quote")


def test_csv_row_with_more_fields_than_the_header_names_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nSay hi.,Hi,Bye\nCount,One, two,Four\n", encoding="utf-8")
    assert_one_line_error(path, f"{path}:3:", "4 fields but the header names 3")


def test_csv_multiline_cells_name_the_line_their_row_starts_on(tmp_path):
    rows = [{**ROWS[0], "chosen": "Hi\nthere!"}, ROWS[1], {**ROWS[0], "chosen": "Hi\nagain!"}]
    path = write_csv(tmp_path / "d.csv", rows)  # lines: header, row 1 (2-3), row 2 (4), row 3 (5-6)
    assert load_preferences(str(path), limit=2)[0].chosen == "Hi\nthere!"
    assert_one_line_error(path, f"{path}:5:", "duplicate example_id 'a'")


def test_offline_hub_id_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The libraries read these variables once, at import: patch the module constants too, so the test
    # stays fast (no network retries) whatever was imported before it.
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    datasets_config = pytest.importorskip("datasets.config")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(LearndynError) as info:
        load_preferences("nobody-xyz/no-such-dataset:train")
    message = str(info.value)
    assert "nobody-xyz/no-such-dataset" in message and "'train'" in message
    assert "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert time.monotonic() - start < 15


# ---------------------------------------------------------------- render_prompt


def test_render_prompt_keeps_plain_text(tiny_tokenizer):
    text = "\n\nHuman: hi\n\nAssistant:"
    assert render_prompt(text, tiny_tokenizer) == text
    assert render_prompt(text, None) == text  # plain text needs no tokenizer at all


def test_render_prompt_applies_chat_template_with_generation_prompt(tiny_tokenizer):
    rendered = render_prompt(CONV, tiny_tokenizer)
    assert rendered == "<|im_start|>user\nHow do I boil an egg?<|im_end|>\n<|im_start|>assistant\n"
    assert rendered == tiny_tokenizer.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)


def test_render_prompt_conversation_without_chat_template_is_an_error(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    with pytest.raises(LearndynError, match="chat template"):
        render_prompt(CONV, tiny_tokenizer)


# ---------------------------------------------------------------- fit_prompts


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_fit_prompts_keeps_the_last_tokens_of_long_text_prompts_and_leaves_short_ones(tiny_tokenizer):
    long_prompt = "Human: " + " ".join(f"question {i} about tea?" for i in range(40)) + "\n\nAssistant:"
    prefs = [Preference("short", "Say hi.", "Hi there!", "Go away."),
             Preference("long", long_prompt, "Boil the water.", "I cannot help with that, sorry.")]
    fitted, cut = fit_prompts(prefs, tiny_tokenizer, 64)
    assert cut == 1 and fitted[0] is prefs[0]
    prompt = fitted[1].prompt
    assert long_prompt.endswith(prompt) and prompt.endswith("\n\nAssistant:")
    longest = n_tokens(tiny_tokenizer, prefs[1].rejected) + 1
    assert 64 - longest - 4 <= n_tokens(tiny_tokenizer, prompt) <= 64 - longest  # all the room, no more
    assert (fitted[1].chosen, fitted[1].rejected, fitted[1].example_id) == (prefs[1].chosen, prefs[1].rejected, "long")


def test_fit_prompts_leaves_the_prompt_half_the_limit_when_the_response_is_longer(tiny_tokenizer):
    prompt = " ".join(f"word{i}" for i in range(200))
    (fitted,), cut = fit_prompts([Preference("a", prompt, "a long answer " * 60, None)], tiny_tokenizer, 64)
    assert cut == 1 and 28 <= n_tokens(tiny_tokenizer, fitted.prompt) <= 32  # the scorer's policy: half of 64


def test_fit_prompts_drops_the_oldest_turns_of_a_conversation_but_not_its_system_message(tiny_tokenizer):
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": role, "content": f"{role} {i}: tea"} for i in range(6) for role in ("user", "assistant")][:-1]

    def length(messages):
        return n_tokens(tiny_tokenizer, render_prompt(messages, tiny_tokenizer))

    (fitted,), cut = fit_prompts([Preference("a", [system, *turns], "Yes.", "No.")], tiny_tokenizer, 128)
    kept = fitted.prompt
    assert cut == 1 and kept[0] == system and kept[1]["role"] == "user" and kept[-1] == turns[-1]
    start = len(turns) - (len(kept) - 1)
    assert 0 < start < len(turns) - 1
    assert length(kept) <= 128 - 4 and length([system, *turns[start - 2:]]) > 128 - 4  # the most that fits
    whole, none_cut = fit_prompts([Preference("a", [system, *turns], "Yes.", "No.")], tiny_tokenizer, 4096)
    assert none_cut == 0 and whole[0].prompt == [system, *turns]


HH_PROBES = Path(__file__).parents[2] / "shared/data/hh_helpful_probes/train.jsonl"


@pytest.mark.skipif(not HH_PROBES.is_file(), reason="shared HH probe file not present")
def test_authors_hh_file_loads_as_preferences_with_their_probes_as_extras():
    prefs = load_preferences(str(HH_PROBES), limit=10)
    with open(HH_PROBES, encoding="utf-8") as fh:
        raw = [json.loads(next(fh)) for _ in range(10)]
    for pref, row in zip(prefs, raw):
        assert pref.prompt == row["prompt"] and pref.prompt.endswith(HH_MARKER)
        assert (pref.chosen, pref.rejected) == (row["chosen"], row["rejected"])
        assert pref.extras["other_train"] == row["irr_train"]
        assert pref.extras["rejected_semantic"] == row["reject_gptsemantic"]
        assert ("base_sample" in pref.extras) == bool(row["chosen_initial"])
        assert len(pref.extras) == 9 + bool(row["chosen_initial"])  # chosen_selfr is not a probe
