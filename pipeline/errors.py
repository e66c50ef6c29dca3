"""The one exception type that means "the user asked for something we cannot do".

The CLI prints these as a single line on stderr and exits non-zero; anything
else that escapes is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: a path, an option, a config value, a corrupt dataset."""
