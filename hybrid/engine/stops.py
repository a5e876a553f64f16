"""Stop strings over streamed text: emit what can no longer become a stop string."""

from __future__ import annotations


class StopMatcher:
    """Feed generated text piece by piece; text that could still be the start of a stop
    string is held back, and a completed stop string ends the stream without being emitted."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None   # the stop string that ended the stream

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string has completed)."""
        if self.stopped:
            return "", True
        buf = self._held + text
        hits = [(i, s) for i, s in ((buf.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda h: h[0])
            self._held, self.stopped = "", True
            return buf[:at], True
        keep = self._partial(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """Release the held-back text at the end of generation."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _partial(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest
