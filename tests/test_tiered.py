"""Tiered start: the engine answers on torch, swaps in the kernel model between two steps
(keeping its KV cache, so a generation in flight goes on), and the start reports readable
progress: stages on the command line, /health's 503 JSON while loading."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hybrid
from hybrid.engine.generate import chat_prompt_ids
from hybrid.engine.sampling import SamplingParams
from hybrid.engine.scheduler import Engine
from hybrid.inject import tiered
from hybrid.inject.progress import Progress, describe
from hybrid.server import create_app

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def tiers_of(smollm_path):
    """(torch model, kernel model, prompt ids) of the built-in model."""
    on_torch = hybrid.load(smollm_path, tiered.TORCH_RULES)
    on_kernels = hybrid.load(smollm_path, "llama-cpu")
    ids = chat_prompt_ids(on_torch.tokenizer, [{"role": "user", "content": "Name three colours of the rainbow."}])
    return on_torch, on_kernels, ids


def _tokens(model, ids):
    return [ev.token for ev in Engine(model, slots=1, ctx=256).submit(ids, GREEDY) if ev.token is not None]


def test_swap_in_flight_keeps_the_cache_and_gives_the_kernels_tokens(tiers_of):
    on_torch, on_kernels, ids = tiers_of
    assert not on_torch.runs_kernels and on_kernels.runs_kernels
    assert on_torch.cache_layout() == on_kernels.cache_layout()
    reference = _tokens(on_kernels, ids)

    engine = Engine(on_torch, slots=1, ctx=256)   # no thread: the stream steps it
    stream = engine.submit(ids, GREEDY)
    got, swapped = [], []
    for ev in stream:
        if ev.token is not None:
            got.append(ev.token)
        if len(got) == 6 and not swapped:
            assert engine.model is on_torch   # the first tokens came from torch
            engine.replace_model(on_kernels, prepare=on_kernels.warm_up, on_swapped=swapped.append)
            cache = engine.cache
    assert swapped == [None] and engine.swaps == 1
    assert engine.model is on_kernels and engine.cache is cache   # swapped mid-generation, same KV cache
    # Greedy: the kernels' int16 activations are ~2e-5 from torch's float32, no closer
    # call than that among these 24 tokens, so the same text before and after the swap.
    assert got == reference


def test_swap_to_another_cache_layout_waits_for_the_slots_to_empty(tiers_of, smollm_path):
    on_torch, _, ids = tiers_of
    bf16 = hybrid.load(smollm_path, "default_device: cpu\ndtype: bfloat16\nrules: []\n")
    assert bf16.cache_layout() != on_torch.cache_layout()
    engine = Engine(on_torch, slots=1, ctx=256)
    stream = engine.submit(ids, SamplingParams(temperature=0, max_tokens=8))
    next(stream)
    engine.replace_model(bf16)
    for ev in stream:   # the sequence holds its slot: the engine keeps the model it started on
        assert engine.model is on_torch
    engine.step()       # nothing holds a slot now: the swap happens, with a cache of the new layout
    assert engine.model is bf16 and engine.cache[0].k.dtype == torch.bfloat16
    assert len([ev for ev in engine.submit(ids, SamplingParams(temperature=0, max_tokens=4)) if ev.token is not None]) == 4


def test_a_failing_prepare_keeps_the_current_model(tiers_of):
    on_torch, on_kernels, ids = tiers_of
    engine = Engine(on_torch, slots=1, ctx=256)
    told = []

    def broken():
        raise RuntimeError("no kernels today")

    engine.replace_model(on_kernels, prepare=broken, on_swapped=told.append)
    assert [ev.token for ev in engine.submit(ids, SamplingParams(temperature=0, max_tokens=3))][-1] is not None
    assert engine.model is on_torch and engine.swaps == 0
    assert len(told) == 1 and "no kernels today" in str(told[0])


def test_load_and_warm_up_name_their_stages(smollm_path):
    seen = []
    progress = Progress()
    progress.listen(seen.append)
    model = hybrid.load(smollm_path, "llama-cpu", progress=progress)
    mapping = [s for s in seen if s["stage"] == "mapping weights"]
    assert mapping and mapping[0]["unit"] == "MB" and 90 < mapping[0]["total"] < 110
    assert mapping[-1]["done"] == pytest.approx(mapping[0]["total"])   # every byte once (tied embedding too)
    assert "mapping weights" in mapping[-1]["message"] and "/97 MB" in mapping[-1]["message"]
    seen.clear()
    tiered.warm_up(model, progress)
    stages = [s["stage"] for s in seen]
    assert model.kernel_formats() == ["Q4_1", "Q8_0"]
    for what in ("prompt processing", "batched decode", "decode"):
        assert any(s.endswith(f"Q4_1, Q8_0 kernels: {what}") for s in stages), stages
    assert stages[-1] == "Q4_1, Q8_0 kernels ready"
    assert any(s["total"] == 3 and s["unit"] == "steps" for s in seen)


def test_progress_messages():
    assert describe({"stage": "mapping weights", "done": 40.2, "total": 97.6, "unit": "MB", "detail": ""}) \
        == "mapping weights 40/98 MB"
    assert describe({"stage": "compiling Q4_K kernels: decode", "done": 2, "total": 3, "unit": "steps",
                     "detail": "layer.dense_stack_step"}) == "compiling Q4_K kernels: decode 2/3 steps (layer.dense_stack_step)"
    assert describe({"stage": "reading the tokenizer", "done": 0, "total": 0, "unit": "", "detail": ""}) \
        == "reading the tokenizer"


def test_health_is_503_with_the_progress_until_the_model_answers(tiers_of, smollm_path):
    on_torch, _, _ = tiers_of
    app = create_app(None)
    state = app.extensions["hybrid"]
    state.progress.stage("mapping weights", 97.6, "MB", "model.gguf")
    state.progress.update(done=40.2)
    c = app.test_client()
    r = c.get("/health")
    assert r.status_code == 503 and r.headers["Retry-After"]
    body = r.get_json()
    assert body["status"] == "loading"
    assert body["progress"]["stage"] == "mapping weights" and body["progress"]["done"] == pytest.approx(40.2)
    assert body["progress"]["total"] == pytest.approx(97.6) and body["progress"]["unit"] == "MB"
    assert body["progress"]["message"] == "mapping weights 40/98 MB (model.gguf)"
    assert body["progress"]["elapsed_s"] >= 0
    # answering on torch while the kernels compile: healthy, and it says so
    state.tiers = tiered.Tiers(smollm_path, "llama-cpu")
    state.tiers.progress.stage("compiling Q4_1, Q8_0 kernels: decode", 3, "steps")
    engine = Engine(on_torch, slots=1, ctx=64).start()
    try:
        state.attach(engine)
        r = c.get("/health")
        assert r.status_code == 200
        kernels = r.get_json()["kernels"]
        assert kernels["state"] == "compiling" and kernels["progress"]["stage"] == "compiling Q4_1, Q8_0 kernels: decode"
    finally:
        engine.stop()


@pytest.mark.slow
def test_tiered_start_answers_on_torch_then_runs_the_kernels(smollm_path, tiers_of):
    """The whole path: the compiler process fills the cache (quick where it is warm), the
    kernel model is loaded and swapped in by the engine thread, and answers as before."""
    _, on_kernels, ids = tiers_of
    model, tiers = tiered.load_tiered(smollm_path, "llama-cpu", tiered=True)
    assert tiers is not None and not model.runs_kernels
    engine = Engine(model, slots=1, ctx=256).start()
    try:
        tiers.attach(engine)
        first = [ev.token for ev in engine.submit(ids, GREEDY) if ev.token is not None]
        assert tiers.done.wait(900), tiers.snapshot()
        assert tiers.state == "ready", tiers.snapshot()
        assert engine.model.runs_kernels and engine.swaps == 1
        assert tiered.kernels_ready(smollm_path, "llama-cpu")
        after = [ev.token for ev in engine.submit(ids, GREEDY) if ev.token is not None]
    finally:
        engine.stop()
    assert first == after == _tokens(on_kernels, ids)


def test_run_with_an_empty_kernel_cache_answers_on_torch(smollm_path, tmp_path):
    """`hybrid run` on a cold cache answers without waiting for the compiler (which is then
    stopped here rather than left to compile for minutes)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "hybrid", "run", "--prompt", "What is the capital of France?",
                        "--max-tokens", "12", "--temperature", "0"], capture_output=True, text=True, timeout=600, env=env)
    pid = next((int(w.rstrip(";)")) for line in r.stderr.splitlines() for w in line.split()
                if line.startswith("hybrid: answering on torch") and w.rstrip(";)").isdigit()), None)
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGTERM)   # the compiler runs in a session of its own
        except ProcessLookupError:
            pass
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "answering on torch while the kernels compile in the background" in r.stderr
    assert pid is not None
    assert "reading and dequantizing weights" in r.stderr   # the torch tier's load, by stage
    assert not any(tmp_path.glob("ready-*.json"))             # nothing compiled by the answer itself


def test_the_marker_decides_between_a_direct_and_a_tiered_start(smollm_path, tmp_path, monkeypatch, cpu_machine):
    """No marker: --wait-for-kernels (tiered=False) compiles here and writes it; then a start
    loads the kernel model directly; without it again, the start is tiered."""
    monkeypatch.setattr(tiered, "_cache_dir", lambda: tmp_path)   # markers here; numba's cache as it is
    assert not tiered.kernels_ready(smollm_path, "llama-cpu")
    seen = []
    progress = Progress()
    progress.listen(lambda s: seen.append(s["stage"]))
    model, tiers = tiered.load_tiered(smollm_path, None, progress=progress, tiered=False)
    assert tiers is None and model.runs_kernels
    assert "Q4_1, Q8_0 kernels ready" in seen
    assert tiered.kernels_ready(smollm_path, "llama-cpu")   # None chose the family's CPU rules
    model, tiers = tiered.load_tiered(smollm_path, None)
    assert tiers is None and model.runs_kernels
    for ready in tmp_path.glob("ready-*.json"):
        ready.unlink()
    model, tiers = tiered.load_tiered(smollm_path, None)
    try:
        assert tiers is not None and not model.runs_kernels and tiers.process.poll() is None
        # it runs where this hybrid was imported from: `-m` in a checkout's directory would
        # import the checkout's instead (and its kernel cache)
        root = Path(hybrid.__file__).resolve().parents[1]
        assert Path(os.readlink(f"/proc/{tiers.process.pid}/cwd")) == root
    finally:
        os.killpg(tiers.process.pid, signal.SIGTERM)
        tiers.process.wait(60)
