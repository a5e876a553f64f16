"""Kernel threads: as many as the cores the process may use (affinity, cgroup quota), and
idle workers that sleep instead of spinning (hybrid/threads.py)."""

import json
import os
import subprocess
import sys

import pytest

from hybrid import threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# After one parallel kernel, the process's CPU time over a second of sleep.
IDLE_POOL = """
import json, os, sys, time
import hybrid, numba, numpy as np
from gguf import GGMLQuantizationType as Q
from hybrid.operators import kernels
w, x = np.ones((4096, 256), np.float32), np.ones(256, np.float32)
for _ in range(20):
    kernels.gemv(Q.F32, w, x)
c0, t0 = time.process_time(), time.perf_counter()
time.sleep(1.0)
print(json.dumps({"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0,
                  "threads": numba.get_num_threads(), "layer": numba.threading_layer(),
                  "wait": os.environ.get("OMP_WAIT_POLICY"), "spin": os.environ.get("GOMP_SPINCOUNT")}))
"""


def run(code: str, env: dict | None = None) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_NUM_THREADS")},
           "PYTHONPATH": ROOT, **(env or {})}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: numba starts no worker threads")
def test_idle_worker_pool_does_not_spin():
    r = run(IDLE_POOL)
    assert r["threads"] >= 2 and r["wait"] is None and r["spin"] == str(threads.SPIN_ROUNDS), r
    assert r["cpu_s"] < 0.05, r  # workers asleep after a short spin; a spinning one burns ~1 s of CPU here
    assert run(IDLE_POOL, {"OMP_WAIT_POLICY": "PASSIVE"})["spin"] is None  # the user's choice stays alone
    active = run(IDLE_POOL, {"OMP_WAIT_POLICY": "ACTIVE"})  # the same check sees a spinning pool
    if active["layer"] == "omp":
        assert active["cpu_s"] > 0.05, active


def test_threads_follow_the_cores_the_process_may_use():
    code = ("import os, json; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); import hybrid, numba; "
            "print(json.dumps({'threads': numba.config.NUMBA_NUM_THREADS}))")
    assert run(code)["threads"] == 1
    code = "import json, hybrid, numba; print(json.dumps({'threads': numba.config.NUMBA_NUM_THREADS}))"
    assert run(code)["threads"] == len(os.sched_getaffinity(0))
    assert run(code, {"NUMBA_NUM_THREADS": "1"})["threads"] == 1  # the user's setting wins


def test_cgroup_quota_caps_the_threads(tmp_path, monkeypatch):
    v2 = tmp_path / "cpu.max"
    v1 = (tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us")
    v2.write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(str(v2), v1) is None
    v2.write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(str(v2), v1) == 1.5
    missing = str(tmp_path / "none")
    v1[0].write_text("-1\n")
    v1[1].write_text("100000\n")
    assert threads.cgroup_cpu_limit(missing, (str(v1[0]), str(v1[1]))) is None
    v1[0].write_text("50000\n")
    assert threads.cgroup_cpu_limit(missing, (str(v1[0]), str(v1[1]))) == 0.5
    assert threads.cgroup_cpu_limit(missing, (missing, missing)) is None

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2.5)
    assert threads.default_threads() == 3  # a fractional quota rounds up
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.2)
    assert threads.default_threads() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.default_threads() == 8
