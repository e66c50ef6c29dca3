"""The one exception type that means "the user asked for something we cannot do".

The CLI prints these as a single line on stderr and exits non-zero; anything
else that escapes is a bug and keeps its traceback. A bad command-line argument
is one line too (``ArgumentParser``).
"""

import argparse


class UserError(ValueError):
    """Bad input from the user: a path, an option, a config value, a corrupt dataset."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, with where to read the usage, not the usage block.

    Subcommand parsers made by ``add_subparsers`` are of the same class, so they do the same.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
