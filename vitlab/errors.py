"""The exceptions vitlab raises for problems a user can fix.

Every user-facing failure is a :class:`VitlabError`; the CLI prints ``str(error)`` (one line per
problem) and exits with ``error.exit_code``, never a traceback.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence


class VitlabError(Exception):
    """Base class of every error vitlab raises for bad input."""

    exit_code = 2

    def lines(self) -> list[str]:
        """One readable line per problem (the CLI prints these)."""
        return [one_line(line) for line in str(self).splitlines()] or [type(self).__name__]


@dataclass(frozen=True)
class Problem:
    """One problem in a recipe: where (a dotted field path) and what."""

    loc: str
    msg: str

    def __str__(self) -> str:
        text = f"{self.loc}: {self.msg}" if self.loc else self.msg
        return one_line(text)


class SpecError(VitlabError, ValueError):
    """A recipe or spec that does not validate. Carries every problem found, not only the first.

    Args:
        problems: the problems, each with a dotted field path (``attention.params.qk_norm``).
        source: the file or recipe the problems come from, prefixed to each line.
    """

    def __init__(self, problems: Sequence[Problem] | str, source: str | None = None):
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        prefix = one_line(f"{self.source}: ") if self.source else ""
        return [f"{prefix}{p}" for p in self.problems]

    def with_source(self, source: str) -> "SpecError":
        return SpecError(self.problems, source=self.source or source)


class PluginError(VitlabError):
    """A plugin that fails to load, registers a duplicate name or returns a non-component."""


class WeightsError(VitlabError):
    """A checkpoint that cannot be read or does not fit the model."""


def one_line(text: str) -> str:
    """Escape line breaks and other control characters so a problem prints as exactly one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def path_label(path: object) -> str:
    """A file name as a message shows it. A newline is a legal character in a file name, so names
    are escaped like the rest of a problem: a message naming a file stays one line."""
    return one_line(str(path))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'mhsa'?"`` when a choice is close to ``word``, else ``""``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def known(choices: Iterable[str], label: str = "known") -> str:
    """``"known: a, b, c"`` (sorted), or ``"known: (none)"``."""
    names = sorted(choices)
    return f"{label}: " + (", ".join(names) if names else "(none)")


def unknown_choice(what: str, word: object, choices: Iterable[str], label: str = "known", extra: str = "") -> str:
    """``unknown attention 'mhas'; did you mean 'mhsa'? known: mhsa`` (the one message format for
    bad names and keys)."""
    choices = list(choices)
    hint = did_you_mean(str(word), choices)
    return f"unknown {what} {str(word)!r}{extra}{hint}{' ' if hint else '; '}{known(choices, label)}"


# how allocation failures read: CUDA's "out of memory", the CPU allocator's "can't allocate memory"
# (torch's DefaultCPUAllocator under a process memory cap), ENOMEM's "Cannot allocate memory", C++'s
# bad_alloc, and MPS / XPU wordings
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc",
                  "not enough memory", "failed to allocate", "allocation failed")


def is_out_of_memory(exc: BaseException | str) -> bool:
    """Whether ``exc`` (or an error message) is an allocation failure, however the allocator says it."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(phrase in text for phrase in _OUT_OF_MEMORY)
