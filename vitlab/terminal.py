"""What reaches a terminal: control characters in names, paths and messages are shown escaped.

A recipe name, a variant name in a merged shard or a file name is the user's (or an attacker's)
text. Printed raw, ``ESC ] 0 ;`` sets the terminal title, ``ESC [ 2 J`` clears the screen and a
newline forges a second ``ok:`` line. Two layers keep them out:

- ``one_line`` (``errors``) at the places that print data: a name, a table cell or an error line is
  one line, every control character in it written as its escape (``\\n``, ``\\x1b``).
- ``guard_std_streams`` for the whole CLI process: whatever is written to stdout or stderr has its
  control characters escaped, except the line breaks and tabs between lines and the colour codes
  (SGR, ``ESC [ ... m``) that the table renderer itself emits.
"""
from __future__ import annotations

import io
import re
import sys
from typing import TextIO

# a colour / style sequence (SGR): the only escape sequence vitlab writes itself (rich's tables)
_SGR = re.compile(r"\x1b\[[0-9;]*m")
# every other control character: C0 but tab and newline, DEL, C1, and the invisible format
# characters that reorder or hide text (bidi overrides, zero-width joiners)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def _escape(ch: str) -> str:
    return repr(ch)[1:-1]


def escape_controls(text: str) -> str:
    """``text`` with every control character but ``\\n``, ``\\t`` and SGR colour codes escaped."""
    out, last = [], 0
    for m in _SGR.finditer(text):
        out.append(_CONTROL.sub(lambda c: _escape(c.group()), text[last:m.start()]))
        out.append(m.group())
        last = m.end()
    out.append(_CONTROL.sub(lambda c: _escape(c.group()), text[last:]))
    return "".join(out)


class GuardedStream(io.TextIOBase):
    """A text stream that writes to ``stream`` with ``escape_controls`` applied. It has no
    ``buffer``, so click and rich write text to it rather than bytes around it."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._stream, "errors", None)

    def write(self, text: str) -> int:
        self._stream.write(escape_controls(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def writable(self) -> bool:
        return True


def guard_std_streams() -> None:
    """Guard ``sys.stdout`` and ``sys.stderr`` for the rest of the process (the CLI calls this once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, GuardedStream):
            setattr(sys, name, GuardedStream(stream))
