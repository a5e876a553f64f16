"""The OpenAPI document (/openapi.json) describes every route, and schemathesis, fuzzing a
live `hybrid serve` on the default model from that document, finds no 5xx and no response
that the document does not allow."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

requests = pytest.importorskip("requests")


def test_every_route_is_documented():
    from hybrid.server import create_app
    from hybrid.server.openapi import document

    doc = document()
    assert doc["openapi"].startswith("3.1")
    routes = {re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", r.rule) for r in create_app(None).url_map.iter_rules()
              if r.endpoint != "static"}
    assert routes - {"/openapi.json"} == set(doc["paths"])
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    chat = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert "messages" in chat["required"] and chat["properties"]["temperature"]["anyOf"][0]["maximum"] == 2


@pytest.fixture(scope="module")
def live(smollm_path):
    """A server with a short context and a default max_tokens: fuzzed generations stay short."""
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HYBRID_API_KEY": "k"}
    cmd = [sys.executable, "-m", "hybrid", "serve", "--model", smollm_path, "--port", "0", "--ctx", "64",
           "--slots", "2", "--default-max-tokens", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = re.search(r"listening on (http://\S+),", proc.stdout.readline()).group(1)
        assert "ready at" in proc.stdout.readline()
        yield url
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err[-3000:]


def test_openapi_json_is_served(live):
    r = requests.get(live + "/openapi.json", timeout=10)
    assert r.status_code == 200 and r.json()["info"]["title"] == "hybrid"


def test_schemathesis_finds_no_5xx_and_no_undocumented_response(live, tmp_path):
    st = shutil.which("st") or os.path.join(os.path.dirname(sys.executable), "st")
    if not os.path.exists(st):
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    t0 = time.time()
    p = subprocess.run([st, "--no-color", "run", live + "/openapi.json", "-H", "Authorization: Bearer k",
                        "-c", "not_a_server_error,status_code_conformance,content_type_conformance,"
                              "response_schema_conformance",
                        "--phases", "examples,fuzzing", "-n", "15", "--generation-deterministic",
                        "--request-timeout", "60"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    tail = p.stdout[-4000:]
    assert p.returncode == 0, tail
    assert re.search(r"(\d+) passed", tail) and "failure" not in tail.split("SUMMARY")[-1], tail
    print(f"schemathesis: {time.time() - t0:.0f}s", tail[-400:])
