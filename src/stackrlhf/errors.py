"""User-facing errors: the CLI prints their message on one line and exits non-zero, without a traceback."""


class StackRLHFError(Exception):
    """An error caused by the user's input or environment; the message says what to fix."""


class DumpError(StackRLHFError):
    """A Stack Exchange dump is missing, malformed, truncated, or could not be fetched."""
