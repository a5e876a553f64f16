"""Reasoning kept out of the answer: `<think>...</think>` (Qwen3, DeepSeek-R1 and others).

An output that begins with `<think>` (or whose prompt already opened it: templates that end
the generation prompt with `<think>`) is split into reasoning and content as it streams.
What a request asks for (`reasoning_format`): "deepseek" (the default) returns the two
apart, "none" leaves the text as generated, "hidden" drops the reasoning.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
FORMATS = ("deepseek", "none", "hidden")


def prompt_opens_thinking(tokenizer, prompt_ids: list[int]) -> bool:
    """True when the rendered prompt ends inside a think block (the template wrote `<think>`)."""
    tail = tokenizer.decode(prompt_ids[-8:]).rstrip()
    return tail.endswith(OPEN)


class ReasoningStream:
    """Feed generated text piece by piece; get (reasoning, content) to send for each piece.
    Text that may still be part of a tag is held back until it is decided."""

    def __init__(self, thinking: bool = False, fmt: str = "deepseek"):
        self.fmt = fmt
        self.state = "thinking" if thinking else "start"
        self._held = ""

    def push(self, text: str) -> tuple[str, str]:
        if self.fmt == "none":
            return "", text
        buf, reasoning, content = self._held + text, "", ""
        self._held = ""
        while buf:
            if self.state == "start":
                s = buf.lstrip()
                if s.startswith(OPEN):
                    self.state, buf = "thinking", s[len(OPEN):]
                elif not s or OPEN.startswith(s):
                    self._held = buf
                    break
                else:
                    self.state = "content"
            elif self.state == "thinking":
                i = buf.find(CLOSE)
                if i >= 0:
                    reasoning += buf[:i]
                    self.state, buf = "after", buf[i + len(CLOSE):]
                    continue
                keep = next((n for n in range(min(len(CLOSE) - 1, len(buf)), 0, -1) if buf.endswith(CLOSE[:n])), 0)
                reasoning += buf[:len(buf) - keep]
                self._held = buf[len(buf) - keep:]
                break
            elif self.state == "after":       # the blank lines between the two parts
                buf = buf.lstrip()
                if buf:
                    self.state = "content"
            else:
                content += buf
                break
        return ("" if self.fmt == "hidden" else reasoning), content

    def flush(self) -> tuple[str, str]:
        """At the end: what was held back (an unclosed think block's tail is reasoning)."""
        held, self._held = self._held, ""
        if self.state == "thinking":
            return ("" if self.fmt == "hidden" else held), ""
        return "", held if self.state != "after" else ""


def split_reasoning(text: str, thinking: bool = False, fmt: str = "deepseek") -> tuple[str, str]:
    """(reasoning, content) of a whole output."""
    s = ReasoningStream(thinking, fmt)
    r1, c1 = s.push(text)
    r2, c2 = s.flush()
    return r1 + r2, c1 + c2
