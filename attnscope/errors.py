"""The exception types the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class AttnscopeError(Exception):
    """A problem with the user's input or environment, stated in one line.

    Library code raises it with a message a researcher can act on; the CLI prints the
    message (no traceback) and exits with status 2. Anything else is a bug.
    """


class ConfigError(AttnscopeError):
    """One setting has a value that cannot work.

    The message names the setting as the Python API spells it (`batch_size must be at
    least 1, got 0`), because that is what a notebook user typed. The CLI knows which flag
    each field comes from and re-words the message in its own terms (`--batch-size ...`),
    so a library message never mentions a command-line flag.
    """

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        self.detail = detail
        super().__init__(f"{field} {detail}")

    def worded(self, name: str) -> str:
        """The same message with the field called `name` (a CLI flag, say)."""
        return f"{name} {self.detail}"
