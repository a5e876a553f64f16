"""Peak resident memory of loading a quantized GGUF under a CPU rule file, against the
file's size (scripts/load_memory.py measures it in a fresh process)."""

import json
import os
import subprocess
import sys

from hybrid.writers.synthetic import write_moe_gguf

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "load_memory.py")


def test_quantized_moe_load_stays_below_1_3x_file_size(tmp_path, smollm_path):
    path = write_moe_gguf(tmp_path / "moe.gguf", layers=4, hidden=1024, experts=16, expert_width=1024, top_k=4,
                          qtype="Q8_0", tokenizer_from=smollm_path)
    out = subprocess.run([sys.executable, SCRIPT, str(path), "--rules", "mixtral-cpu", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["rules"].endswith("mixtral-cpu.yaml")
    assert report["file_bytes"] > 250e6
    # every expert is used by the 64-token forward, so nearly every weight page was read
    assert report["peak_added_bytes"] > 0.6 * report["file_bytes"], report
    assert report["peak_added_bytes"] < 1.3 * report["file_bytes"], report
