"""gpt-oss's harmony format on the server side, on canned outputs: messages split by
channel (analysis is reasoning, final the answer), calls parsed whole and streamed at
every split point, the call grammar, the built-in template's rendering of a conversation
with calls and results, the stop tokens of a harmony vocabulary, and the routes (OpenAI,
Ollama, Anthropic) with a scripted engine."""

import json

import pytest

from hybrid.files.chat_template import builtin_template, render
from hybrid.server.chat_output import ChatOutput
from hybrid.server.harmony import HarmonySplit, split_harmony
from hybrid.server.tools import HARMONY, HERMES, ToolStream, call_grammar, parse_tool_calls, tool_format
from tests.test_tools import _accepts

W = {"city": "Paris", "unit": "celsius"}
T = {"tz": "Europe/Paris"}
THINK = "<|channel|>analysis<|message|>The user wants the weather and the time.<|end|>"
CALLS = ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
         '{"city": "Paris", "unit": "celsius"}<|call|>'
         '<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{"tz": "Europe/Paris"}')
PREAMBLE = "<|start|>assistant<|channel|>commentary<|message|>Let me check.<|end|>"
ANSWER = THINK + "<|start|>assistant<|channel|>final<|message|>It is 21 C in Paris.<|end|>"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}},
]


def _pieces(text, cut):
    return [text[:cut], text[cut:]]


# ---------------------------------------------------------------- parsing

def test_messages_split_by_header():
    msgs = split_harmony(THINK + PREAMBLE + CALLS)
    assert [(m.kind, m.channel, m.recipient) for m, _ in msgs] == [
        ("reasoning", "analysis", None), ("content", "commentary", None),
        ("call", "commentary", "functions.get_weather"), ("call", "commentary", "functions.get_time")]
    assert [b for _, b in msgs][:2] == ["The user wants the weather and the time.", "Let me check."]
    assert split_harmony("Plain text, no header.") [0][1] == "Plain text, no header."


def test_parallel_calls_parse_and_the_answer_between_is_content():
    content, calls = parse_tool_calls(THINK + PREAMBLE + CALLS, HARMONY)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", W), ("get_time", T)]
    assert content == "Let me check."        # the analysis channel is never content
    assert len({c.id for c in calls}) == 2


def test_no_calls_and_broken_arguments_leave_the_text():
    assert parse_tool_calls(ANSWER, HARMONY) == (ANSWER, [])
    broken = "<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{tz: oops}"
    assert parse_tool_calls(broken, HARMONY) == (broken, [])
    # a "to=" inside a body is not a recipient
    text = "<|channel|>final<|message|>Set x to=5 and go."
    assert HARMONY.find_start(text) == -1 and parse_tool_calls(text, HARMONY) == (text, [])


@pytest.mark.parametrize("cut", range(len(THINK + CALLS) + 1))
def test_streamed_deltas_at_every_split_point(cut):
    """Two pieces cut anywhere: the reasoning, each call's head (name first) and its
    argument fragments rebuild what the whole output gives; no marker leaks."""
    text = THINK + CALLS
    out = ChatOutput(tools=HARMONY, harmony=True)
    parts = [out.push(p) for p in _pieces(text, cut)] + [out.flush()]
    assert "".join(p.reasoning for p in parts) == "The user wants the weather and the time."
    assert "".join(p.content for p in parts) == ""
    deltas = [d for p in parts for d in p.deltas]
    heads = [d for d in deltas if d.id is not None]
    assert [(d.index, d.name) for d in heads] == [(0, "get_weather"), (1, "get_time")]
    for k, want in ((0, W), (1, T)):    # the head comes before any argument fragment of its call
        mine = [d for d in deltas if d.index == k]
        assert mine[0].id is not None and json.loads("".join(d.arguments for d in mine)) == want
    calls = [c for p in parts for c in p.calls]
    assert [c.id for c in calls] == [h.id for h in heads] and out.n_calls == 2


def test_arguments_stream_as_they_arrive():
    out = ChatOutput(tools=HARMONY, harmony=True)
    first = out.push("<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>")
    assert [(d.name, d.arguments) for d in first.deltas] == [("get_time", "")] and not first.calls
    assert [d.arguments for d in out.push('{"tz": "Eu').deltas] == ['{"tz": "Eu']
    assert [d.arguments for d in out.push('rope/Paris"}').deltas] == ['rope/Paris"}']
    last = out.flush()             # <|call|> stopped the generation: not in the text
    assert [json.loads(c.arguments) for c in last.calls] == [T]


@pytest.mark.parametrize("cut", range(len(ANSWER) + 1))
def test_reasoning_split_streamed(cut):
    for fmt, reasoning, content in (("deepseek", "The user wants the weather and the time.", "It is 21 C in Paris."),
                                    ("hidden", "", "It is 21 C in Paris."),
                                    ("none", "", "The user wants the weather and the time.It is 21 C in Paris.")):
        out = ChatOutput(reasoning_format=fmt, harmony=True)
        parts = [out.push(p) for p in _pieces(ANSWER, cut)] + [out.flush()]
        assert "".join(p.reasoning for p in parts) == reasoning, fmt
        assert "".join(p.content for p in parts) == content, fmt


def test_markers_are_held_back_until_decided():
    s = HarmonySplit()
    assert s.push("<|channel|>final<|message|>Hi <|e") == [(s.message, "", False), (s.message, "Hi ", False)]
    assert s.push("nd|>")[0][1:] == ("", True)
    plain = HarmonySplit()        # a model that ignores the format: its text is the answer
    assert [(m.kind, t) for m, t, _ in plain.push("Hello")] == [("content", ""), ("content", "Hello")]


def test_calls_not_parsed_stay_in_the_content():
    """tool_choice none (or no tools): a call message is left as generated."""
    out = ChatOutput(harmony=True).whole(THINK + CALLS)
    assert out.calls == [] and out.reasoning.startswith("The user")
    assert out.content == CALLS.replace("<|call|>", "")     # headers and bodies; end markers go


def test_tool_stream_of_the_harmony_format():
    s = ToolStream(HARMONY)
    content, calls = "", []
    for i in range(0, len(PREAMBLE + CALLS), 3):
        c, new = s.push((PREAMBLE + CALLS)[i:i + 3])
        content, calls = content + c, calls + new
    c, new = s.flush()
    assert content + c == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls + new] == [("get_weather", W), ("get_time", T)]


# ---------------------------------------------------------------- the format's choice and its grammar

@pytest.mark.parametrize("template, family, fmt", [
    (builtin_template("gpt_oss"), None, HARMONY),
    ("{{ '<|start|>assistant<|channel|>final<|message|>' }}", None, HARMONY),
    ("{{ messages }}", "gpt_oss", HARMONY),          # the family, whatever the template renders
    (None, "gpt_oss", HARMONY),
    (None, "llama", HERMES),
])
def test_format_from_the_template_or_family(template, family, fmt):
    assert tool_format(template, family) is fmt


def test_call_grammar_writes_one_harmony_call_within_the_schema(tok):
    weather = ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
               '{"city": "Paris", "unit": "celsius"}')
    time = '<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{"tz": "UTC"}'
    required = call_grammar(HARMONY, TOOLS, "required", parallel=True, tokenizer=tok)
    assert _accepts(tok, required, weather) and _accepts(tok, required, time)
    assert not _accepts(tok, required, weather.replace("celsius", "kelvin"))
    assert not _accepts(tok, required, weather.replace("get_weather", "get_date"))
    assert not _accepts(tok, required, weather + "<|start|>assistant" + time)    # <|call|> ends the turn
    named = call_grammar(HARMONY, TOOLS, "get_time", tokenizer=tok)
    assert _accepts(tok, named, time) and not _accepts(tok, named, weather)
    assert parse_tool_calls(weather, HARMONY)[1][0].name == "get_weather"


# ---------------------------------------------------------------- the built-in template

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "It is sunny.", "reasoning_content": "An older turn's thought."},
    {"role": "user", "content": "And now, with the time?"},
    {"role": "assistant", "content": None, "reasoning_content": "I need both tools.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": W}},
        {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": json.dumps(T)}}]},
    {"role": "tool", "tool_call_id": "c2", "content": "14:05"},
    {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
]


def test_builtin_template_renders_tools_calls_and_results():
    text = render(builtin_template("gpt_oss"), CONVERSATION, tools=TOOLS, reasoning_effort="high")
    assert text.startswith("<|start|>system<|message|>") and "Reasoning: high" in text
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert ("<|start|>developer<|message|># Instructions\n\nAnswer briefly.\n\n# Tools\n\n## functions\n\n"
            "namespace functions {\n\n// Current weather.\ntype get_weather = (_: {\n// City name\ncity: string,\n"
            'unit: "celsius" | "fahrenheit",\n}) => any;\n\ntype get_time = (_: {\ntz: string,\n}) => any;\n\n'
            "} // namespace functions<|end|>") in text
    assert "<|start|>user<|message|>Weather in Paris?<|end|>" in text
    assert "<|start|>assistant<|channel|>final<|message|>It is sunny.<|end|>" in text
    assert "An older turn's thought." not in text        # earlier turns' analysis is dropped
    assert ("<|start|>assistant<|channel|>analysis<|message|>I need both tools.<|end|>"
            '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
            '{"city": "Paris", "unit": "celsius"}<|call|>'
            '<|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>'
            '{"tz": "Europe/Paris"}<|call|>') in text
    assert ("<|start|>functions.get_time to=assistant<|channel|>commentary<|message|>14:05<|end|>"
            "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>21 C<|end|>") in text
    assert text.endswith("<|start|>assistant")


def test_builtin_template_round_trip_parses_back():
    """The calls the template writes for an assistant turn parse back into the same calls."""
    text = render(builtin_template("gpt_oss"), CONVERSATION[:5], tools=TOOLS, add_generation_prompt=False)
    turn = text[text.index("<|start|>assistant<|channel|>analysis"):]
    out = ChatOutput(tools=HARMONY, harmony=True).whole(turn)
    assert out.reasoning == "I need both tools."
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [("get_weather", W), ("get_time", T)]


def test_builtin_template_without_tools_or_system():
    text = render(builtin_template("gpt_oss"), [{"role": "user", "content": "Hi"}])
    assert "<|start|>developer" not in text and "Calls to these tools" not in text
    assert text.endswith("<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant")
    assert builtin_template("llama") is None


# ---------------------------------------------------------------- stop tokens

def _vocab_tokenizer(pieces, eos):
    from hybrid.files.tokenizer import Tokenizer

    return Tokenizer(None, pieces, [p.encode() for p in pieces], set(range(len(pieces))), eos_id=eos,
                     chat_template="<|end|>")


def test_harmony_vocabulary_stops_at_return_and_call_not_end():
    pieces = ["a", "<|return|>", "<|end|>", "<|call|>", "<|endoftext|>", "<|start|>"]
    tok = _vocab_tokenizer(pieces, eos=1)
    assert tok.stop_ids == {1, 3, 4}
    other = _vocab_tokenizer(["a", "<|end|>", "<|endoftext|>"], eos=2)    # <|end|> ends others' turns
    assert other.stop_ids == {1, 2}


# ---------------------------------------------------------------- through the routes (a scripted engine)

@pytest.fixture(scope="module")
def harmony_model(smollm_path):
    """The built-in model's tokenizer with the built-in harmony template (the routes see a
    harmony model; the scripted engine writes its output)."""
    import copy

    import hybrid

    model = hybrid.load(smollm_path, rules="torch-cpu")
    model.tokenizer = copy.copy(model.tokenizer)
    model.tokenizer.chat_template = builtin_template("gpt_oss")
    return model


def _client(model, text, size=4):
    """A test client whose engine writes `text` in pieces of `size` characters."""
    from hybrid.engine.generate import Event
    from hybrid.server import create_app
    from tests.test_server import _Engine

    class Engine(_Engine):
        def submit(self, ids, params, grammar=None):
            stream = super().submit(ids, params, grammar)
            stream.cached_tokens = 0          # read by the Anthropic stream's message_start
            return stream

    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    events = [Event(text=p, token=1) for p in pieces]
    events.append(Event(finish_reason="stop", usage={"prompt_tokens": 5, "completion_tokens": len(pieces),
                                                     "total_tokens": 5 + len(pieces)}))
    return create_app(Engine(model, events)).test_client()


ASK = [{"role": "user", "content": "Weather and time in Paris?"}]


def test_openai_route_calls_and_reasoning(harmony_model):
    body = {"messages": ASK, "tools": TOOLS}
    choice = _client(harmony_model, THINK + CALLS).post("/v1/chat/completions", json=body).json["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["reasoning_content"] == "The user wants the weather and the time."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in choice["message"]["tool_calls"]] == [("get_weather", W), ("get_time", T)]
    plain = _client(harmony_model, ANSWER).post("/v1/chat/completions", json={"messages": ASK}).json["choices"][0]
    assert plain["message"]["content"] == "It is 21 C in Paris." and plain["finish_reason"] == "stop"
    assert plain["message"]["reasoning_content"] == "The user wants the weather and the time."


def test_openai_route_streamed(harmony_model):
    r = _client(harmony_model, THINK + CALLS, size=3).post(
        "/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "stream": True})
    chunks = [json.loads(ln[len("data: "):]) for ln in r.get_data(as_text=True).split("\n\n")
              if ln.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user wants the weather and the time."
    assert all(not d.get("content") for d in deltas)
    tcs = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [(tc["index"], tc["function"]["name"]) for tc in tcs if "id" in tc] == [(0, "get_weather"), (1, "get_time")]
    assert json.loads("".join(tc["function"]["arguments"] for tc in tcs if tc["index"] == 1)) == T
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_template_reaches_the_prompt(harmony_model):
    from hybrid.engine.generate import chat_prompt_ids
    from hybrid.server.requests import parse_chat

    req = parse_chat({"messages": ASK + [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"}], "tools": TOOLS})
    tok = harmony_model.tokenizer
    text = tok.decode(chat_prompt_ids(tok, req.messages, req.tools))
    assert "type get_weather = (_: {" in text
    assert ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
            '{"city": "Paris", "unit": "celsius"}<|call|>') in text
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>21 C<|end|>" in text


def test_ollama_and_anthropic_routes(harmony_model):
    show = _client(harmony_model, "").post("/api/show", json={"model": "default"}).json
    assert {"tools", "thinking"} <= set(show["capabilities"])
    body = _client(harmony_model, ANSWER).post("/api/chat", json={"model": "m", "messages": ASK, "stream": False}).json
    assert body["message"]["content"] == "It is 21 C in Paris."
    assert body["message"]["thinking"] == "The user wants the weather and the time."
    calls = _client(harmony_model, THINK + CALLS).post(
        "/api/chat", json={"model": "m", "messages": ASK, "tools": TOOLS, "stream": False}).json
    assert [c["function"] for c in calls["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": W}, {"name": "get_time", "arguments": T}]
    anthropic_tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    msg = _client(harmony_model, THINK + CALLS).post("/v1/messages", json={
        "model": "m", "max_tokens": 50, "messages": ASK, "tools": anthropic_tools}).json
    assert [(b["type"], b.get("name"), b.get("input")) for b in msg["content"]] == [
        ("tool_use", "get_weather", W), ("tool_use", "get_time", T)]
    assert msg["stop_reason"] == "tool_use"
    text = _client(harmony_model, ANSWER).post("/v1/messages", json={"model": "m", "max_tokens": 50, "messages": ASK}).json
    assert text["content"] == [{"type": "text", "text": "It is 21 C in Paris."}]
    streamed = _client(harmony_model, ANSWER, size=3).post(
        "/v1/messages", json={"model": "m", "max_tokens": 50, "messages": ASK, "stream": True}).get_data(as_text=True)
    deltas = [json.loads(ln[len("data: "):]) for ln in streamed.splitlines() if ln.startswith("data: ")]
    assert "".join(d["delta"]["text"] for d in deltas if d.get("type") == "content_block_delta") == \
        "It is 21 C in Paris."


@pytest.mark.parametrize("forced", ["get_weather", "required"])
def test_forced_call_from_the_built_in_model(harmony_model, forced):
    """Constrained decoding makes even the 135M model write a harmony call whose arguments
    satisfy the tool's schema, which the parser reads back."""
    jsonschema = pytest.importorskip("jsonschema")
    tok = harmony_model.tokenizer
    out = harmony_model.chat(ASK, tools=TOOLS, grammar=call_grammar(HARMONY, TOOLS, forced, tokenizer=tok),
                             max_tokens=60, temperature=0)
    assert out.text.startswith("<|channel|>commentary to=functions.")
    content, calls = parse_tool_calls(out.text, HARMONY)
    assert content == "" and len(calls) == 1
    if forced != "required":
        assert calls[0].name == forced
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == calls[0].name)
    jsonschema.validate(json.loads(calls[0].arguments), schema)


def test_a_gpt_oss_checkpoint_without_a_template_gets_the_built_in_one(tmp_path):
    import hybrid
    from tests.tiny import add_byte_tokenizer, make_tiny

    make_tiny("gpt_oss", tmp_path)
    add_byte_tokenizer(tmp_path)
    model = hybrid.load(tmp_path, rules="torch-cpu")
    assert model.tokenizer.chat_template == builtin_template("gpt_oss")
    assert "<|start|>user<|message|>Hi<|end|>" in model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_reasoning_effort_reaches_the_template(harmony_model):
    from hybrid.engine.generate import Event
    from hybrid.server import create_app
    from tests.test_server import _Engine

    prompts = []

    class Recording(_Engine):
        def submit(self, ids, params, grammar=None):
            prompts.append(ids)
            return super().submit(ids, params, grammar)

    done = Event(finish_reason="stop", usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
    c = create_app(Recording(harmony_model, [Event(text="Hi", token=1), done])).test_client()
    assert c.post("/v1/chat/completions", json={"messages": ASK, "reasoning_effort": "high"}).status_code == 200
    assert "\nReasoning: high\n" in harmony_model.tokenizer.decode(prompts[-1])
    c.post("/v1/chat/completions", json={"messages": ASK})
    assert "\nReasoning: medium\n" in harmony_model.tokenizer.decode(prompts[-1])
    bad = c.post("/v1/chat/completions", json={"messages": ASK, "reasoning_effort": "extreme"})
    assert bad.status_code == 400 and bad.json["error"]["param"] == "reasoning_effort"
