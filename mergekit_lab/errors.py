"""User-facing errors.

Library code raises :class:`UserError` for bad input (a missing file, an unknown task, a bad
setting). The CLI turns it into one line on stderr and exit code 2, with no traceback unless
``--debug`` is given. Messages say what is wrong, where, and how to fix it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        msg = self.message.rstrip(".")
        if self.hint:
            msg = f"{msg}; {self.hint}"
        return " ".join(msg.split())
