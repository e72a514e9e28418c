"""The exception types the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

import re
from collections.abc import Callable

_FIELD = re.compile(r"\{(\w+)\}")


class AttnscopeError(Exception):
    """A problem with the user's input or environment, stated in one line.

    Library code raises it with a message a researcher can act on; the CLI prints the
    message (no traceback) and exits with status 2. Anything else is a bug.
    """


class ConfigError(AttnscopeError):
    """A setting has a value that cannot work, or a remedy is another setting.

    The message names settings as the Python API spells them (`batch_size must be at least
    1, got 0`), because that is what a notebook user typed. `field` is the setting at
    fault (or None); `detail` may name other settings as `{name}`. The CLI knows which flag
    each setting comes from and re-words the message in its own terms (`--batch-size ...`),
    so no library message mentions a command-line flag.
    """

    def __init__(self, field: str | None, detail: str) -> None:
        self.field = field
        self.detail = detail
        super().__init__(self.worded(lambda name: name))

    def worded(self, spell: Callable[[str], str]) -> str:
        """The message with every setting spelled by `spell` (a CLI flag, say)."""
        text = _FIELD.sub(lambda m: spell(m.group(1)), self.detail)
        return f"{spell(self.field)} {text}" if self.field else text


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
