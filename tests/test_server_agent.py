"""What agents ask of the server, on the built-in model through a live `hybrid serve`:
structured output (response_format json_schema, Ollama's format), tool calls (forced,
required, streamed, the round trip) and reasoning kept out of content. The official SDKs
(openai, ollama) drive it where they can."""

from __future__ import annotations

import json

import pytest

from tests.test_server import AUTH, KEY, chat, post, sse_events, srv  # noqa: F401  (srv: the live server)

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

SCHEMAS = {
    "enum+nullable": {"type": "object", "properties": {
        "mood": {"enum": ["happy", "sad", "calm"]},
        "reason": {"type": ["string", "null"], "maxLength": 40}},
        "required": ["mood", "reason"], "additionalProperties": False},
    "array bounds": {"type": "object", "properties": {
        "fruits": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 2, "maxItems": 4}},
        "required": ["fruits"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                  "floor": {"type": ["integer", "null"]}},
                 "required": ["city", "floor"], "additionalProperties": False}},
        "required": ["name", "age", "home"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def client(srv):  # noqa: F811
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)


# ---------------------------------------------------------------- structured output

@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_is_enforced_over_sampled_outputs(client, name):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name.replace(" ", "_").replace("+", "_"),
                                                  "schema": schema, "strict": True}}
    for seed in (1, 2, 3):
        r = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": f"Answer in JSON: {name}."}],
            response_format=fmt, temperature=0.9, seed=seed, max_tokens=120)
        choice = r.choices[0]
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert choice.finish_reason in ("stop", "length")


def test_json_schema_streamed_and_cut_by_max_tokens(srv):  # noqa: F811
    schema = SCHEMAS["nested"]
    body = {"messages": [{"role": "user", "content": "A person as JSON."}], "max_tokens": 100, "stream": True,
            "temperature": 0.7, "seed": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}
    events = sse_events(post(srv, "/v1/chat/completions", body, stream=True))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    jsonschema.validate(json.loads(text), schema)
    cut = chat(srv, "A person as JSON.", max_tokens=34,
               response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    choice = cut["choices"][0]
    assert choice["finish_reason"] == "length" and cut["usage"]["completion_tokens"] <= 34
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)


@pytest.mark.parametrize("fmt, param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 1}},
        "required": ["a"]}}}, "response_format.json_schema.schema.properties.a"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
])
def test_a_schema_that_cannot_compile_is_400_naming_the_part(srv, fmt, param):  # noqa: F811
    r = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": fmt})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and param in err["message"]


def test_ollama_format_json_and_schema(srv):  # noqa: F811
    ollama = pytest.importorskip("ollama")
    c = ollama.Client(host=srv.url, headers=AUTH)
    schema = SCHEMAS["array bounds"]
    for seed in (1, 2):
        r = c.chat(model="default", messages=[{"role": "user", "content": "Name some fruits."}], format=schema,
                   options={"temperature": 0.8, "seed": seed, "num_predict": 80})
        jsonschema.validate(json.loads(r.message.content), schema)
    r = c.generate(model="default", prompt="A cat as JSON.", format="json", options={"num_predict": 40})
    assert isinstance(json.loads(r.response), (dict, list))
    bad = post(srv, "/api/chat", {"messages": [{"role": "user", "content": "hi"}], "format": {"type": "bogus"}})
    assert bad.status_code == 400 and "format" in bad.json()["error"]


# ---------------------------------------------------------------- tool calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}},
                   "required": ["tz"], "additionalProperties": False}}}
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What's the weather in Paris this week?"}]


def _valid_call(name, arguments):
    assert name in SCHEMA_OF
    jsonschema.validate(json.loads(arguments), SCHEMA_OF[name])


def test_forced_function_call(client):
    for seed in (1, 2):
        r = client.chat.completions.create(
            model="default", messages=ASK, tools=[WEATHER, TIME], temperature=0.8, seed=seed, max_tokens=80,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls
        assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
        assert calls[0].function.name == "get_weather"
        _valid_call(calls[0].function.name, calls[0].function.arguments)


def test_required_call_streamed(client):
    stream = client.chat.completions.create(
        model="default", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0.7, seed=3,
        max_tokens=120, stream=True, parallel_tool_calls=False)
    calls, finish, content = {}, None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = tc.id or c["id"]
            c["name"] += (tc.function.name or "") if tc.function else ""
            c["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "" and list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    _valid_call(calls[0]["name"], calls[0]["arguments"])


def test_required_call_not_streamed_may_be_parallel(srv):  # noqa: F811
    body = {"messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required", "temperature": 0.9, "seed": 4,
            "max_tokens": 160}
    r = post(srv, "/v1/chat/completions", body).json()
    msg = r["choices"][0]["message"]
    assert r["choices"][0]["finish_reason"] == "tool_calls" and msg["content"] is None and msg["tool_calls"]
    for call in msg["tool_calls"]:
        _valid_call(call["function"]["name"], call["function"]["arguments"])


def test_round_trip_with_tool_results(client):
    first = client.chat.completions.create(
        model="default", messages=ASK, tools=[WEATHER], max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    second = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER], max_tokens=20,
                                            temperature=0, tool_choice="none")
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    assert second.usage.prompt_tokens > first.usage.prompt_tokens     # the call and its result are in the prompt


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]}, "messages[1].tool_calls[0].function.arguments"),
])
def test_bad_tool_requests_are_400(srv, body, param):  # noqa: F811
    r = post(srv, "/v1/chat/completions", {"messages": ASK, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_ollama_tools(srv):  # noqa: F811
    r = post(srv, "/api/chat", {"messages": ASK, "tools": [WEATHER], "stream": False,
                                "options": {"num_predict": 60, "temperature": 0}})
    assert r.status_code == 200 and r.json()["done"] is True
    assert isinstance(r.json()["message"].get("tool_calls", []), list)


# ---------------------------------------------------------------- templates and reasoning (a scripted engine)

TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}"
    "</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n"
    "{% else %}<think>\n{% endif %}")


@pytest.fixture(scope="module")
def thinking_model(smollm_path):
    """The built-in model's tokenizer with a tiny template that renders tools and calls and
    opens a think block (as DeepSeek-R1's and Qwen3's do)."""
    import copy

    import hybrid

    model = hybrid.load(smollm_path, rules="torch-cpu")
    model.tokenizer = copy.copy(model.tokenizer)
    model.tokenizer.chat_template = TOOL_TEMPLATE
    return model


def _scripted(model, pieces):
    from hybrid.engine.generate import Event
    from tests.test_server import _client

    events = [Event(text=p, token=1) for p in pieces]
    events.append(Event(finish_reason="stop", usage={"prompt_tokens": 5, "completion_tokens": len(pieces),
                                                     "total_tokens": 5 + len(pieces)}))
    return _client(model, events)


ANSWER = ["The user", " wants weather.", "</th", "ink>\n\n", "<tool", "_call>\n", '{"name": "get_weather", ',
          '"arguments": {"city": "Paris"}}', "\n</tool_call>"]


def test_template_gets_tools_and_the_round_trip(thinking_model):
    from hybrid.engine.generate import chat_prompt_ids
    from hybrid.server.requests import parse_chat

    req = parse_chat({"messages": ASK + [
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"}], "tools": [WEATHER, TIME]})
    text = thinking_model.tokenizer.decode(chat_prompt_ids(thinking_model.tokenizer, req.messages, req.tools))
    assert "Tools: get_weather get_time" in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<|im_start|>tool\n21 C<|im_end|>" in text


def test_reasoning_split_non_streamed_and_dropped(thinking_model):
    body = {"messages": ASK, "tools": [WEATHER]}
    msg = _scripted(thinking_model, ANSWER).post("/v1/chat/completions", json=body).json["choices"][0]
    assert msg["finish_reason"] == "tool_calls"
    assert msg["message"]["reasoning_content"] == "The user wants weather."
    assert msg["message"]["content"] is None
    assert msg["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    hidden = _scripted(thinking_model, ANSWER).post("/v1/chat/completions", json={**body, "reasoning_format": "hidden"})
    assert "reasoning_content" not in hidden.json["choices"][0]["message"]
    raw = _scripted(thinking_model, ANSWER).post("/v1/chat/completions",
                                                 json={**body, "reasoning_format": "none", "tool_choice": "none"})
    assert raw.json["choices"][0]["message"]["content"] == "".join(ANSWER)


def test_reasoning_and_calls_streamed(thinking_model):
    r = _scripted(thinking_model, ANSWER).post("/v1/chat/completions",
                                               json={"messages": ASK, "tools": [WEATHER], "stream": True})
    chunks = [json.loads(ln[len("data: "):]) for ln in r.get_data(as_text=True).split("\n\n")
              if ln.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user wants weather."
    assert all(not d.get("content") for d in deltas)
    heads = [tc for d in deltas for tc in d.get("tool_calls", []) if "id" in tc]
    assert [h["function"]["name"] for h in heads] == ["get_weather"] and heads[0]["index"] == 0
    args = "".join(tc["function"]["arguments"] for d in deltas for tc in d.get("tool_calls", []))
    assert json.loads(args) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_ollama_think_and_tool_calls(thinking_model):
    c = _scripted(thinking_model, ANSWER)
    body = c.post("/api/chat", json={"model": "m", "messages": ASK, "tools": [WEATHER], "stream": False}).json
    assert body["message"]["thinking"] == "The user wants weather."
    assert body["message"]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    off = _scripted(thinking_model, ANSWER).post("/api/chat", json={"model": "m", "messages": ASK, "think": False,
                                                                     "stream": False}).json
    assert "thinking" not in off["message"]
    lines = [json.loads(ln) for ln in _scripted(thinking_model, ANSWER).post(
        "/api/chat", json={"model": "m", "messages": ASK, "tools": [WEATHER]}).get_data(as_text=True).splitlines()]
    assert "".join(ln["message"].get("thinking", "") for ln in lines) == "The user wants weather."
    assert [tc for ln in lines for tc in ln["message"].get("tool_calls", [])][0]["function"]["name"] == "get_weather"
    assert lines[-1]["done"] is True


def test_ollama_think_false_reaches_the_template(thinking_model):
    """think: false renders the template with enable_thinking false (an empty, closed think
    block here), so the answer is not parsed as reasoning."""
    from hybrid.engine.generate import Event
    from hybrid.server import create_app
    from tests.test_server import _Engine

    prompts = []

    class Recording(_Engine):
        def submit(self, ids, params, grammar=None):
            prompts.append(ids)
            return super().submit(ids, params, grammar)

    done = Event(finish_reason="stop", usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
    c = create_app(Recording(thinking_model, [Event(text="Hi there", token=1), done])).test_client()
    off = c.post("/api/chat", json={"model": "m", "messages": ASK, "think": False, "stream": False}).json
    tok = thinking_model.tokenizer
    assert tok.decode(prompts[-1]).endswith("<think>\n\n</think>\n")
    assert off["message"]["content"] == "Hi there" and "thinking" not in off["message"]
