"""What a start is doing, in words a person can read: the stage ("mapping weights",
"compiling Q4_1 kernels: decode"), how far it got (40 of 98 MB, 2 of 3 steps) and for how long.

One `Progress` is shared by the threads that load and compile (writers) and those that
show it (the command line's status line, the server's /health); `snapshot()` is a plain
dict, the JSON /health answers with.
"""

from __future__ import annotations

import sys
import threading
import time


class Progress:
    """The current stage of a start, updated from any thread; listeners are called on every
    change (keep them quick)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._state = {"stage": "starting", "done": 0, "total": 0, "unit": "", "detail": ""}
        self._listeners = []

    def stage(self, name: str, total: float = 0, unit: str = "", detail: str = "") -> None:
        """Begin a stage of `total` `unit`s (0: no count)."""
        self._set(stage=name, done=0, total=total, unit=unit, detail=detail)

    def update(self, done: float | None = None, detail: str | None = None, advance: float = 0) -> None:
        with self._lock:
            if done is not None:
                self._state["done"] = done
            self._state["done"] += advance
            if detail is not None:
                self._state["detail"] = detail
        self._notify()

    def snapshot(self) -> dict:
        """{"stage", "done", "total", "unit", "detail", "elapsed_s", "message"}."""
        with self._lock:
            s = dict(self._state)
        s["elapsed_s"] = round(time.monotonic() - self._t0, 1)
        s["message"] = describe(s)
        return s

    def listen(self, fn) -> None:
        """fn(snapshot) on every change."""
        self._listeners.append(fn)

    def _set(self, **fields) -> None:
        with self._lock:
            self._state.update(fields)
        self._notify()

    def _notify(self) -> None:
        if self._listeners:
            snap = self.snapshot()
            for fn in list(self._listeners):
                fn(snap)


def describe(s: dict) -> str:
    """'mapping weights 40/98 MB', 'compiling Q4_1 kernels: decode 2/3 (attention_step)'."""
    text = s["stage"]
    if s.get("total"):
        done, total = s["done"], s["total"]
        count = f"{done:.0f}/{total:.0f}" if total >= 10 or float(total).is_integer() else f"{done:.1f}/{total:.1f}"
        text += f" {count}" + (f" {s['unit']}" if s.get("unit") else "")
    if s.get("detail"):
        text += f" ({s['detail']})"
    return text


class StatusLine:
    """Shows a Progress on one line of a terminal (rewritten in place), or as one line per
    stage where stderr is not a terminal; `close()` clears it."""

    def __init__(self, stream=None, prefix: str = "hybrid", min_interval: float = 0.1):
        self.stream, self.prefix = stream or sys.stderr, prefix
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_interval, self._last, self._stage, self._width = min_interval, 0.0, None, 0
        self._lock = threading.Lock()

    def __call__(self, snap: dict) -> None:
        with self._lock:
            if self.tty:
                now = time.monotonic()
                if snap["stage"] == self._stage and now - self._last < self.min_interval:
                    return
                self._last, self._stage = now, snap["stage"]
                line = f"{self.prefix}: {snap['message']} [{snap['elapsed_s']:.0f}s]"[:150]
                self.stream.write("\r" + line.ljust(self._width) + "\r")
                self._width = len(line)
            elif snap["stage"] != self._stage:
                self._stage = snap["stage"]
                self.stream.write(f"{self.prefix}: {snap['message']} [{snap['elapsed_s']:.0f}s]\n")
            self.stream.flush()

    def say(self, text: str) -> None:
        """A line of its own (the status line, if any, is cleared first)."""
        with self._lock:
            if self.tty and self._width:
                self.stream.write("\r" + " " * self._width + "\r")
                self._width, self._stage = 0, None
            self.stream.write(f"{self.prefix}: {text}\n")
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self.tty and self._width:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
            self._width = 0
