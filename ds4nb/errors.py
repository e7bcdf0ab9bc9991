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


class PluginError(Ds4Error):
    """A plugin failed to import, raised, or returned something invalid; the message names it."""

    def __init__(self, plugin: str, message: str) -> None:
        super().__init__(" ".join(f"plugin {plugin}: {message}".split()))  # one line, whatever the plugin raised
        self.plugin = plugin
