"""gpt-oss's harmony format, as generated: a run of messages, each a header (role,
`<|channel|>` name, an optional ` to=` recipient and `<|constrain|>` type) then
`<|message|>` and a body that ends at `<|end|>`, `<|call|>` or `<|return|>`. The
generation prompt ends with `<|start|>assistant`, so an output begins inside the first
header.

What a message is for comes from its header: a recipient makes it a tool call (body: the
arguments JSON), the `analysis` channel is reasoning, anything else (`final`, a
`commentary` preamble, text with no header at all) is the answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

START, MESSAGE = "<|start|>", "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
_BODY_ENDS = (*ENDS, START)        # a body also ends where the next message starts
_CHANNEL = re.compile(r"<\|channel\|>\s*([\w-]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


@dataclass
class Message:
    header: str                   # as generated (from `<|start|>` if the output wrote it), `<|message|>` excluded
    channel: str | None = None
    recipient: str | None = None
    index: int = 0                # its place in the output

    @classmethod
    def parse(cls, header: str) -> "Message":
        channel, recipient = _CHANNEL.search(header), _RECIPIENT.search(header)
        return cls(header, channel and channel.group(1), recipient and recipient.group(1))

    @property
    def kind(self) -> str:
        """'call', 'reasoning' or 'content'."""
        if self.recipient is not None:
            return "call"
        return "reasoning" if self.channel == "analysis" else "content"

    @property
    def tool_name(self) -> str:
        return (self.recipient or "").removeprefix("functions.")


def _held(buf: str, markers) -> int:
    """Length of the longest suffix of buf that could begin one of `markers`."""
    for n in range(min(max(map(len, markers)) - 1, len(buf)), 0, -1):
        if any(m.startswith(buf[-n:]) for m in markers):
            return n
    return 0


def _could_be_header(buf: str) -> bool:
    """A header starts with a marker (or, right after the prompt's `<|start|>assistant`,
    with its recipient); anything else is plain text from a model that ignores the format."""
    s = buf.lstrip()
    return any(s.startswith(p) or p.startswith(s) for p in ("<|", "to="))


class HarmonySplit:
    """Feed generated text piece by piece; each push gives (message, body text, ended)
    pieces: a message's first piece comes as soon as its header is complete (its text may
    be empty), the last one has ended true. Text that may be part of a marker is held back."""

    def __init__(self):
        self._buf = ""
        self.message: Message | None = None     # the message whose body is being read
        self.count = 0                          # messages begun

    def _begin(self, msg: Message) -> Message:
        msg.index, self.count = self.count, self.count + 1
        self.message = msg
        return msg

    def push(self, text: str) -> list[tuple[Message, str, bool]]:
        self._buf += text
        out = []
        while self._buf:
            if self.message is None:
                at = self._buf.find(MESSAGE)
                if at >= 0:
                    self._begin(Message.parse(self._buf[:at]))
                    self._buf = self._buf[at + len(MESSAGE):]
                    out.append((self.message, "", False))
                    continue
                if _could_be_header(self._buf):
                    break
                self._begin(Message(""))           # plain text: an answer with no header
                out.append((self.message, "", False))
            ends = [(i, m) for m in _BODY_ENDS if (i := self._buf.find(m)) >= 0]
            if ends:
                at, marker = min(ends)
                out.append((self.message, self._buf[:at], True))
                self._buf = self._buf[at + (0 if marker == START else len(marker)):]
                self.message = None
                continue
            keep = _held(self._buf, _BODY_ENDS)
            body, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
            if body:
                out.append((self.message, body, False))
            break
        return out

    def flush(self) -> list[tuple[Message, str, bool]]:
        """At the end: the open message's rest (generation stopped at its end token, which
        is not part of the text). An unfinished header is dropped, unless it is plain text."""
        buf, self._buf = self._buf, ""
        if self.message is not None:
            msg, self.message = self.message, None
            return [(msg, buf, True)]
        if buf.strip() and not _could_be_header(buf):
            msg, self.message = self._begin(Message("")), None
            return [(msg, buf, True)]
        return []


def split_harmony(text: str) -> list[tuple[Message, str]]:
    """The messages of a whole output with their bodies."""
    s, out = HarmonySplit(), []
    for msg, piece, _ in s.push(text) + s.flush():
        if msg.index == len(out):
            out.append((msg, ""))
        out[msg.index] = (msg, out[msg.index][1] + piece)
    return out
