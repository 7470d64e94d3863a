"""User-facing errors: one clear line, a non-zero exit, no traceback unless --debug.

Every mistake a user can make (bad config, bad data, missing files) raises `UserError`
or a subclass; the CLI prints `error: <message>` and exits with `code`.
"""

from __future__ import annotations

import difflib


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: a run stopped on SIGTERM/SIGUSR1 after saving a checkpoint; --resume continues
INTERRUPTED_EXIT = 130  # 128 + SIGINT: a run stopped by Ctrl-C (after saving, on the first one)


class UserError(Exception):
    """A problem the user can fix; printed as one line by the CLI."""

    code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.where = where
        self.hint = hint
        self.message = message
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class ConfigError(UserError):
    """The YAML config or a command-line override is invalid."""


class DataError(UserError):
    """A data file is missing, malformed or yields nothing trainable."""


def did_you_mean(word: str, choices) -> str | None:
    """A 'did you mean X?' hint for `word` among `choices`, or None when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
