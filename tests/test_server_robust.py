"""What real clients and operators do to a server: hostile bodies on every route (lone
surrogates, deep nesting), bad command-line values, and SIGTERM / Ctrl-C in the middle of
a stream. Body checks use the Flask test client over a scripted engine; shutdown runs
`hybrid serve` on the default model in a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from .test_server import USER, _client

requests = pytest.importorskip("requests")

LONE = '"a\\ud800b"'      # valid JSON, not valid Unicode

# route -> (body with the lone surrogate spliced in at @, the field it is in)
SURROGATE = {
    "chat content": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": @}]}', "messages[0].content"),
    "chat stream model": ("/v1/chat/completions", '{"model": @, "stream": true, "messages": [{"role": "user", '
                                                  '"content": "hi"}]}', "model"),
    "chat stop": ("/v1/chat/completions", '{"stop": [@], "messages": [{"role": "user", "content": "hi"}]}', "stop[0]"),
    "completion prompt": ("/v1/completions", '{"prompt": @}', "prompt"),
    "completion prompt list": ("/v1/completions", '{"prompt": ["x", @], "stream": true}', "prompt[1]"),
    "ollama generate model, streamed": ("/api/generate", '{"model": @, "prompt": "hi"}', "model"),
    "ollama generate prompt": ("/api/generate", '{"model": "m", "prompt": @, "stream": false}', "prompt"),
    "ollama chat content": ("/api/chat", '{"model": "m", "messages": [{"role": "user", "content": @}]}',
                            "messages[0].content"),
    "ollama show": ("/api/show", '{"model": @}', "model"),
    "a key": ("/v1/chat/completions", '{' + LONE + ': 1, "messages": [{"role": "user", "content": "hi"}]}', "<key>"),
}


@pytest.fixture(scope="module")
def client(request):
    from hybrid.engine.generate import Event

    model = request.getfixturevalue("model")
    done = [Event(text="ok", token=1, finish_reason="stop", usage={"completion_tokens": 1})]
    return _client(model, done)


@pytest.fixture(scope="module")
def model(smollm_path):
    import hybrid

    return hybrid.load(smollm_path)


def _post(client, path, text):
    return client.post(path, data=text, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("path,body,field", SURROGATE.values(), ids=SURROGATE.keys())
def test_lone_surrogates_are_400_naming_the_field(client, path, body, field):
    r = _post(client, path, body.replace("@", LONE))
    assert r.status_code == 400, r.get_data(as_text=True)
    err = r.json["error"]
    if path.startswith("/api/"):
        assert isinstance(err, str) and field in err and "surrogate" in err
    else:
        assert err["param"] == field and "surrogate" in err["message"] and err["code"] == "invalid_unicode"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/api/generate", "/api/chat",
                                  "/api/show"])
def test_deep_nesting_is_400(client, path):
    for body in ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}",   # the parser's recursion
                 '{"prompt": ' + "[" * 100 + "]" * 100 + "}"):               # parses, but too deep
        r = _post(client, path, body)
        assert r.status_code == 400, r.get_data(as_text=True)[:300]
        err = r.json["error"]
        assert "nested too deeply" in (err if isinstance(err, str) else err["message"])


def test_unexpected_errors_carry_a_request_id(model):
    c = _client(model, RuntimeError("bug"))
    r = c.post("/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 500 and r.json["error"]["code"] == "internal_error"
    rid = r.headers["X-Request-Id"]
    assert rid and rid in r.json["error"]["message"]


@pytest.mark.parametrize("argv,expect", [
    (["--port", "99999"], "port must be between 0 and 65535"),
    (["--port", "http"], "not an integer"),
    (["--slots", "0"], "--slots must be between 1"),
    (["--max-queue", "-1"], "--max-queue must be between 1"),
    (["--max-body-mb", "0"], "positive"),
    (["--shutdown-timeout", "-5"], ">= 0 seconds"),
])
def test_bad_serve_options_exit_2(argv, expect):
    p = subprocess.run([sys.executable, "-m", "hybrid", "serve", *argv], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and expect in p.stderr and "Traceback" not in p.stderr, p.stderr


# ---------------------------------------------------------------- shutdown

def _serve(smollm_path, *extra):
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    cmd = [sys.executable, "-m", "hybrid", "serve", "--model", smollm_path, "--port", "0", "--ctx", "256",
           "--slots", "2", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = re.search(r"listening on (http://\S+),", proc.stdout.readline()).group(1)
    assert "ready at" in proc.stdout.readline()
    return proc, url


def test_sigterm_mid_stream_ends_it_well_and_exits_0(smollm_path):
    proc, url = _serve(smollm_path, "--shutdown-timeout", "1")
    try:
        body = {"messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 200,
                "temperature": 0, "stream": True, "ignore_eos": True}
        r = requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=60)
        lines = r.iter_lines(decode_unicode=True)
        got = [next(lines) for _ in range(6)]
        proc.send_signal(signal.SIGTERM)
        got += list(lines)
        events = [ln for ln in got if ln]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] == "length"
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/health", timeout=5)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "shutting down: 1 request(s) in flight" in out and "1 ended at the timeout" in out, out
    assert "Traceback" not in err, err


def test_ctrl_c_on_an_idle_server_exits_0_quietly(smollm_path):
    proc, url = _serve(smollm_path)
    try:
        assert requests.get(url + "/health", timeout=5).status_code == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "stopped" in out
    assert "Traceback" not in err and "OSError" not in err, err
