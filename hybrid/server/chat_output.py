"""One chat choice's generated text, taken apart: reasoning, content and tool calls, as
pieces for a stream or gathered for a whole message. Reasoning comes off first (a think
block precedes the answer), then tool calls are parsed out of what remains. Harmony
output (gpt-oss) says in each message's header which of the three it is, so one
HarmonyToolStream reads all three."""

from __future__ import annotations

from dataclasses import dataclass, field

from .reasoning import ReasoningStream
from .tools import HARMONY, CallDelta, HarmonyToolStream, ToolCall, ToolFormat, ToolStream


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
    tool calls are not parsed, e.g. no tools or tool_choice "none"); harmony: the model
    writes harmony (then `thinking` does not apply; reasoning_format "none" leaves the
    analysis channel's text in the content)."""

    def __init__(self, thinking: bool = False, reasoning_format: str = "deepseek", tools: ToolFormat | None = None,
                 harmony: bool = False):
        self.harmony = HarmonyToolStream(HARMONY, calls=tools is not None) if harmony else None
        self.reasoning_format = reasoning_format
        self.reasoning = ReasoningStream(thinking, reasoning_format)
        self.tools = self.harmony or (ToolStream(tools) if tools is not None else None)
        self.n_calls = 0

    def push(self, text: str) -> Parts:
        if self.harmony is not None:
            return self._harmony(*self.harmony.push(text))
        r, c = self.reasoning.push(text)
        return self._content(Parts(reasoning=r), c, final=False)

    def flush(self) -> Parts:
        if self.harmony is not None:
            return self._harmony(*self.harmony.flush())
        r, c = self.reasoning.flush()
        return self._content(Parts(reasoning=r), c, final=True)

    def _harmony(self, content: str, calls: list[ToolCall]) -> Parts:
        reasoning, self.harmony.reasoning = self.harmony.reasoning, ""
        out = Parts(content=content, calls=calls, deltas=self.harmony.deltas())
        if self.reasoning_format == "none":
            out.content = reasoning + content
        elif self.reasoning_format != "hidden":
            out.reasoning = reasoning
        self.n_calls = max([self.n_calls, len(self.harmony.calls)] + [d.index + 1 for d in out.deltas])
        return out

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
