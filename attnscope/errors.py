"""The exception types the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

from collections.abc import Callable


class AttnscopeError(Exception):
    """A problem with the user's input or environment, stated in one line.

    Library code raises it with a message a researcher can act on; the CLI prints the
    message (no traceback) and exits with status 2. Anything else is a bug.
    """


class ConfigError(AttnscopeError):
    """A setting has a value that cannot work, or the remedy is another setting.

    The message names settings as the Python API spells them (`batch_size must be at least
    1, got 0`), because that is what a notebook user typed: `field` is the setting at fault
    (or None), and `detail` names any other setting in backquotes (pass `random_init`).
    The CLI knows which flag each setting comes from and re-words the message in its own
    terms (`--batch-size ...`, pass --random-init), so no library message names a flag.
    """

    def __init__(self, field: str | None, detail: str) -> None:
        self.field = field
        self.detail = detail
        super().__init__(self.worded(lambda name: name))

    def worded(self, spell: Callable[[str], str]) -> str:
        """The message with the setting at fault spelled by `spell` (a CLI flag, say)."""
        return f"{spell(self.field)} {self.detail}" if self.field else self.detail


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with one line saying what is complete.

    `detail` says what was committed and where; `resumable` when the same command with
    `resume` continues from it (the CLI then adds that command). Still a KeyboardInterrupt,
    so nothing catches it by accident.
    """

    def __init__(self, detail: str, *, resumable: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.resumable = resumable
