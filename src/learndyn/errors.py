"""The one exception type users see.

Anything the user can fix (a bad file, a wrong name, an offline hub) raises `LearndynError` with a
single line that names the file, line or field. The CLI prints that line and exits non-zero; a
traceback means a bug in learndyn, never in the user's input.
"""


class LearndynError(Exception):
    """A user-facing error: one line, no traceback."""
