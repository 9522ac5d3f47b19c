"""The one exception type users see.

Anything the user can fix (a bad file, a wrong name, an offline hub) raises `LearndynError` with a
single line that names the file, line or field. The CLI prints that line and exits non-zero; a
traceback means a bug in learndyn, never in the user's input.
"""


class LearndynError(Exception):
    """A user-facing error: one line, no traceback."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of a foreign error's message (its type's name when it has none), for
    wrapping it into a one-line LearndynError: library messages often run to many lines."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__
