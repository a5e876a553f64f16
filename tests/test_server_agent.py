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
