"""The Anthropic Messages API (POST /v1/messages) with the official `anthropic` SDK: against a
live `hybrid serve` on the built-in model (plain, streamed, system prompt, stop sequences,
max_tokens, x-api-key and Bearer auth, the error envelope, cache_read_input_tokens), and
in process with a scripted engine for the tool-use round trip (canned model output)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

from hybrid.engine.generate import Event  # noqa: E402
from hybrid.server.anthropic_api import _as_tool_use  # noqa: E402
from hybrid.server.tools import HERMES, ToolStream, parse_tool_calls  # noqa: E402

KEY = "sk-hybrid-anthropic"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Sampling fields go in extra_body: recent SDKs dropped temperature/top_p/top_k from create()
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def server(smollm_path):
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HYBRID_API_KEY": KEY}
    cmd = [sys.executable, "-m", "hybrid", "serve", "--model", smollm_path, "--port", "0", "--ctx", "1024",
           "--slots", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        url = re.search(r"listening on (http://\S+),", proc.stdout.readline()).group(1)
        deadline = time.time() + 600  # a cold numba cache compiles every kernel first
        while time.time() < deadline and requests.get(url + "/health", timeout=5).status_code != 200:
            time.sleep(0.2)
        assert "ready at" in proc.stdout.readline()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0)


def test_plain_message(client):
    m = client.messages.create(model="claude-sonnet-4-5", max_tokens=24, **GREEDY, messages=QUESTION)
    assert isinstance(m, anthropic.types.Message)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert [b.type for b in m.content] == ["text"] and "Paris" in m.content[0].text
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens > 5 and 0 < m.usage.output_tokens <= 24


def test_streamed_text_is_the_plain_answer(client):
    plain = client.messages.create(model="m", max_tokens=24, **GREEDY, messages=QUESTION)
    with client.messages.stream(model="m", max_tokens=24, **GREEDY, messages=QUESTION) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == plain.content[0].text == final.content[0].text
    assert final.stop_reason == plain.stop_reason and final.usage.output_tokens == plain.usage.output_tokens
    events = list(client.messages.create(model="m", max_tokens=24, **GREEDY, messages=QUESTION, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"] or kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"] and "content_block_stop" in kinds
    assert {"content_block_delta"} <= set(kinds)
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert all(d.type == "text_delta" for d in deltas) and "".join(d.text for d in deltas) == text
    assert events[-2].delta.stop_reason == "end_turn" and events[-2].usage.output_tokens == plain.usage.output_tokens


def test_raw_stream_has_anthropic_event_names_and_ping(server):
    r = requests.post(server + "/v1/messages", headers={"x-api-key": KEY}, stream=True, timeout=60,
                      json={"model": "m", "max_tokens": 4, "messages": QUESTION, "stream": True})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    names = [line.split(": ", 1)[1] for line in r.iter_lines(decode_unicode=True) if line.startswith("event: ")]
    assert names[0] == "message_start" and "ping" in names and names[-1] == "message_stop"


def test_system_prompt_reaches_the_template(client, server):
    system = "You are a pirate. Answer like a pirate."
    m = client.messages.create(model="m", max_tokens=16, **GREEDY, system=system, messages=QUESTION)
    blocks = client.messages.create(model="m", max_tokens=16, **GREEDY, messages=QUESTION,
                                    system=[{"type": "text", "text": system}])
    oa = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model="m", max_tokens=16, **GREEDY, messages=[{"role": "system", "content": system}, *QUESTION])
    assert m.content[0].text == blocks.content[0].text == oa.choices[0].message.content
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == oa.usage.prompt_tokens
    plain = client.messages.create(model="m", max_tokens=16, **GREEDY, messages=QUESTION)
    # without one, SmolLM2's template puts in its own default system prompt
    assert plain.usage.input_tokens + plain.usage.cache_read_input_tokens != oa.usage.prompt_tokens


def test_stop_sequences(client):
    full = client.messages.create(model="m", max_tokens=24, **GREEDY, messages=QUESTION).content[0].text
    word = full.split()[2]
    m = client.messages.create(model="m", max_tokens=24, **GREEDY, messages=QUESTION, stop_sequences=[word, "@@"])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == word
    assert m.content[0].text == full[: full.index(word)]
    with client.messages.stream(model="m", max_tokens=24, **GREEDY, messages=QUESTION,
                                stop_sequences=[word]) as s:
        assert "".join(s.text_stream) == m.content[0].text
        final = s.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == word


def test_max_tokens_stop_reason(client):
    m = client.messages.create(model="m", max_tokens=3, **GREEDY, messages=QUESTION)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3


def test_prefix_cache_shows_as_cache_read_input_tokens(client):
    system = "You answer questions about a bakery that sells bread, pies, cakes and coffee. " * 8
    first = client.messages.create(model="m", max_tokens=2, system=system, messages=QUESTION)
    second = client.messages.create(model="m", max_tokens=2, system=system, messages=QUESTION)
    total = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == total
    assert second.usage.cache_read_input_tokens >= 64 and second.usage.input_tokens < 64


def test_auth_x_api_key_and_bearer(server):
    ok = anthropic.Anthropic(base_url=server, auth_token=KEY, api_key=None, max_retries=0)   # Bearer
    assert ok.messages.create(model="m", max_tokens=2, messages=QUESTION).content
    bad = anthropic.Anthropic(base_url=server, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="m", max_tokens=2, messages=QUESTION)
    assert e.value.status_code == 401 and e.value.body["error"]["type"] == "authentication_error"
    r = requests.post(server + "/v1/messages", json={"model": "m", "max_tokens": 2, "messages": QUESTION}, timeout=30)
    assert r.status_code == 401 and "x-api-key" in r.json()["error"]["message"]


def test_error_envelope(client, server):
    r = requests.post(server + "/v1/messages", headers={"x-api-key": KEY}, timeout=30,
                      json={"model": "m", "messages": QUESTION})
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": "'max_tokens': is required"}}
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=4, messages=QUESTION, extra_body={"temperature": 1.5})
    assert e.value.body["type"] == "error" and "'temperature'" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match="answers no earlier tool_use block"):
        client.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_x", "content": "42"}]}])
    with pytest.raises(anthropic.BadRequestError, match="no tool named 'nope'"):
        client.messages.create(model="m", max_tokens=4, messages=QUESTION, tool_choice={"type": "tool", "name": "nope"},
                               tools=[{"name": "weather", "input_schema": {"type": "object"}}])
    with pytest.raises(anthropic.BadRequestError, match="context"):
        client.messages.create(model="m", max_tokens=5000, messages=QUESTION)
    r = requests.post(server + "/v1/messages", headers={"x-api-key": KEY, "Content-Type": "application/json"},
                      data="{not json", timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "error"


# ---------------------------------------------------------------- tool use, canned model output

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


class _Stream:
    cached_tokens = 0

    def __init__(self, texts):
        n = len(texts)
        self.events = [Event(text=t, token=1) for t in texts[:-1]]
        self.events.append(Event(text=texts[-1], token=1, finish_reason="stop",
                                 usage={"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n,
                                        "cached_tokens": 0}))

    def next(self, timeout=None):
        return self.events.pop(0)

    def cancel(self):
        pass


class _ScriptedEngine:
    """Answers each submit with the next canned output (split in pieces, as tokens come), and
    keeps the prompts it was given."""

    def __init__(self, model, outputs):
        self.model, self.outputs, self.prompts = model, list(outputs), []

    def submit(self, ids, params, grammar=None):
        self.prompts.append(self.model.tokenizer.decode(ids))
        text = self.outputs.pop(0)
        return _Stream([text[i : i + 5] for i in range(0, len(text), 5)])

    def cancel(self, stream):
        pass

    def stats(self):
        return {"waiting": 0, "running": 0, "free_slots": 1, "slots": 1, "ctx": 512}

    def describe(self):
        from hybrid.files.model_info import describe

        return {"name": "scripted", "tokenizer": self.model.tokenizer, "ctx": 512, "source": self.model.source,
                "info": describe(self.model, 512)}


@pytest.fixture(scope="module")
def tokenizer_model(smollm_path):
    import hybrid

    return hybrid.load(smollm_path, rules="torch-cpu")


@pytest.fixture
def scripted(tokenizer_model):
    """scripted(outputs) -> (anthropic client, engine): a server on 127.0.0.1 in this process
    whose engine answers with the canned outputs."""
    import threading

    from werkzeug.serving import make_server

    from hybrid.server import create_app

    servers = []

    def start(outputs):
        engine = _ScriptedEngine(tokenizer_model, outputs)
        server = make_server("127.0.0.1", 0, create_app(engine, api_key=KEY), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        url = f"http://127.0.0.1:{server.server_port}"
        return anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0), engine

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_tool_use_round_trip(scripted):
    client, engine = scripted([CALL, "It is sunny in Paris."])
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = client.messages.create(model="m", max_tokens=64, messages=ask, tools=[WEATHER])
    assert m.stop_reason == "tool_use"
    assert [b.type for b in m.content] == ["text", "tool_use"] and m.content[0].text == "Let me check."
    use = m.content[1]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id.startswith("toolu_")
    assert "get_weather" in engine.prompts[0]             # the tools reached the template
    history = [*ask, {"role": "assistant", "content": m.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]}]
    answer = client.messages.create(model="m", max_tokens=64, messages=history, tools=[WEATHER])
    assert answer.stop_reason == "end_turn" and answer.content[0].text == "It is sunny in Paris."
    second = engine.prompts[1]
    # SmolLM2's template has no tool calls: the call is replayed as Hermes text, the result as a tool turn
    assert '"arguments": {"city": "Paris"}' in second and "<|im_start|>tool\nsunny, 21 C" in second


def test_tool_use_streamed(scripted):
    client, _ = scripted([CALL, CALL])
    with client.messages.stream(model="m", max_tokens=64, tools=[WEATHER],
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Let me check." and final.stop_reason == "tool_use"
    assert final.content[1].type == "tool_use" and final.content[1].input == {"city": "Paris"}
    events = list(client.messages.create(model="m", max_tokens=64, tools=[WEATHER], stream=True,
                                         messages=[{"role": "user", "content": "Weather in Paris?"}]))
    json_deltas = [e.delta.partial_json for e in events if e.type == "content_block_delta"
                   and e.delta.type == "input_json_delta"]
    assert json.loads("".join(json_deltas)) == {"city": "Paris"}
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["text", "tool_use"]


def test_tool_choice_none_leaves_calls_as_text(scripted):
    client, engine = scripted([CALL])
    m = client.messages.create(model="m", max_tokens=64, tools=[WEATHER], tool_choice={"type": "none"},
                               messages=[{"role": "user", "content": "Weather?"}])
    assert m.stop_reason == "end_turn" and m.content[0].text == CALL and "get_weather" not in engine.prompts[0]


def test_calls_become_tool_use_inputs_whole_and_streamed():
    """The route reads calls with the OpenAI route's parser (tools.py) and turns their
    JSON-string arguments into tool_use inputs."""
    text, calls = parse_tool_calls('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
                                   '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>', HERMES)
    assert text == "" and _as_tool_use(calls) == [{"name": "a", "input": {"x": 1}}, {"name": "b", "input": {"y": 2}}]
    assert parse_tool_calls("<tool_call>not json</tool_call>", HERMES)[1] == []
    s, out, done = ToolStream(HERMES), [], []
    for piece in ["Hi <", "tool", "_call>{", '"name": "a", "arguments": {}}</tool_call>']:
        text, calls = s.push(piece)
        out.append(text)
        done += calls
    tail, rest = s.flush()
    assert "".join(out) + tail == "Hi " and _as_tool_use(done + rest) == [{"name": "a", "input": {}}]


def test_tool_choice_any_and_tool_force_a_valid_call(client):
    """The built-in 135M model, told to use a tool: the call grammar makes its answer a
    tool_use block whose input satisfies the tool's schema."""
    jsonschema = pytest.importorskip("jsonschema")
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        m = client.messages.create(model="m", max_tokens=64, **GREEDY, tools=[WEATHER], tool_choice=choice,
                                   messages=[{"role": "user", "content": "What is the weather in Paris?"}])
        uses = [b for b in m.content if b.type == "tool_use"]
        assert m.stop_reason == "tool_use" and uses and uses[0].name == "get_weather", m
        jsonschema.validate(uses[0].input, WEATHER["input_schema"])
