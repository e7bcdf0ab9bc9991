"""User-facing errors.

Every failure a user can cause (a bad file, a bad flag, an impossible budget)
is raised as a :class:`Ds4Error` subclass with a one-line message; the CLI
prints that line and exits non-zero instead of showing a traceback.
"""


class Ds4Error(Exception):
    """A failure caused by user input, reported as one line."""


class ModelError(Ds4Error):
    """The GGUF file is missing, unreadable, or not a valid DS4 model."""


class UsageError(Ds4Error):
    """A command-line flag or argument is invalid."""
