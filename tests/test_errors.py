"""first_line: the one line a foreign error becomes inside a LearndynError."""

from learndyn.errors import first_line


def test_first_non_empty_line_or_the_type_name():
    assert first_line(ValueError("\n  bad header  \nTraceback detail\n")) == "bad header"
    assert first_line(OSError()) == "OSError"  # an empty message used to raise IndexError in some callers
    assert first_line(KeyError("")) == "''"  # KeyError's str is its repr
