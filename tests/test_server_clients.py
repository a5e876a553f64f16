"""Real clients against `hybrid serve` (a subprocess on the default model): the official openai
and ollama Python packages, and the client examples of the seed documents (shared/seeds/) run
with only the base URL and the key changed: Python (openai, requests), curl and Node fetch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
requests = pytest.importorskip("requests")

KEY = "sk-hybrid-test"


@pytest.fixture(scope="module")
def server(smollm_path):
    # passive OpenMP waits: spinning thread pools starve the engine and HTTP threads on few cores
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HYBRID_API_KEY": KEY}
    cmd = [sys.executable, "-m", "hybrid", "serve", "--model", smollm_path, "--port", "0", "--ctx", "512",
           "--slots", "4", "--default-max-tokens", "12"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on (http://\S+),", line)
        assert m, f"unexpected first line: {line!r}"
        url = m.group(1)
        seen = []
        deadline = time.time() + 600  # a cold numba cache compiles every kernel first
        while time.time() < deadline:
            r = requests.get(url + "/health", timeout=5)
            seen.append(r.status_code)
            if r.status_code == 200:
                break
            time.sleep(0.2)
        assert seen[-1] == 200, seen
        assert "ready at" in proc.stdout.readline()
        # the first request compiles the kernels
        requests.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        yield url, seen
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def test_health_is_503_while_loading_then_200(server):
    url, seen = server
    assert seen[0] == 503 and seen[-1] == 200


# ---------------------------------------------------------------- the openai package

def test_openai_chat(client):
    c = client.chat.completions.create(model="gpt-3.5-turbo", max_tokens=8, temperature=0,
                                       messages=[{"role": "developer", "content": "Be brief."},
                                                 {"role": "user", "content": [{"type": "text", "text": "Hi!"}]}])
    assert isinstance(c, openai.types.chat.ChatCompletion)
    assert c.id.startswith("chatcmpl-") and c.object == "chat.completion" and c.system_fingerprint
    assert c.choices[0].message.role == "assistant" and c.choices[0].message.content
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens


def test_openai_stream_with_usage(client):
    chunks = list(client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8
    whole = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Name a fruit."}],
                                           max_tokens=8, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_openai_n_and_logprobs(client):
    c = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Say a word."}],
                                       n=2, seed=1, max_tokens=4, logprobs=True, top_logprobs=2)
    assert [ch.index for ch in c.choices] == [0, 1]
    for ch in c.choices:
        assert ch.logprobs.content and all(len(t.top_logprobs) == 2 for t in ch.logprobs.content)


def test_openai_completions_and_models(client):
    c = client.completions.create(model="x", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    assert isinstance(c, openai.types.Completion) and c.object == "text_completion"
    assert c.choices[0].text and len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens
    models = client.models.list().data
    assert len(models) == 1 and client.models.retrieve(models[0].id).id == models[0].id


def test_openai_typed_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], temperature=5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# ---------------------------------------------------------------- the ollama package

@pytest.fixture(scope="module")
def oclient(server):
    return ollama.Client(host=server[0], headers={"Authorization": f"Bearer {KEY}"})


def test_ollama_chat(oclient):
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    r = oclient.chat(model="llama3", messages=msgs, options={"num_predict": 4, "temperature": 0})
    assert isinstance(r, ollama.ChatResponse) and r.done and r.message.role == "assistant" and r.message.content
    assert r.eval_count <= 4 and r.prompt_eval_count > 0 and r.total_duration > 0
    parts = list(oclient.chat(model="llama3", messages=msgs, stream=True,
                              options={"num_predict": 4, "temperature": 0}))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == r.message.content


def test_ollama_generate(oclient):
    r = oclient.generate(model="llama3", prompt="Tell me a joke", options={"num_predict": 4, "temperature": 0})
    assert isinstance(r, ollama.GenerateResponse) and r.done and r.response and r.context
    parts = list(oclient.generate(model="llama3", prompt="Tell me a joke", stream=True,
                                  options={"num_predict": 4, "temperature": 0}))
    assert "".join(p.response for p in parts) == r.response and parts[-1].done_reason == r.done_reason
    r2 = oclient.generate(model="llama3", prompt="Another", context=r.context, options={"num_predict": 2})
    assert r2.prompt_eval_count > len(r.context)


def test_ollama_model_endpoints(oclient):
    name = oclient.list().models[0].model
    show = oclient.show(name)
    assert show.details.format == "gguf" and show.modelinfo["general.architecture"] and show.template
    assert oclient.ps().models[0].model == name
    with pytest.raises(ollama.ResponseError) as e:
        oclient.chat(model="x", messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.status_code == 400


# ---------------------------------------------------------------- the seed documents' examples

def _run_python(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_seed_python_examples(server):
    url = server[0]
    # 000 (Ektos, French): the openai client, key given inline
    out = _run_python(f'''
        import os
        from openai import OpenAI
        client = OpenAI(
            base_url="{url}/v1/",
            api_key="{KEY}"
            # api_key=os.environ.get("EKTOS_API_KEY")
        )

        completion = client.chat.completions.create(
          model="phi-3-mini-4k-instruct",
          messages=[
            {{"role": "user", "content": "Bonjour, comment pouvez-vous m'aider?"}}
          ]
        )

        print(completion.choices[0].message)
    ''')
    assert "ChatCompletionMessage" in out and "assistant" in out
    # 002 (Gilas, Persian): requests, multi-turn
    out = _run_python(f'''
        import requests
        import os

        def make_request():
            url = '{url}/v1/chat/completions'
            headers = {{
                'Content-Type': 'application/json',
                'Authorization': f'Bearer {{os.getenv("GILAS_API_KEY")}}'
            }}
            payload = {{
                'model': 'gpt-3.5-turbo',
                "messages": [
                    {{"role": "system", "content": "You are a helpful assistant."}},
                    {{"role": "user", "content": "Who won the world series in 2020?"}},
                    {{"role": "assistant", "content": "The Los Angeles Dodgers won the World Series in 2020."}},
                    {{"role": "user", "content": "Where was it played?"}}
                ]
            }}

            response = requests.post(url, json=payload, headers=headers)
            return response.json()

        if __name__ == "__main__":
            result = make_request()
            print(result)
    ''', GILAS_API_KEY=KEY)
    assert "'object': 'chat.completion'" in out and "'finish_reason'" in out
    # 003 (Chinese write-up): the openai client from environment variables, wrapped in a function
    out = _run_python('''
        import os
        from openai import OpenAI

        client = OpenAI(
            # This is the default and can be omitted
            api_key=os.environ.get("OPENAI_API_KEY"),
            base_url=os.environ.get("OPENAI_API_BASE"))

        def chat(prompt, model="gpt-3.5-turbo"):
            chat_completion = client.chat.completions.create(
                messages=[{"role": "user", "content": "Say this is a test"}],
                model="gpt-3.5-turbo")
            return chat_completion.choices[0].message.content

        print(chat("Say this is a test"))
    ''', OPENAI_API_KEY=KEY, OPENAI_API_BASE=url + "/v1")
    assert out.strip()


def _curl(*args) -> str:
    out = subprocess.run(["curl", "-sS", "--fail-with-body", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_seed_curl_examples(server):
    url = server[0]
    auth = f"Authorization: Bearer {KEY}"
    # 000: chat, not streamed
    body = json.loads(_curl("--request", "POST", "--url", f"{url}/v1/chat/completions", "--header", auth,
                            "--header", "Content-Type: application/json", "-d",
                            '{"model": "phi-3-mini-4k-instruct", "messages": [{"role": "user", '
                            '"content": "Bonjour, comment pouvez-vous m\'aider?"}]}'))
    assert body["choices"][0]["message"]["content"]
    # 001 (ktransformers): OpenAI stream, then Ollama /api/generate NDJSON stream
    out = _curl("-X", "POST", f"{url}/v1/chat/completions", "-H", "accept: application/json", "-H", auth,
                "-H", "Content-Type: application/json", "-d",
                '{"messages": [{"content": "tell a joke", "role": "user"}], '
                '"model": "Meta-Llama-3-8B-Instruct", "stream": true}')
    assert out.rstrip().endswith("data: [DONE]")
    out = _curl("-X", "POST", f"{url}/api/generate", "-H", "accept: application/json", "-H", auth,
                "-H", "Content-Type: application/json", "-d",
                '{"model": "Meta-Llama-3-8B-Instruct", "prompt": "tell me a joke", "stream": true}')
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert lines[-1]["done"] is True and all("response" in ln for ln in lines)
    # 004 (Lanrui): stream
    out = _curl("-X", "POST", f"{url}/v1/chat/completions", "--header", "Content-Type: application/json",
                "--header", auth, "--data",
                '{"stream": true, "model": "name/version", "messages": [{"role": "user", "content": "Hello!"}]}')
    assert '"chat.completion.chunk"' in out and out.rstrip().endswith("data: [DONE]")
    # 003's curl example is not valid JSON (missing commas): a clean 400, not a crash
    out = subprocess.run(["curl", "-sS", f"{url}/v1/chat/completions", "-H", "Content-Type:application/json",
                          "-H", auth, "-d", '{"model": "gpt-3.5-turbo"\n"messages": [{"role": "user"\n'
                          '"content": "Say this is a test"}]}'], capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)["error"]["code"] == "invalid_json"


@pytest.mark.skipif(shutil.which("node") is None, reason="no node")
def test_seed_node_example(server):
    # 002's axios example, with Node's built-in fetch in place of axios (not installed here)
    script = textwrap.dedent(f'''
        async function makeRequest() {{
            const url = '{server[0]}/v1/chat/completions';
            const payload = {{
                model: 'gpt-3.5-turbo',
                "messages": [
                    {{"role": "system", "content": "You are a helpful assistant."}},
                    {{"role": "user", "content": "Who won the world series in 2020?"}},
                    {{"role": "assistant", "content": "The Los Angeles Dodgers won the World Series in 2020."}},
                    {{"role": "user", "content": "Where was it played?"}}
                ]
            }};
            const response = await fetch(url, {{
                method: 'POST',
                headers: {{
                    'Content-Type': 'application/json',
                    'Authorization': `Bearer ${{process.env.GILAS_API_KEY}}`
                }},
                body: JSON.stringify(payload)
            }});
            console.log(JSON.stringify(await response.json()));
        }}
        makeRequest();
    ''')
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "GILAS_API_KEY": KEY})
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
