"""Tool calls and reasoning on canned model outputs: parsing every call format (parallel
calls included), the format chosen from a chat template, streamed parsing, the call
grammars accepting their own format, and the <think> split."""

import json

import pytest

from hybrid.engine.grammar import Constraint
from hybrid.server.chat_output import ChatOutput
from hybrid.server.reasoning import ReasoningStream, split_reasoning
from hybrid.server.tools import (DEEPSEEK_V3, HERMES, LLAMA3, MISTRAL, ToolStream, call_grammar,
                                 parse_tool_calls, tool_format)

W = {"city": "Paris", "unit": "celsius"}
T = {"tz": "Europe/Paris"}
CANNED = {
    HERMES: 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
    LLAMA3: '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
            '{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}',
    MISTRAL: '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
             '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]',
    DEEPSEEK_V3: 'Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
                 '{"city": "Paris", "unit": "celsius"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function'
                 '<｜tool▁sep｜>get_time\n```json\n{"tz": "Europe/Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}},
]


@pytest.mark.parametrize("fmt", list(CANNED), ids=lambda f: f.name)
def test_parallel_calls_parse_in_every_format(fmt):
    content, calls = parse_tool_calls(CANNED[fmt], fmt)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", W), ("get_time", T)]
    assert content == ("Let me check." if CANNED[fmt].startswith("Let") else "")
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("fmt", list(CANNED), ids=lambda f: f.name)
def test_streamed_parsing_matches_whole(fmt):
    """Pieces of 3 characters: content never leaks a marker; the calls are the same."""
    text = CANNED[fmt]
    s = ToolStream(fmt)
    content, calls = "", []
    for i in range(0, len(text), 3):
        c, new = s.push(text[i:i + 3])
        content, calls = content + c, calls + new
    c, new = s.flush()
    content, calls = content + c, calls + new
    whole_content, whole = parse_tool_calls(text, fmt)
    assert content.rstrip() == whole_content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole]


@pytest.mark.parametrize("fmt", list(CANNED), ids=lambda f: f.name)
def test_streamed_deltas_rebuild_the_calls(fmt):
    """OpenAI's streamed form: per index a head (id, name) then argument fragments whose
    concatenation is the arguments; Hermes arguments go out as they grow."""
    out, deltas = ChatOutput(tools=fmt), []
    text = CANNED[fmt]
    for i in range(0, len(text), 3):
        deltas += out.push(text[i:i + 3]).deltas
    deltas += out.flush().deltas
    heads = [d for d in deltas if d.id is not None]
    assert [(d.index, d.name) for d in heads] == [(0, "get_weather"), (1, "get_time")]
    args = ["".join(d.arguments for d in deltas if d.index == k) for k in (0, 1)]
    assert [json.loads(a) for a in args] == [W, T]
    assert [h.id for h in heads] == [c.id for c in out.tools.calls] and out.n_calls == 2
    if fmt is HERMES:
        assert sum(1 for d in deltas if d.index == 0 and d.arguments) > 5


def test_plain_text_and_broken_calls_stay_content():
    assert parse_tool_calls("Just an answer.", HERMES) == ("Just an answer.", [])
    broken = "<tool_call>\n{\"name\": \"f\", \"arguments\": {oops}\n</tool_call>"
    assert parse_tool_calls(broken, HERMES) == (broken, [])
    assert parse_tool_calls('{"answer": 42}', LLAMA3) == ('{"answer": 42}', [])
    s = ToolStream(HERMES)
    assert s.push("a <tool") == ("a ", [])          # held: may open a call
    assert s.push("box> b") == ("<toolbox> b", [])


@pytest.mark.parametrize("template, family, fmt", [
    ("{% for m in messages %}<tool_call>{{ m }}</tool_call>{% endfor %}", None, HERMES),   # Qwen 2.5 / 3
    ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS]", None, MISTRAL),
    ("{{'<｜tool▁calls▁begin｜>'}}", None, DEEPSEEK_V3),
    ("{%- if tools %}Environment: ipython{% endif %}<|python_tag|>", None, LLAMA3),
    ("{% if tools %}{{ tools | tojson }}{% endif %}", "mistral", MISTRAL),   # no marker: the family
    ("{{ messages }}", "mistral", HERMES),            # renders no tools at all: the default
    (None, None, HERMES),                             # SmolLM2 and other templates without tools
])
def test_format_from_the_template(template, family, fmt):
    assert tool_format(template, family) is fmt


def _accepts(tok, grammar, text) -> bool:
    c = Constraint(tok, grammar)
    for t in tok.encode(text):
        if not c.matcher.consume_token(t):
            return False
    return c.matcher.is_accepting()


@pytest.mark.parametrize("fmt", list(CANNED), ids=lambda f: f.name)
def test_call_grammar_accepts_its_format_and_rejects_bad_arguments(tok, fmt):
    """The grammar of each format takes that format's (parallel) calls, one call when not
    parallel, and refuses arguments outside the tool's schema."""
    text = CANNED[fmt].removeprefix("Let me check.").lstrip("\n").removeprefix("<|python_tag|>")
    g = call_grammar(fmt, TOOLS, "required", parallel=True, tokenizer=tok)
    assert _accepts(tok, g, text)
    assert not _accepts(tok, g, text.replace("celsius", "kelvin"))
    assert not _accepts(tok, g, text.replace("get_time", "get_date"))
    assert not _accepts(tok, call_grammar(fmt, TOOLS, "required", parallel=False, tokenizer=tok), text)
    assert not _accepts(tok, call_grammar(fmt, TOOLS, "get_weather", tokenizer=tok), text)   # one call of it


def test_reasoning_split_streamed_and_whole():
    text = "<think>\nThe user greets me.\n</think>\n\nHello!"
    assert split_reasoning(text) == ("\nThe user greets me.\n", "Hello!")
    assert split_reasoning(text, fmt="none") == ("", text)
    assert split_reasoning(text, fmt="hidden") == ("", "Hello!")
    assert split_reasoning("Plain answer <think> inside") == ("", "Plain answer <think> inside")
    assert split_reasoning("Thinking already</think>Answer", thinking=True) == ("Thinking already", "Answer")
    assert split_reasoning("<think>cut short", thinking=False) == ("cut short", "")
    s = ReasoningStream()
    got = [s.push(p) for p in ["<th", "ink>ab", "c</th", "ink>", "\n\nX", "Y"]] + [s.flush()]
    assert "".join(r for r, _ in got) == "abc" and "".join(c for _, c in got) == "XY"
    assert got[0] == ("", "") and got[2] == ("c", "")    # tag prefixes held back


def test_chat_output_reasoning_then_calls():
    out = ChatOutput(thinking=True, tools=HERMES).whole(
        "I should call the tool.</think>\n" + CANNED[HERMES].split("Let me check.\n")[1])
    assert out.reasoning == "I should call the tool." and out.content == ""
    assert [c.name for c in out.calls] == ["get_weather", "get_time"]
