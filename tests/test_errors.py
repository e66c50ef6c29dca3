"""The one-line error texts every command prints come from these helpers."""

import pytest

from pipeline.errors import described, first_line


@pytest.mark.parametrize("exc, line, full", [
    (RuntimeError("boom\nTraceback ..."), "boom", "RuntimeError: boom"),
    (ValueError("\n\n  late first line  \nmore"), "late first line", "ValueError: late first line"),
    (KeyError(), "KeyError", "KeyError"),       # no text at all: its type, never an IndexError
    (OSError("   \n"), "OSError", "OSError"),   # only blanks
])
def test_first_line_and_described(exc, line, full):
    assert first_line(exc) == line
    assert described(exc) == full
