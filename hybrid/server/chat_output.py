"""One chat choice's generated text, taken apart: reasoning, content and tool calls, as
pieces for a stream or gathered for a whole message. Reasoning comes off first (a think
block precedes the answer), then tool calls are parsed out of what remains."""

from __future__ import annotations

from dataclasses import dataclass, field

from .reasoning import ReasoningStream
from .tools import CallDelta, ToolCall, ToolFormat, ToolStream


@dataclass
class Parts:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)       # completed by this piece
    deltas: list[CallDelta] = field(default_factory=list)     # the calls' streamed form (OpenAI)

    def __iadd__(self, other: "Parts") -> "Parts":
        self.reasoning += other.reasoning
        self.content += other.content
        self.calls += other.calls
        self.deltas += other.deltas
        return self


class ChatOutput:
    """thinking: the prompt opened a think block; tools: the call format to parse (None:
    tool calls are not parsed, e.g. no tools or tool_choice "none")."""

    def __init__(self, thinking: bool = False, reasoning_format: str = "deepseek", tools: ToolFormat | None = None):
        self.reasoning = ReasoningStream(thinking, reasoning_format)
        self.tools = ToolStream(tools) if tools is not None else None
        self.n_calls = 0

    def push(self, text: str) -> Parts:
        r, c = self.reasoning.push(text)
        return self._content(Parts(reasoning=r), c, final=False)

    def flush(self) -> Parts:
        r, c = self.reasoning.flush()
        return self._content(Parts(reasoning=r), c, final=True)

    def _content(self, out: Parts, text: str, final: bool) -> Parts:
        if self.tools is None:
            out.content = text
            return out
        out.content, out.calls = self.tools.push(text) if text else ("", [])
        if final:
            rest, calls = self.tools.flush()
            out.content += rest
            out.calls += calls
        out.deltas = self.tools.deltas()
        self.n_calls = max([self.n_calls, len(self.tools.calls)] + [d.index + 1 for d in out.deltas])
        return out

    def whole(self, text: str) -> Parts:
        parts = self.push(text)
        parts += self.flush()
        return parts
