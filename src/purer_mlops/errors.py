"""One exception type for every mistake a user can fix: the CLI turns it into a message and exit 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (data, parameters, model files).

    The message names the problem and the fix; the CLI prints it without a
    traceback and exits with code 2.
    """

    exit_code = 2
