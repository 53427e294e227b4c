"""The output of a simulated job process: lines that appear as virtual time passes.

A run writes one stdout line every ``STEP`` seconds from its start until it ends, and one
stderr line every fourth step; each line names the run, so output of two runs never looks
alike. Nothing is stored: the bytes are a function of (tag, start, end, now).
"""

from __future__ import annotations

from dataclasses import dataclass

STEP = 0.25


@dataclass(slots=True)
class SimLog:
    tag: str  # names the run: job id and attempt
    start: float
    end: float  # when the process ends (or ended)

    def stop(self, now: float) -> None:
        self.end = min(self.end, now)

    def _lines(self, now: float) -> int:
        upto = min(now, self.end)
        return 0 if upto < self.start else int((upto - self.start) / STEP) + 1

    def content(self, stream: str, now: float) -> bytes:
        n = self._lines(now)
        if stream == "stdout":
            return b"".join(f"{self.tag} line {k}\n".encode() for k in range(n))
        return b"".join(f"{self.tag} warn {k}\n".encode() for k in range(0, n, 4))

    def read(self, stream: str, offset: int, limit: int, now: float) -> bytes:
        return self.content(stream, now)[offset:offset + limit]
