"""User-facing errors.

Every failure a user can cause (a bad file, a bad flag, an impossible budget)
is raised as a :class:`Ds4Error` subclass with a one-line message; the CLI
prints that line and exits non-zero instead of showing a traceback.

Messages often quote what a file or a user supplied (a metadata key, a tensor
name, a string value, a path): :func:`shown` makes such text safe to put in a
one-line message.
"""

import os

SHOWN_LIMIT = 80
PATH_LIMIT = 400


class Ds4Error(Exception):
    """A failure caused by user input, reported as one line."""


class ModelError(Ds4Error):
    """The GGUF file is missing, unreadable, or not a valid DS4 model."""


class UsageError(Ds4Error):
    """A command-line flag or argument is invalid."""


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """Untrusted text for a one-line message: control and other unprintable characters
    escaped (``\\n``, ``\\x00``, ``\\u2028``), and at most ``limit`` characters (ending in ``...``)."""
    text = value if isinstance(value, str) else str(value)
    head = text[:limit]
    if not head.isprintable():
        head = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in head)
    if len(head) < len(text) or len(head) > limit:
        head = head[:limit - 3] + "..."
    return head


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path for a one-line message: like :func:`shown`, with room for a long path."""
    return shown(os.fspath(path), PATH_LIMIT)


class PluginError(Ds4Error):
    """A plugin failed to import, raised, or returned something invalid; the message names it."""

    def __init__(self, plugin: str, message: str) -> None:
        super().__init__(shown(" ".join(f"plugin {plugin}: {message}".split()), 2 * SHOWN_LIMIT))  # one line
        self.plugin = plugin
