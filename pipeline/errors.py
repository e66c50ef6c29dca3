"""The one exception type that means "the user asked for something we cannot do".

The CLI prints these as a single line on stderr and exits non-zero; anything
else that escapes is a bug and keeps its traceback. A bad command-line argument
is one line too (``ArgumentParser``).
"""

import argparse
import re

# Terminal colour codes, which Ray and torch put in some of their error texts.
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


class UserError(ValueError):
    """Bad input from the user: a path, an option, a config value, a corrupt dataset."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s text (stripped), or its type's name when it has none."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def described(exc: BaseException) -> str:
    """``Type: first line`` of ``exc``, or ``Type`` alone when its text is empty."""
    line = first_line(exc)
    return type(exc).__name__ if line == type(exc).__name__ else f"{type(exc).__name__}: {line}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, with where to read the usage, not the usage block.

    Subcommand parsers made by ``add_subparsers`` are of the same class, so they do the same.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
