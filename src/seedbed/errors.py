"""The one exception type that reaches the user as a single line, never a traceback."""


class UserError(Exception):
    """Bad input: the CLI prints ``error: <message>`` and exits with code 2."""
