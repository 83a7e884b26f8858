"""A run's log as every side sees it: records ``{"o", "t", "s", "d"}`` of an append-only byte
stream (SPEC §7 "Logs"). The host stores them (:mod:`..host.logs`); clients read them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class LogStream(str, Enum):
    """Where a log record's text came from."""

    OUT = "out"  # the container's standard output
    ERR = "err"  # the container's standard error
    SYS = "sys"  # messages written by the queue itself (pull, start, exit, cancel)


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One piece of a run's log; ``cut`` > 0 marks a synthesized truncation record."""

    o: int
    t: int
    s: str
    d: str
    cut: int = 0

    def to_json(self) -> dict[str, object]:
        """The wire form; ``cut`` is only present on truncation records."""
        cut: dict[str, object] = {"cut": self.cut} if self.cut else {}
        return {"o": self.o, "t": self.t, "s": self.s, "d": self.d, **cut}

    @property
    def end(self) -> int:
        """Stream offset just after this record (where a client resumes)."""
        return self.o + (self.cut if self.cut else len(self.d.encode()))
