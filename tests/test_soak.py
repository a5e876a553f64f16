"""scripts/soak.py for 60 s: mixed, abandoned and malformed requests give no 5xx, leak no
slot, and the server exits 0 on SIGTERM with no traceback (the script exits 1 otherwise)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_soak_60s(smollm_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "soak.py"), "--model", smollm_path,
                        "--clients", "8", "--seconds", "60"], capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "| 5xx responses | 0 |" in p.stdout and "| leaked slots / in-flight after the load | 0 |" in p.stdout
