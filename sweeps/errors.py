"""User mistakes: reported as one clear line and exit code 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a bad config, an unreachable store, a wrong name."""

    exit_code = 2
